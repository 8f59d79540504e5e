"""Large values travel without protobuf's copies (issue 6): as buffers of
their own on the way out, as slices of the received frame on the way in.
The bytes on the wire and the decoded objects must be exactly protobuf's."""

import datetime
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casanode import client as client_module
from casanode import connection, values, wire
from casanode._pb.casa.node.v1 import driver_pb2, envelope_pb2, node_pb2, value_pb2
from test_values import python_values, same

LARGE = values.LARGE
BIG = np.random.default_rng(6).random(LARGE // 8 + 3)


class Custom:
    def __init__(self, payload):
        self.payload = payload

    def __eq__(self, other):
        return type(other) is Custom and same(self.payload, other.payload)

    def __hash__(self):
        return 0


def _deep(leaf, levels):
    for _ in range(levels):
        leaf = [leaf]
    return leaf


CASES = {
    "array": BIG,
    "column": BIG.reshape(-1, 1),
    "fortran": np.asfortranarray(np.arange(300 * 40, dtype="<f8").reshape(300, 40)),
    "strided_big_endian": np.arange(LARGE, dtype=">i4")[::2],
    "dates": np.array(["2020-01-01"] * (LARGE // 8), dtype="M8[D]"),
    "complex_view": np.zeros((3, LARGE // 16), dtype="<c16")[:, ::3],
    "read_only": np.frombuffer(bytes(LARGE), dtype="<u2"),
    "object_array": np.array([Custom(BIG)], dtype=object),
    "bytes": b"\x00\xff" * LARGE,
    "holder": values.NdArray("<f8", (LARGE // 8,), b"\x01" * LARGE),
    "scalar_holder": values.NdArray(f"|V{LARGE}", (), b"\x01" * LARGE, scalar=True),
    "pickled": values.Pickled(b"\x80\x04" * LARGE),
    "custom": Custom(BIG),
    "mixed_list": [1, BIG, "a", None, {1: 2}, datetime.date(2020, 1, 2), Custom(3), b"x" * LARGE],
    "tuple": (BIG, BIG[:3], -0.0),
    "dict": {"a": BIG, b"k" * LARGE: 3, (1, 2): [BIG], Custom(1): "custom key"},
    "nested": _deep(BIG, 20),
    "too_deep": _deep(BIG, 48),  # past the nesting bound: pickled whole, as to_value does
    "long_list": [BIG] + list(range(5000)),  # left to protobuf
    "small": {"a": 1, "b": [2.5, "x"]},
    "small_array": np.arange(6.0).reshape(2, 3),
    "empty": [],
}


def alike(a, b):
    """same, with object arrays compared by their items."""
    if isinstance(a, np.ndarray) and a.dtype == object:
        return type(b) is np.ndarray and b.dtype == object and a.shape == b.shape and a.tolist() == b.tolist()
    return same(a, b)


def decoded(value):
    return values.from_value(value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_buffers_make_protobufs_bytes(name):
    obj = CASES[name]
    buffers, size = values.value_buffers(obj)
    wire = values.to_value(obj).SerializeToString()
    assert sum(len(memoryview(b).cast("B")) for b in buffers) == size
    assert b"".join(buffers) == wire
    buffers, size = values.parameter_buffers("név", obj)
    assert b"".join(buffers) == value_pb2.Parameter(name="név", value=values.to_value(obj)).SerializeToString()
    assert len(b"".join(buffers)) == size


def test_a_contiguous_array_is_sent_from_its_own_memory():
    buffers, _ = values.value_buffers(BIG)
    assert any(isinstance(b, memoryview) and b.obj.base is BIG for b in buffers)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parsing_around_large_leaves_decodes_as_protobuf(name):
    wire = values.to_value(CASES[name]).SerializeToString()
    parsed = values.parse_value(memoryview(bytearray(wire)))
    assert alike(decoded(parsed), decoded(value_pb2.Value.FromString(wire)))
    if len(wire) >= LARGE and name not in ("long_list", "too_deep"):
        assert isinstance(parsed, values.SplitValue)


def test_decoded_arrays_are_writable_and_their_own():
    wire = bytearray(values.to_value([BIG, BIG]).SerializeToString())
    parsed = values.parse_value(memoryview(wire))
    first, second = decoded(parsed)
    again = decoded(parsed)[0]
    assert first.flags.writeable and first.flags.owndata
    first[0] = -1.0
    assert second[0] == BIG[0] and again[0] == BIG[0]


def test_irregular_encodings_are_left_to_protobuf():
    # A kind field twice (the last wins) and a list split in two (merged).
    array = values.to_value(BIG).SerializeToString()
    twice = array + values.to_value(b"z" * LARGE).SerializeToString()
    assert decoded(values.parse_value(memoryview(twice))) == b"z" * LARGE
    merged = values.to_value([BIG]).SerializeToString() + values.to_value([1]).SerializeToString()
    assert same(decoded(values.parse_value(memoryview(merged))), [BIG, 1])
    # Not UTF-8 where a string belongs: protobuf's error.
    bad = value_pb2.Value()
    bad.ndarray_value.dtype = "x"
    bad.ndarray_value.data = bytes(LARGE)
    wire = bytearray(bad.SerializeToString())
    wire[wire.index(b"x")] = 0xFF
    with pytest.raises(Exception, match="(?i)pars|decode|utf"):
        values.parse_value(memoryview(wire))


def test_without_numpy_large_arrays_stay_holders(monkeypatch):
    monkeypatch.setattr(values, "_numpy", lambda: None)
    wire = values.to_value(BIG).SerializeToString()
    holder = decoded(values.parse_value(memoryview(wire)))
    assert holder == values.NdArray("<f8", BIG.shape, BIG.tobytes())


# big leaves anywhere in random values
with_large = st.recursive(
    python_values | st.sampled_from([BIG, b"b" * LARGE, values.NdArray("<u1", (LARGE,), bytes(LARGE))]),
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.integers() | st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(with_large)
def test_random_values_with_large_leaves(obj):
    buffers, size = values.value_buffers(obj)
    wire = values.to_value(obj).SerializeToString()
    assert b"".join(buffers) == wire and len(wire) == size
    assert same(decoded(values.parse_value(memoryview(wire))), decoded(value_pb2.Value.FromString(wire)))


# ------------------------------------------------------------------ frames


def _delivery(parameters, ret, **fields):
    envelope = envelope_pb2.Envelope(protocol_version=1, correlation=0)
    response = envelope.response_delivery.response
    response.id = 7
    response.command = "x"
    response.mode = node_pb2.COMMAND_MODE_EVAL
    for name, obj in parameters.items():
        response.parameters.add(name=name).value.CopyFrom(values.to_value(obj))
    if ret is not None:
        response.ret.CopyFrom(values.to_value(ret))
    for key, value in fields.items():
        setattr(response, key, value)
    envelope.response_delivery.replaces_timeout = True
    return envelope


@pytest.mark.parametrize("ret", [BIG, None, 3, [BIG, {"k": b"v" * LARGE}]])
def test_a_large_delivery_reads_as_the_message(ret):
    envelope = _delivery({"x": BIG, "y": 2, "z": CASES["dict"]}, ret, server=1, successful=True,
                         status=node_pb2.COMMAND_STATUS_RESPONSE_RECEIVED, command_start_time=1.5,
                         traceback="t")
    data = envelope.SerializeToString()
    correlation, split = wire.parse_delivery(memoryview(bytearray(data)))
    expected = client_module.response_dict(envelope.response_delivery.response)
    got = client_module.response_dict(split)
    assert same(sorted(got.items(), key=str), sorted(expected.items(), key=str))
    assert got["parameters"]["x"].flags.writeable
    assert split.message() == envelope.response_delivery.response
    assert split.worker_restarted is False and split.HasField("traceback")
    assert isinstance(split.ret, values.SplitValue) == isinstance(ret, (np.ndarray, list))


def test_other_large_frames_are_left_to_protobuf():
    status = envelope_pb2.Envelope(protocol_version=1, correlation=3)
    status.log_record.message = "m" * LARGE
    assert wire.parse_delivery(memoryview(status.SerializeToString())) is None
    twice = _delivery({}, BIG).SerializeToString() + _delivery({}, 1).SerializeToString()
    assert wire.parse_delivery(memoryview(twice)) is None


def test_frames_cross_a_socket_whole_and_in_order():
    a, b = socket.socketpair()
    frames = []
    sizes = [0, 10, LARGE - 10, LARGE, 3 * LARGE + 5, 5, (1 << 16) - 4, (1 << 16) - 3, 20 << 20]
    for i, n in enumerate(sizes):
        body = bytes([i]) * n
        message = value_pb2.Value(bytes_value=body)
        buffers, size = values.value_buffers(body)
        frames.append((connection.frame_buffers(i + 2, connection.body_tag("log_record"), buffers, size),
                       (i + 2, message)))

    def send():
        for buffers, _ in frames:
            wire.send_buffers(a, buffers)
        a.close()

    sender = threading.Thread(target=send)
    sender.start()
    reader = wire.FrameReader(b)
    for _, (correlation, message) in frames:
        data, large = reader.next()
        envelope = envelope_pb2.Envelope.FromString(data)
        assert envelope.correlation == correlation
        # The body went out as a Value in the log_record field: same bytes.
        assert envelope.log_record.SerializeToString() == message.SerializeToString()
        assert large == (len(data) + 4 > wire.FrameReader.SIZE)
    assert reader.next() is None
    sender.join()
    b.close()


def test_a_frame_cut_short_is_an_error():
    a, b = socket.socketpair()
    a.sendall(b"\x00\x00\x00\x10abc")
    a.close()
    with pytest.raises(connection.ConnectionClosed):
        wire.FrameReader(b).next()
    b.close()


def test_submit_requests_are_protobufs_bytes():
    parameters = {"x": BIG, "n": 1, "list": [BIG, "s"]}
    many, buffers, size = client_module._submit_request("f()", [1, 2], parameters, 5.0, "eval")
    expected = driver_pb2.SubmitRequest(command="f()", mode=node_pb2.COMMAND_MODE_EVAL,
                                        targets=[1, 2], deadline_seconds=5.0)
    for name, obj in parameters.items():
        expected.parameters.add(name=name).value.CopyFrom(values.to_value(obj))
    assert many
    assert driver_pb2.SubmitRequest.FromString(b"".join(buffers)) == expected
    frame = b"".join(connection.frame_buffers(9, client_module._SUBMIT, buffers, size))
    envelope = envelope_pb2.Envelope.FromString(frame[4:])
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert envelope.correlation == 9 and envelope.protocol_version == 1
    assert envelope.submit_request == expected
    with pytest.raises(TypeError, match="names must be str"):
        client_module._submit_request("x", None, {1: 2}, None, None)


@pytest.mark.parametrize("command", ["1+1", "", "ñ ☉ = 1", "x" * 300])
@pytest.mark.parametrize("target", [None, 1, [1, 2], (3,), range(1, 4), [], [-1, 2**31 - 1, -(2**31)]])
@pytest.mark.parametrize("deadline", [None, 0, 2.5])
@pytest.mark.parametrize("mode", [None, "exec"])
def test_small_submit_requests_are_protobufs_bytes(command, target, deadline, mode):
    many, buffers, size = client_module._submit_request(command, target, {"a": 1}, deadline, mode)
    expected = driver_pb2.SubmitRequest(command=command)
    if mode:
        expected.mode = node_pb2.COMMAND_MODE_EXEC
    expected.parameters.add(name="a").value.int_value = 1
    if target is not None:
        expected.targets.extend(list(target) if many else [target])
    if deadline is not None:
        expected.deadline_seconds = deadline
    assert b"".join(buffers) == expected.SerializeToString() and len(b"".join(buffers)) == size
    assert many == isinstance(target, (list, tuple, range))


def test_submit_requests_refuse_what_protobuf_refuses():
    for command, target, error in [("a\udc80", None, UnicodeEncodeError), (5, None, TypeError),
                                   ("x", [2**31], ValueError), ("x", "1", None)]:
        if error is None:  # int("1"), as before
            assert client_module._submit_request(command, target, None, None, None)[0] is False
            continue
        with pytest.raises(error):
            client_module._submit_request(command, target, None, None, None)
    with pytest.raises(KeyError):
        client_module._submit_request("x", None, None, None, "fast")


def test_decoded_values_do_not_share_the_frames_memory():
    obj = [BIG, b"b" * LARGE, Custom(BIG), np.ma.masked_array(BIG), values.Pickled(b"\x01" * LARGE)]
    frame = bytearray(values.to_value(obj).SerializeToString())
    first = decoded(values.parse_value(memoryview(frame)))
    frame[:] = bytes(len(frame))
    assert same(first[0], BIG) and first[1] == b"b" * LARGE and first[2] == Custom(BIG)
    assert np.array_equal(first[3], BIG) and first[4].data == b"\x01" * LARGE
