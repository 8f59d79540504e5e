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


def test_lone_surrogates_and_cycles_survive():
    assert round_trip("a\udc80") == "a\udc80"
    cyclic = [1]
    cyclic.append(cyclic)
    back = round_trip(cyclic)
    assert back[1] is back


# ------------------------------------------------------- the nesting bound

MAX_DEPTH = envelope_pb2.CONSTANT_MAX_VALUE_DEPTH


def nesting(message):
    """How many protobuf messages deep `message` nests, itself included:
    what CONSTANT_MAX_VALUE_DEPTH bounds for a Value."""
    deepest = 0
    for field, v in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in v if field.is_repeated else [v]:
                deepest = max(deepest, nesting(item))
    return 1 + deepest


def nest(leaf, wrap, times, top=lambda x: x):
    for _ in range(times):
        leaf = wrap(leaf)
    return top(leaf)


# name: (wrap, leaf, the most wraps within the bound, the nesting then, and
# what holds the wraps if not the top level). Every kind of level, around
# leaves that add a message (None, complex, arrays, empty containers) and
# leaves that add none (int, bytes). One wrap more always passes the bound.
DEEPEST = {
    "lists around None": (lambda x: [x], None, 47, 96),
    "lists around an int": (lambda x: [x], 7, 47, 95),
    "lists around an empty list": (lambda x: [x], [], 47, 96),
    "tuples around a complex": (lambda x: (x,), 1j, 47, 96),
    "lists around an array": (lambda x: [x], np.arange(3.0), 47, 96),
    "lists around a numpy scalar": (lambda x: [x], np.float32(1.5), 47, 96),
    "dicts around None": (lambda x: {"k": x}, None, 31, 95),
    "dicts around an empty dict": (lambda x: {"k": x}, {}, 31, 95),
    "dicts of lists around None": (lambda x: {"k": [x]}, None, 18, 92),
    "a dict key of tuples around bytes": (lambda x: (x,), b"k", 46, 96, lambda x: {x: None}),
    # One wrap more puts the leaf's Value at 96 and its message at 97.
    "a dict key of tuples around None": (lambda x: (x,), None, 45, 95, lambda x: {x: 0}),
    "a dict key of tuples around a complex": (lambda x: (x,), 2j, 45, 95, lambda x: {x: 0}),
    "a dict key of tuples around a numpy scalar": (lambda x: (x,), np.int8(3), 45, 95, lambda x: {x: 0}),
    "a dict key of tuples around an empty tuple": (lambda x: (x,), (), 45, 95, lambda x: {x: 0}),
}


def too_deep_natively(obj, monkeypatch):
    """obj's Value as it would be without the bound."""
    with monkeypatch.context() as m:
        m.setattr(values, "MAX_DEPTH", MAX_DEPTH + 20)
        return values.to_value(obj)


@pytest.mark.parametrize("name", DEEPEST)
def test_values_nest_natively_to_the_bound_and_are_pickled_past_it(name, monkeypatch):
    wrap, leaf, most, depth, *top = DEEPEST[name]
    at, past = nest(leaf, wrap, most, *top), nest(leaf, wrap, most + 1, *top)

    value = values.to_value(at)
    assert value.WhichOneof("kind") != "pickle_value"
    assert nesting(value) == depth <= MAX_DEPTH
    assert same(values.from_value(value), at)
    # Decodable by protobuf (nesting limit 100) inside the deepest envelope.
    envelope = envelope_pb2.Envelope()
    envelope.response_delivery.response.ret.CopyFrom(value)
    again = envelope_pb2.Envelope.FromString(envelope.SerializeToString())
    assert same(values.from_value(again.response_delivery.response.ret), at)

    value = values.to_value(past)
    assert value.WhichOneof("kind") == "pickle_value"
    assert same(round_trip(past), past)
    # The native encoding would pass the bound, and is refused, as the
    # Rust side and the worker refuse it.
    native = too_deep_natively(past, monkeypatch)
    assert nesting(native) > MAX_DEPTH
    with pytest.raises(ValueError, match=f"deeper than {MAX_DEPTH} protobuf messages"):
        values.from_value(native)


def test_one_level_past_the_bound_is_refused():
    """An int inside 48 lists sits at level 97."""
    value = value_pb2.Value(int_value=7)
    for _ in range(48):
        outer = value_pb2.Value()
        outer.list_value.items.add().CopyFrom(value)
        value = outer
    assert nesting(value) == MAX_DEPTH + 1
    with pytest.raises(ValueError, match="deeper than"):
        values.from_value(value)
    assert values.from_value(value.list_value.items[0]) == nest(7, lambda x: [x], 47)


@pytest.mark.parametrize("leaf", [bytes(values.LARGE), np.zeros(values.LARGE // 8)], ids=["bytes", "array"])
def test_large_values_keep_the_bound(leaf, monkeypatch):
    """The large-value path (value_buffers, parse_value) nests natively as
    far as to_value does, and its parser refuses what from_value refuses."""
    at, past = nest(leaf, lambda x: [x], 47), nest(leaf, lambda x: [x], 48)
    for obj, kind in [(at, "list_value"), (past, "pickle_value")]:
        buffers, size = values.value_buffers(obj)
        wire = b"".join(bytes(b) for b in buffers)
        assert len(wire) == size
        assert wire == values.to_value(obj).SerializeToString()
        assert value_pb2.Value.FromString(wire).WhichOneof("kind") == kind
        parsed = values.parse_value(memoryview(wire))
        assert type(parsed) is values.SplitValue
        assert same(values.from_value(parsed), obj)
    wire = too_deep_natively(past, monkeypatch).SerializeToString()
    with pytest.raises(ValueError, match="deeper than"):
        values.from_value(values.parse_value(memoryview(wire)))


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
