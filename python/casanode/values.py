"""Python objects <-> casa.node.v1.Value (SEMANTICS rule 8), losslessly.

None, bool, int of any size, float (nan, inf and -0.0 kept), str, bytes, list,
tuple, dict with any keys in insertion order, complex, numpy arrays and scalars
(when numpy is used), and anything else by pickle.

    to_value(obj) -> Value       from_value(value) -> obj

A numpy array arriving where numpy is not installed becomes an `NdArray`
holder, and a pickle this process cannot load a `Pickled` holder; both convert
back to the same Value.
"""

import pickle
import sys

from ._pb.casa.node.v1 import value_pb2

Value = value_pb2.Value

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
PICKLE_PROTOCOL = pickle.DEFAULT_PROTOCOL


class NdArray:
    """A numpy array or scalar as sent, for a process without numpy."""

    __slots__ = ("dtype", "shape", "data", "scalar")

    def __init__(self, dtype, shape, data, scalar=False):
        self.dtype = dtype
        self.shape = tuple(shape)
        self.data = bytes(data)
        self.scalar = bool(scalar)

    def __eq__(self, other):
        return isinstance(other, NdArray) and (
            (self.dtype, self.shape, self.data, self.scalar)
            == (other.dtype, other.shape, other.data, other.scalar)
        )

    def __hash__(self):
        return hash((self.dtype, self.shape, self.data, self.scalar))

    def __repr__(self):
        kind = "scalar" if self.scalar else "array"
        return f"NdArray({kind}, dtype={self.dtype!r}, shape={self.shape}, {len(self.data)} bytes)"


class Pickled:
    """A pickle this process could not load (its class is not importable
    here, say); `error` says why. Sent back as the same bytes."""

    __slots__ = ("data", "error")

    def __init__(self, data, error=None):
        self.data = bytes(data)
        self.error = error

    def __eq__(self, other):
        return isinstance(other, Pickled) and self.data == other.data

    def __hash__(self):
        return hash(self.data)

    def __repr__(self):
        return f"Pickled({len(self.data)} bytes, {self.error})"


