"""Python <-> Value (SEMANTICS rule 8): lossless round trips, and the same
bytes as the Rust side for the fixed cases of the conformance vectors."""

import datetime
import math
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casanode import values
from casanode._pb.casa.node.v1 import envelope_pb2, value_pb2
from conftest import REPO

VECTORS = REPO / "tests" / "vectors"


def same(a, b):
    """Equal, with types kept and floats compared bit for bit (nan, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


def round_trip(obj):
    wire = values.to_value(obj).SerializeToString()
    return values.from_value(value_pb2.Value.FromString(wire))


# ------------------------------------------------ against the Rust encoding


def _push_vector():
    data = (VECTORS / "command_request_push_every_value_kind.bin").read_bytes()
    request = envelope_pb2.Envelope.FromString(data).command_request
    return {p.name: p.value for p in request.parameters}


EVERY_KIND = {
    "nothing": None,
    "flag": True,
    "count": -7,
    "big": 2**100,
    "negative_big": -(2**70),
    "not_a_number": float("nan"),
    "infinity": float("inf"),
    "minus_infinity": float("-inf"),
    "minus_zero": -0.0,
    "pi": math.pi,
    "field": "M100 – ñ ☉",
    "raw": b"\x00\xffCASA\n",
    "channels": [0, "spw0", 1.5, None],
    "phasecenter": ("J2000", "12h22m54.9", "+15d49m15"),
    "keyed": {1: "one", (2, 3): "tuple key", None: "none key", 2.5: [True, False], b"k": "bytes key", "spw": "0:5~10"},
    "impedance": complex(1.5, -2.0),
    "image": np.arange(6, dtype="<f8").reshape(2, 3),
    "mask": np.array([True, False, True, True]),
    "gain": np.float32(1.5),
    "nchan": np.array(7, dtype="<i8"),
    "when": datetime.date(2024, 1, 2),
    "empty_list": [],
    "empty_tuple": (),
    "empty_dict": {},
}


def test_the_vector_has_every_case():
    assert sorted(_push_vector()) == sorted(EVERY_KIND)


@pytest.mark.parametrize("name", sorted(EVERY_KIND))
def test_rust_encoded_value_decodes_to_the_python_object(name):
    assert same(values.from_value(_push_vector()[name]), EVERY_KIND[name])


@pytest.mark.parametrize("name", sorted(set(EVERY_KIND) - {"when"}))
def test_python_object_encodes_to_the_rust_bytes(name):
    rust = _push_vector()[name].SerializeToString()
    assert values.to_value(EVERY_KIND[name]).SerializeToString() == rust


def test_pickles_carry_the_object():
    rust = _push_vector()["when"]
    ours = values.to_value(EVERY_KIND["when"])
    assert ours.WhichOneof("kind") == "pickle_value"
    assert pickle.loads(ours.pickle_value) == pickle.loads(rust.pickle_value)
    if values.PICKLE_PROTOCOL == 4:  # the vector's protocol
        assert ours.pickle_value == rust.pickle_value


def test_a_dict_of_arrays_from_a_server():
    data = (VECTORS / "command_response_imstat_arrays.bin").read_bytes()
    ret = values.from_value(envelope_pb2.Envelope.FromString(data).command_response.ret)
    assert list(ret) == ["blc", "trc", "npts", "max", "min", "maxposf"]
    assert ret["trc"].dtype == np.dtype("<i4") and ret["trc"].tolist() == [255, 255, 0, 0]
    assert ret["npts"].tolist() == [65536.0]
    assert ret["maxposf"].startswith("12:22:54.900")


# ------------------------------------------------------------------ big ints


def _is_shortest(b):
    return len(b) == 1 or not (
        (b[0] == 0x00 and b[1] < 0x80) or (b[0] == 0xFF and b[1] >= 0x80)
    )


@pytest.mark.parametrize(
    "n",
    [0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 2**100, -(2**70), 10**40, -(10**40)],
)
def test_ints_use_int_value_in_64_bits_else_shortest_twos_complement(n):
    value = values.to_value(n)
    if -(2**63) <= n < 2**63:
        assert value.WhichOneof("kind") == "int_value"
    else:
        assert value.WhichOneof("kind") == "big_int_value"
        assert _is_shortest(value.big_int_value)
        assert value.big_int_value == n.to_bytes(len(value.big_int_value), "big", signed=True)
    assert same(round_trip(n), n)


def test_two_to_the_63_is_nine_bytes():
    assert values.to_value(2**63).big_int_value == b"\x00\x80" + b"\x00" * 7
    assert values.to_value(-(2**63) - 1).big_int_value == b"\xff\x7f" + b"\xff" * 7


# ---------------------------------------------------------- other fixed cases


def test_complex_keeps_negative_zero_and_reads_absent_parts_as_zero():
    assert same(round_trip(complex(-0.0, -0.0)), complex(-0.0, -0.0))
    assert values.from_value(value_pb2.Value(complex_value=value_pb2.Complex(imag=2.0))) == 2j
    assert same(values.from_value(value_pb2.Value(complex_value=value_pb2.Complex())), 0j)


def test_numpy_kinds_keep_dtype_shape_and_scalarness():
    for obj in [np.float64(2.5), np.int16(-3), np.array(1.0), np.zeros((0, 3), ">i2"),
                np.arange(12, dtype="<c16").reshape(3, 4)[:, ::2], np.array([b"ab", b"c"]), np.bool_(True)]:
        back = round_trip(obj)
        assert same(back, obj), obj
        assert isinstance(back, np.generic) == isinstance(obj, np.generic)


def test_object_arrays_and_other_objects_are_pickled():
    obj = np.array([1, "x"], dtype=object)
    assert values.to_value(obj).WhichOneof("kind") == "pickle_value"
    assert round_trip(obj).tolist() == [1, "x"]
    assert round_trip({1, 2}) == {1, 2}
    assert round_trip(bytearray(b"ab")) == bytearray(b"ab")


def test_lone_surrogates_and_deep_structures_survive():
    assert round_trip("a\udc80") == "a\udc80"
    for depth, kind in [(32, "list_value"), (33, "pickle_value"), (400, "pickle_value")]:
        deep = []
        for _ in range(depth):
            deep = [deep]
        value = values.to_value(deep)
        assert value.WhichOneof("kind") == kind
        # Decodable by protobuf (nesting limit 100) even inside an envelope.
        envelope = envelope_pb2.Envelope()
        envelope.response_delivery.response.ret.CopyFrom(value)
        again = envelope_pb2.Envelope.FromString(envelope.SerializeToString())
        assert values.from_value(again.response_delivery.response.ret) == deep
    cyclic = [1]
    cyclic.append(cyclic)
    back = round_trip(cyclic)
    assert back[1] is back


def test_without_numpy_arrays_stay_holders(monkeypatch):
    monkeypatch.setattr(values, "_numpy", lambda: None)
    sent = _push_vector()["image"]
    holder = values.from_value(sent)
    assert holder == values.NdArray("<f8", [2, 3], sent.ndarray_value.data)
    assert values.to_value(holder).SerializeToString() == sent.SerializeToString()


def test_an_unloadable_pickle_comes_back_as_is():
    sent = value_pb2.Value(pickle_value=b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00\x8c\x02no\x94\x8c\x01X\x94\x93\x94.")
    held = values.from_value(sent)
    assert isinstance(held, values.Pickled) and held.error
    assert values.to_value(held) == sent


def test_malformed_values_are_errors():
    with pytest.raises(ValueError, match="no kind"):
        values.from_value(value_pb2.Value())
    equal_keys = value_pb2.Value()
    for key in (values.to_value(1), values.to_value(True)):
        entry = equal_keys.dict_value.entries.add()
        entry.key.CopyFrom(key)
        entry.value.null_value.SetInParent()
    with pytest.raises(ValueError, match="equal"):
        values.from_value(equal_keys)


# ------------------------------------------------------ random round trips

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
    | st.complex_numbers(allow_nan=True, allow_infinity=True)
)
hashables = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)
python_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(hashables, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(python_values)
def test_random_values_round_trip_losslessly(obj):
    assert same(round_trip(obj), obj)


@settings(max_examples=300, deadline=None)
@given(python_values)
def test_decoding_then_encoding_gives_the_same_bytes(obj):
    wire = values.to_value(obj).SerializeToString()
    again = values.to_value(values.from_value(value_pb2.Value.FromString(wire)))
    assert again.SerializeToString() == wire