def big_int_bytes(n):
    """Two's complement, big-endian, shortest form: what Rust's
    `Value::big_int` stores for ints outside int64."""
    return n.to_bytes((n if n >= 0 else ~n).bit_length() // 8 + 1, "big", signed=True)


# ---------------------------------------------------------------- encoding


# Protobuf decoders (Python's and Rust's prost) refuse messages nested more
# than 100 deep. A list or tuple costs 2 levels, a dict 3; past this many
# levels inside one Value the whole value is pickled instead, leaving room
# for the envelope around it.
MAX_DEPTH = 64


class _TooDeep(Exception):
    pass


def to_value(obj):
    """The Value of a Python object. Structures too deep (or cyclic) for the
    native encoding are pickled whole."""
    value = Value()
    try:
        _fill(value, obj, 0)
    except (_TooDeep, RecursionError):
        value = Value(pickle_value=pickle.dumps(obj, protocol=PICKLE_PROTOCOL))
    return value


def _fill(value, obj, depth):
    if depth > MAX_DEPTH:
        raise _TooDeep
    fill = _FILLERS.get(type(obj))
    if fill is None:
        _fill_other(value, obj, depth)
    else:
        fill(value, obj, depth)


def _fill_none(value, obj, depth=0):
    value.null_value.SetInParent()


def _fill_bool(value, obj, depth=0):
    value.bool_value = obj


def _fill_int(value, obj, depth=0):
    if _I64_MIN <= obj <= _I64_MAX:
        value.int_value = obj
    else:
        value.big_int_value = big_int_bytes(obj)


def _fill_float(value, obj, depth=0):
    value.double_value = obj


def _fill_str(value, obj, depth=0):
    try:
        obj.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep them, pickled
        _fill_pickle(value, obj, depth)
    else:
        value.string_value = obj


def _fill_bytes(value, obj, depth=0):
    value.bytes_value = obj


def _fill_items(target, items, depth):
    target.SetInParent()
    for item in items:
        _fill(target.items.add(), item, depth + 2)


def _fill_list(value, obj, depth=0):
    _fill_items(value.list_value, obj, depth)


def _fill_tuple(value, obj, depth=0):
    _fill_items(value.tuple_value, obj, depth)


def _fill_dict(value, obj, depth=0):
    target = value.dict_value
    target.SetInParent()
    for key, item in obj.items():
        entry = target.entries.add()
        _fill(entry.key, key, depth + 3)
        _fill(entry.value, item, depth + 3)


def _fill_complex(value, obj, depth=0):
    value.complex_value.real = obj.real
    value.complex_value.imag = obj.imag


def _fill_ndarray(value, dtype, shape, data, scalar):
    target = value.ndarray_value
    target.SetInParent()
    target.dtype = dtype
    target.shape.extend(shape)
    target.data = data
    target.scalar = scalar


def _fill_holder(value, obj, depth=0):
    _fill_ndarray(value, obj.dtype, obj.shape, obj.data, obj.scalar)


def _fill_pickled(value, obj, depth=0):
    value.pickle_value = obj.data


def _fill_pickle(value, obj, depth=0):
    value.pickle_value = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


_FILLERS = {
    type(None): _fill_none,
    bool: _fill_bool,
    int: _fill_int,
    float: _fill_float,
    str: _fill_str,
    bytes: _fill_bytes,
    list: _fill_list,
    tuple: _fill_tuple,
    dict: _fill_dict,
    complex: _fill_complex,
    NdArray: _fill_holder,
    Pickled: _fill_pickled,
}

# Subclasses of these are pickled (lossless, Python to Python); when they
# cannot be, they travel as their base type.
_BASES = (int, float, complex, str, bytes, tuple, list, dict)


def _plain_dtype(dt):
    """True when raw bytes and dtype.str carry an array exactly."""
    return not dt.hasobject and dt.fields is None and dt.subdtype is None


def _fill_other(value, obj, depth):
    np = sys.modules.get("numpy")  # an array implies numpy is imported
    if np is not None:
        if type(obj) is np.ndarray and _plain_dtype(obj.dtype):
            return _fill_ndarray(value, obj.dtype.str, obj.shape, obj.tobytes(order="C"), False)
        if isinstance(obj, np.generic) and _plain_dtype(obj.dtype):
            return _fill_ndarray(value, obj.dtype.str, (), obj.tobytes(), True)
    try:
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    except RecursionError:
        raise
    except Exception:
        for base in _BASES:
            if isinstance(obj, base):
                return _FILLERS[base](value, base(obj), depth)
        raise
    value.pickle_value = data


# ---------------------------------------------------------------- decoding


def from_value(value):
    """The Python object a Value carries. Raises ValueError for a Value with
    no kind, or a dict Python cannot hold (unhashable or equal keys)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise ValueError("a Value with no kind")
    return _DECODERS[kind](getattr(value, kind))


def _dec_dict(d):
    pairs = [(from_value(e.key), from_value(e.value)) for e in d.entries]
    try:
        result = dict(pairs)
    except TypeError as e:
        raise ValueError(f"a dict Python cannot hold as sent: {e}") from None
    if len(result) != len(pairs):
        raise ValueError(
            "a dict Python cannot hold as sent: some keys are equal in Python (such as 1, 1.0 and True)"
        )
    return result


def _dec_complex(c):
    return complex(c.real if c.HasField("real") else 0.0, c.imag if c.HasField("imag") else 0.0)


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _dec_ndarray(a):
    np = _numpy()
    if np is None:
        return NdArray(a.dtype, a.shape, a.data, a.scalar)
    dt = np.dtype(a.dtype)
    shape = () if a.scalar else tuple(a.shape)
    count = 1
    for n in shape:
        count *= n
    if count * dt.itemsize != len(a.data):
        raise ValueError(
            f"an array of dtype {a.dtype!r} and shape {shape} needs "
            f"{count * dt.itemsize} bytes, not {len(a.data)}"
        )
    if count == 0 or dt.itemsize == 0:
        array = np.zeros(shape, dtype=dt)
    else:
        array = np.frombuffer(a.data, dtype=dt).reshape(shape).copy()
    return array[()] if a.scalar else array


def _dec_pickle(data):
    try:
        return pickle.loads(data)
    except Exception as e:
        return Pickled(data, f"{type(e).__name__}: {e}")


_DECODERS = {
    "null_value": lambda _: None,
    "bool_value": bool,
    "int_value": int,
    "big_int_value": lambda b: int.from_bytes(b, "big", signed=True),
    "double_value": float,
    "string_value": str,
    "bytes_value": bytes,
    "list_value": lambda items: [from_value(v) for v in items.items],
    "tuple_value": lambda items: tuple(from_value(v) for v in items.items),
    "dict_value": _dec_dict,
    "complex_value": _dec_complex,
    "ndarray_value": _dec_ndarray,
    "pickle_value": _dec_pickle,
}


def parameters_to_pb(parameters):
    """A name -> value mapping as a list of Parameter messages, in order."""
    if not parameters:
        return []
    out = []
    for name, v in parameters.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, not {type(name).__name__}: {name!r}")
        out.append(value_pb2.Parameter(name=name, value=to_value(v)))
    return out


def parameters_from_pb(parameters):
    """Parameter messages as a dict of name -> Python value."""
    return {p.name: from_value(p.value) for p in parameters}
