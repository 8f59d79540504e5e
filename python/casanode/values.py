"""Python objects <-> casa.node.v1.Value (SEMANTICS rule 8), losslessly.

None, bool, int of any size, float (nan, inf and -0.0 kept), str, bytes, list,
tuple, dict with any keys in insertion order, complex, numpy arrays and scalars
(when numpy is used), and anything else by pickle.

    to_value(obj) -> Value       from_value(value) -> obj

For frames: value_buffers / parameter_buffers give the serialized bytes as
buffers, large leaves uncopied, and parse_value reads a serialized Value
around its large leaves (a SplitValue, which from_value decodes too).

A numpy array arriving where numpy is not installed becomes an `NdArray`
holder, and a pickle this process cannot load a `Pickled` holder; both convert
back to the same Value.
"""

import pickle
import sys
import threading
import weakref

from google.protobuf.descriptor import FieldDescriptor

from ._pb.casa.node.v1 import envelope_pb2, value_pb2
from .shm import SharedError

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


# The deepest a Value nests, in protobuf messages (CONSTANT_MAX_VALUE_DEPTH
# of envelope.proto, which says how they are counted and why the bound is
# what it is). to_value pickles a deeper value whole; from_value refuses
# one, as the Rust side and the worker do.
MAX_DEPTH = envelope_pb2.CONSTANT_MAX_VALUE_DEPTH


class _TooDeep(Exception):
    pass


def _too_deep():
    return ValueError(f"a value nests lists, tuples and dicts deeper than {MAX_DEPTH} protobuf messages")


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
    """Fills `value`, which has `depth` protobuf messages above it, with
    obj's Value; raises _TooDeep if that nests past MAX_DEPTH."""
    if depth >= MAX_DEPTH:  # the Value itself is one level more
        raise _TooDeep
    fill = _FILLERS.get(type(obj))
    if fill is None:
        _fill_other(value, obj, depth)
    else:
        fill(value, obj, depth)


def _fill_none(value, obj, depth=0):
    if depth + 2 > MAX_DEPTH:  # Value, Null
        raise _TooDeep
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
    if depth + 2 > MAX_DEPTH:  # Value, ValueList; the items check themselves
        raise _TooDeep
    target.SetInParent()
    for item in items:
        _fill(target.items.add(), item, depth + 2)


def _fill_list(value, obj, depth=0):
    _fill_items(value.list_value, obj, depth)


def _fill_tuple(value, obj, depth=0):
    _fill_items(value.tuple_value, obj, depth)


def _fill_dict(value, obj, depth=0):
    if depth + 2 > MAX_DEPTH:  # Value, Dict; the keys and values check themselves
        raise _TooDeep
    target = value.dict_value
    target.SetInParent()
    for key, item in obj.items():
        entry = target.entries.add()
        _fill(entry.key, key, depth + 3)
        _fill(entry.value, item, depth + 3)


def _fill_complex(value, obj, depth=0):
    if depth + 2 > MAX_DEPTH:  # Value, Complex
        raise _TooDeep
    value.complex_value.real = obj.real
    value.complex_value.imag = obj.imag


def _fill_ndarray(value, dtype, shape, data, scalar, depth):
    if depth + 2 > MAX_DEPTH:  # Value, NdArray
        raise _TooDeep
    target = value.ndarray_value
    target.SetInParent()
    target.dtype = dtype
    target.shape.extend(shape)
    target.data = data
    target.scalar = scalar


def _fill_holder(value, obj, depth=0):
    _fill_ndarray(value, obj.dtype, obj.shape, obj.data, obj.scalar, depth)


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
            return _fill_ndarray(value, obj.dtype.str, obj.shape, obj.tobytes(order="C"), False, depth)
        if isinstance(obj, np.generic) and _plain_dtype(obj.dtype):
            return _fill_ndarray(value, obj.dtype.str, (), obj.tobytes(), True, depth)
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


def from_value(value, level=1):
    """The Python object a Value carries (`level` is the Value's depth in
    protobuf messages, see MAX_DEPTH). Raises ValueError for a Value with no
    kind, one nested deeper than MAX_DEPTH, or a dict Python cannot hold
    (unhashable or equal keys)."""
    if type(value) is SplitValue:
        return _dec_split(value, level)
    kind = value.WhichOneof("kind")
    if kind is None:
        raise ValueError("a Value with no kind")
    return _DECODERS[kind](getattr(value, kind), level)


def _dec_items(items, level):
    """The items of a ValueList under a Value at `level`, decoded."""
    if level >= MAX_DEPTH or (level + 2 > MAX_DEPTH and items):  # ValueList, the items
        raise _too_deep()
    return [from_value(v, level + 2) for v in items]


def _check_entries(entries, level):
    """Refuses the entries of a Dict under a Value at `level` if they nest
    too deep."""
    if level >= MAX_DEPTH or (level + 3 > MAX_DEPTH and entries):  # Dict, DictEntry, keys
        raise _too_deep()


def _dec_dict(d, level):
    entries = d.entries
    _check_entries(entries, level)
    level += 3
    return _dict_from_pairs([(from_value(e.key, level), from_value(e.value, level)) for e in entries])


def _dict_from_pairs(pairs):
    """A dict of decoded (key, value) pairs, refusing keys Python merges."""
    try:
        result = dict(pairs)
    except TypeError as e:
        raise ValueError(f"a dict Python cannot hold as sent: {e}") from None
    if len(result) != len(pairs):
        raise ValueError(
            "a dict Python cannot hold as sent: some keys are equal in Python (such as 1, 1.0 and True)"
        )
    return result


def _dec_complex(c, level):
    if level >= MAX_DEPTH:  # Complex
        raise _too_deep()
    return complex(c.real if c.HasField("real") else 0.0, c.imag if c.HasField("imag") else 0.0)


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _dec_ndarray(a, level):
    if level >= MAX_DEPTH:  # NdArray
        raise _too_deep()
    if a.HasField("shared"):
        return _make_ndarray(a.dtype, a.shape, SharedRef(a.shared.name, a.shared.length), a.scalar)
    # Each read of a bytes field copies it: read `data` once.
    return _make_ndarray(a.dtype, a.shape, a.data, a.scalar)


class SharedRef:
    """A SharedBytes reference as parsed: the file's name and length."""

    __slots__ = ("name", "length")

    def __init__(self, name, length):
        self.name = name
        self.length = length


# Shared-memory files this process claimed (see claim_shared), by name: the
# shm.Claimed file, or the SharedError that says why the reference is bad.
_MAPPED = {}
# Arrays this process sent through shared memory, by file name: what a
# response's parameters (as submitted) decode to, the file being gone.
_SENT = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def _shared_memory(ref):
    with _shared_lock:
        memory = _MAPPED.get(ref.name)
        sent = _SENT.get(ref.name) if memory is None else None
    if isinstance(memory, Exception):
        raise SharedError(str(memory))
    if memory is None and sent is None:
        raise SharedError(f"shared-memory file {ref.name!r} is not mapped in this process")
    if memory is not None:
        if memory.length != ref.length:
            raise SharedError(f"shared-memory file {ref.name!r} is referenced with two lengths")
        memory = memory.map()  # each decode a mapping of its own
    return memory, sent


def claim_shared(value, directory):
    """Claims (opens and unlinks) the shared-memory files `value`
    references (a Value or a SplitValue), with `directory` a shm.SharedDir;
    returns their names, for release_shared. Each decode of the value maps
    them afresh (copy-on-write, no copy). A bad reference is recorded:
    decoding the value then raises SharedError saying why."""
    names = []
    for ref in _shared_refs(value):
        try:
            memory = directory.claim(ref.name, ref.length)
        except SharedError as e:
            memory = e
        with _shared_lock:
            _MAPPED[ref.name] = memory
        names.append(ref.name)
    return names


def release_shared(names):
    """Forgets the files claim_shared claimed (arrays made over them keep
    their memory until they go)."""
    with _shared_lock:
        for name in names:
            _MAPPED.pop(name, None)


def _shared_refs(value):
    if type(value) is SplitValue:
        kind, data = value.kind, value.data
        if kind == "ndarray_value":
            if type(data[2]) is SharedRef:
                yield data[2]
        elif kind in ("list_value", "tuple_value"):
            for item in data:
                yield from _shared_refs(item)
        elif kind == "dict_value":
            for k, v in data:
                yield from _shared_refs(k)
                yield from _shared_refs(v)
        return
    kind = value.WhichOneof("kind")
    if kind == "ndarray_value":
        if value.ndarray_value.HasField("shared"):
            shared = value.ndarray_value.shared
            yield SharedRef(shared.name, shared.length)
    elif kind in ("list_value", "tuple_value"):
        for item in getattr(value, kind).items:
            yield from _shared_refs(item)
    elif kind == "dict_value":
        for entry in value.dict_value.entries:
            yield from _shared_refs(entry.key)
            yield from _shared_refs(entry.value)


def _make_ndarray(dtype, shape, data, scalar):
    """A writable array of its own (or an NdArray holder without numpy)
    from the fields of an NdArray; `data` is any bytes-like object, or a
    SharedRef: the array is then the file's mapping, uncopied."""
    mapped = False
    if type(data) is SharedRef:
        data, sent = _shared_memory(data)
        if sent is not None:
            return sent
        mapped = True
    np = _numpy()
    if np is None:
        return NdArray(dtype, shape, data, scalar)
    dt = np.dtype(dtype)
    shape = () if scalar else tuple(shape)
    count = 1
    for n in shape:
        count *= n
    if count * dt.itemsize != len(data):
        raise ValueError(
            f"an array of dtype {dtype!r} and shape {shape} needs "
            f"{count * dt.itemsize} bytes, not {len(data)}"
        )
    if count == 0 or dt.itemsize == 0:
        array = np.zeros(shape, dtype=dt)
    elif mapped:
        array = np.frombuffer(data, dtype=dt).reshape(shape)
    else:
        array = np.frombuffer(data, dtype=dt).reshape(shape).copy()
    return array[()] if scalar else array


def _dec_pickle(data, level=1):
    try:
        return pickle.loads(data)
    except Exception as e:
        return Pickled(data, f"{type(e).__name__}: {e}")


def _dec_null(_, level):
    if level >= MAX_DEPTH:  # Null
        raise _too_deep()


def _same(x, level):
    return x


# Each takes the kind's field and the Value's level.
_DECODERS = {
    "null_value": _dec_null,
    "bool_value": _same,
    "int_value": _same,
    "big_int_value": lambda b, _: int.from_bytes(b, "big", signed=True),
    "double_value": _same,
    "string_value": _same,
    "bytes_value": _same,
    "list_value": lambda items, level: _dec_items(items.items, level),
    "tuple_value": lambda items, level: tuple(_dec_items(items.items, level)),
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
    """Parameter messages as a dict of name -> Python value. A value sent
    through shared memory reads as the object sent, or None once that is
    gone (its file was the worker's to map)."""
    out = {}
    for p in parameters:
        try:
            out[p.name] = from_value(p.value)
        except SharedError:
            out[p.name] = None
    return out


def parameter_buffers(name, obj, shared=None):
    """The serialized Parameter message `name` = `obj`, as (buffers, size):
    the bytes-like pieces that concatenated make the same bytes as
    Parameter(name=name, value=to_value(obj)).SerializeToString(). Large
    leaves (arrays' data, bytes, pickles of LARGE bytes or more) are pieces
    of their own, not copied: a C-contiguous array's own memory is one.
    With `shared` (a shm.SharedDir), arrays of its threshold or more are
    written into files of it and travel as references."""
    if not isinstance(name, str):
        raise TypeError(f"parameter names must be str, not {type(name).__name__}: {name!r}")
    split = _split_top(obj, shared)
    parameter = value_pb2.Parameter(name=name)
    if split is None:
        _fill_top(parameter.value, obj)
        data = parameter.SerializeToString()
        return [data], len(data)
    head = parameter.SerializeToString()  # the name
    buffers, size = split
    head += _K_PARAMETER_VALUE + _varint(size)
    return [head, *buffers], len(head) + size


# ------------------------------------------------------------- large values
#
# A parameter or a return value may be an array of hundreds of megabytes.
# Through protobuf's Python classes it would be copied several times on each
# side (into the message, into the serialized bytes, out of each read of the
# field); here large leaves travel as their own buffers and arrive as slices
# of the received frame instead. The wire format is protobuf's, unchanged.

# Leaves of at least this many bytes travel as buffers of their own.
LARGE = 1 << 16
# Containers longer than this are encoded by protobuf, whatever they hold.
_SPLIT_ITEMS = 4096


_VARINTS = [bytes([n]) for n in range(128)]


def _varint(n):
    if n < 128:
        return _VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_FD = FieldDescriptor
_WIRE_TYPES = {
    _FD.TYPE_DOUBLE: 1, _FD.TYPE_FIXED64: 1, _FD.TYPE_SFIXED64: 1,
    _FD.TYPE_FLOAT: 5, _FD.TYPE_FIXED32: 5, _FD.TYPE_SFIXED32: 5,
    _FD.TYPE_STRING: 2, _FD.TYPE_BYTES: 2, _FD.TYPE_MESSAGE: 2,
}  # the other types are varints (0)


def field_number(message, name):
    """The number of field `name` of `message` (a generated message class),
    from its descriptor."""
    return message.DESCRIPTOR.fields_by_name[name].number


def field_key(message, name):
    """The bytes that open field `name` of `message` (a generated message
    class) on the wire, from its descriptor: the field's number and wire
    type, as protobuf writes them. The hand-written encoders and parsers of
    casanode take every field number from these two, never from literals."""
    field = message.DESCRIPTOR.fields_by_name[name]
    wire = 2 if field.is_packed else _WIRE_TYPES.get(field.type, 0)
    return _varint(field.number << 3 | wire)


_K_BYTES = field_key(Value, "bytes_value")
_K_LIST = field_key(Value, "list_value")
_K_TUPLE = field_key(Value, "tuple_value")
_K_DICT = field_key(Value, "dict_value")
_K_NDARRAY = field_key(Value, "ndarray_value")
_K_PICKLE = field_key(Value, "pickle_value")
_K_ITEM = field_key(value_pb2.ValueList, "items")
_K_ENTRY = field_key(value_pb2.Dict, "entries")
_K_ENTRY_KEY = field_key(value_pb2.DictEntry, "key")
_K_ENTRY_VALUE = field_key(value_pb2.DictEntry, "value")
_K_ARRAY_DATA = field_key(value_pb2.NdArray, "data")
_ARRAY_SCALAR = field_key(value_pb2.NdArray, "scalar") + _varint(1)  # scalar = true
_K_PARAMETER_VALUE = field_key(value_pb2.Parameter, "value")


def _fill_top(value, obj):
    """Fills `value` with obj's Value as to_value does."""
    try:
        _fill(value, obj, 0)
    except (_TooDeep, RecursionError):
        value.Clear()
        value.pickle_value = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


def value_buffers(obj):
    """The serialized to_value(obj), as (buffers, size) like parameter_buffers."""
    split = _split_top(obj)
    if split is None:
        value = Value()
        _fill_top(value, obj)
        data = value.SerializeToString()
        return [data], len(data)
    return split


def _split_top(obj, shared=None):
    try:
        return _split(obj, 0, shared)
    except (_TooDeep, RecursionError):
        return None  # to_value pickles it whole


def _field(tag, buffers, size):
    """A length-delimited field of `size` bytes in `buffers`, with its tag."""
    head = tag + _varint(size)
    buffers.insert(0, head)
    return buffers, len(head) + size


def _bytes_value(tag, data):
    """A Value holding one bytes field (bytes_value, pickle_value)."""
    return _field(tag, [data], len(data))


def _ndarray_value(dtype, shape, data, size, scalar):
    """A Value holding an NdArray whose data is the buffer `data` of `size`
    bytes."""
    head = value_pb2.NdArray(dtype=dtype, shape=shape).SerializeToString() + _K_ARRAY_DATA + _varint(size)
    buffers = [head, data]
    size += len(head)
    if scalar:
        buffers.append(_ARRAY_SCALAR)
        size += len(_ARRAY_SCALAR)
    return _field(_K_NDARRAY, buffers, size)


def _shared_ndarray_value(np, shared, obj):
    """A Value holding an NdArray whose elements went into a new file of
    the shared-memory directory."""
    name = shared.write_array(np, obj)
    _SENT[name] = obj
    message = value_pb2.NdArray(
        dtype=obj.dtype.str, shape=obj.shape, shared=value_pb2.SharedBytes(name=name, length=obj.nbytes)
    ).SerializeToString()
    return _field(_K_NDARRAY, [message], len(message))


def _array_buffer(np, obj):
    """The array's bytes in C order, as a buffer: its own memory when it is
    C-contiguous, else a copy."""
    if obj.flags.c_contiguous:
        return memoryview(obj.reshape(-1).view(np.uint8))
    return obj.tobytes(order="C")


def _small(obj, depth):
    value = Value()
    _fill(value, obj, depth)
    data = value.SerializeToString()
    return [data], len(data)


def _split(obj, depth, shared=None):
    """obj's serialized Value as (buffers, size) with its large leaves as
    buffers of their own, or None when it has none (protobuf encodes it
    then). Raises _TooDeep as _fill does."""
    if depth >= MAX_DEPTH:
        raise _TooDeep
    t = type(obj)
    if t is bytes:
        return _bytes_value(_K_BYTES, obj) if len(obj) >= LARGE else None
    if t is list or t is tuple:
        if not obj or len(obj) > _SPLIT_ITEMS:
            return None
        parts = [_split(item, depth + 2, shared) for item in obj]
        if not any(parts):
            return None
        buffers, size = [], 0
        for item, part in zip(obj, parts):
            item_buffers, item_size = part or _small(item, depth + 2)
            item_buffers, item_size = _field(_K_ITEM, item_buffers, item_size)
            buffers += item_buffers
            size += item_size
        return _field(_K_LIST if t is list else _K_TUPLE, buffers, size)
    if t is dict:
        if not obj or len(obj) > _SPLIT_ITEMS:
            return None
        parts = [(_split(k, depth + 3, shared), _split(v, depth + 3, shared)) for k, v in obj.items()]
        if not any(k or v for k, v in parts):
            return None
        buffers, size = [], 0
        for (key, item), (key_part, item_part) in zip(obj.items(), parts):
            key_buffers, key_size = _field(_K_ENTRY_KEY, *(key_part or _small(key, depth + 3)))
            item_buffers, item_size = _field(_K_ENTRY_VALUE, *(item_part or _small(item, depth + 3)))
            entry_buffers, entry_size = _field(_K_ENTRY, key_buffers + item_buffers, key_size + item_size)
            buffers += entry_buffers
            size += entry_size
        return _field(_K_DICT, buffers, size)
    if t in _FILLERS:
        if t is NdArray and len(obj.data) >= LARGE:
            if depth + 2 > MAX_DEPTH:  # Value, NdArray
                raise _TooDeep
            return _ndarray_value(obj.dtype, obj.shape, obj.data, len(obj.data), obj.scalar)
        if t is Pickled and len(obj.data) >= LARGE:
            return _bytes_value(_K_PICKLE, obj.data)
        return None
    np = sys.modules.get("numpy")
    if np is not None:
        if t is np.ndarray and _plain_dtype(obj.dtype):
            if depth + 2 > MAX_DEPTH:  # Value, NdArray
                raise _TooDeep
            if shared is not None and shared.threshold and obj.nbytes >= max(shared.threshold, 1):
                return _shared_ndarray_value(np, shared, obj)
            if obj.nbytes < LARGE:
                return None
            return _ndarray_value(obj.dtype.str, obj.shape, _array_buffer(np, obj), obj.nbytes, False)
        if isinstance(obj, np.generic) and _plain_dtype(obj.dtype):
            return None
    try:
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    except Exception:  # protobuf's path says what is wrong, or sends a base type
        return None
    return _bytes_value(_K_PICKLE, data)


class SplitValue:
    """A Value parsed from a large frame: its small parts by protobuf, its
    large leaves kept as slices of the frame (see parse_value). from_value
    decodes it as it would the Value."""

    __slots__ = ("kind", "data")

    def __init__(self, kind, data):
        self.kind = kind
        self.data = data

    def __repr__(self):
        return f"SplitValue({self.kind})"


def _dec_split(value, level):
    kind, data = value.kind, value.data
    if kind == "ndarray_value":
        if level >= MAX_DEPTH:  # NdArray
            raise _too_deep()
        return _make_ndarray(*data)
    if kind == "bytes_value":
        return bytes(data)
    if kind == "pickle_value":
        return _dec_pickle(data)  # loads copies what it keeps
    if kind == "big_int_value":
        return int.from_bytes(data, "big", signed=True)
    if kind == "list_value":
        return _dec_items(data, level)
    if kind == "tuple_value":
        return tuple(_dec_items(data, level))
    # dict_value
    _check_entries(data, level)
    level += 3
    return _dict_from_pairs([(from_value(k, level), from_value(v, level)) for k, v in data])


class Irregular(Exception):
    """Wire data parse_value leaves to protobuf: an encoding other than the
    plain one (repeated singular fields, groups), or malformed data."""


def read_varint(view, i):
    """The varint at view[i:] and the index after it."""
    n = shift = 0
    while True:
        try:
            b = view[i]
        except IndexError:
            raise Irregular("truncated") from None
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7
        if shift > 63:
            raise Irregular("varint too long")


def fields(view):
    """(field number, wire type, value, start, end) for each field of the
    message in `view` (a memoryview of bytes): value is the int of a varint
    or fixed field, or the slice of a length-delimited one; view[start:end]
    is the whole field, tag included."""
    i, end = 0, len(view)
    while i < end:
        start = i
        key, i = read_varint(view, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise Irregular("field number 0")
        if wire == 0:
            value, i = read_varint(view, i)
        elif wire == 2:
            length, i = read_varint(view, i)
            if i + length > end:
                raise Irregular("truncated")
            value = view[i:i + length]
            i += length
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if i + width > end:
                raise Irregular("truncated")
            value = int.from_bytes(view[i:i + width], "little")
            i += width
        else:
            raise Irregular("groups")
        yield number, wire, value, start, i


# Containers with more items than this are parsed by protobuf, whatever
# they hold (walking them in Python would cost more than it saves).
_WALK_ITEMS = 256
# Value fields kept as slices, by number: bytes fields that may be large.
_SPLIT_BYTES = {field_number(Value, name): name for name in ("big_int_value", "bytes_value", "pickle_value")}
_N_LIST = field_number(Value, "list_value")
_N_TUPLE = field_number(Value, "tuple_value")
_N_DICT = field_number(Value, "dict_value")
_N_NDARRAY = field_number(Value, "ndarray_value")
_N_ITEMS = field_number(value_pb2.ValueList, "items")
_N_ENTRIES = field_number(value_pb2.Dict, "entries")
_N_ENTRY_KEY = field_number(value_pb2.DictEntry, "key")
_N_ENTRY_VALUE = field_number(value_pb2.DictEntry, "value")
_N_DTYPE, _N_SHAPE, _N_DATA, _N_SCALAR, _N_SHARED = (
    field_number(value_pb2.NdArray, name) for name in ("dtype", "shape", "data", "scalar", "shared")
)
_NDARRAY_FIELDS = frozenset(f.number for f in value_pb2.NdArray.DESCRIPTOR.fields)
_MAX_NESTING = 100  # protobuf's own limit


def parse_value(view, depth=0):
    """The Value serialized in `view` (a memoryview of bytes), for
    from_value: a Value message when small, else a SplitValue whose large
    leaves are slices of `view`. Raises protobuf's DecodeError for data
    protobuf refuses."""
    if len(view) < LARGE:
        return Value.FromString(bytes(view))
    try:
        return _parse_split(view, depth)
    except (Irregular, UnicodeDecodeError):
        return Value.FromString(bytes(view))  # protobuf decides


def _parse_split(view, depth):
    if depth > _MAX_NESTING:
        raise Irregular("too deep")
    parsed = list(fields(view))
    if len(parsed) != 1:
        raise Irregular("not one field")
    [(number, wire, data, _, _)] = parsed
    if wire != 2:
        raise Irregular("a scalar kind")
    if number in _SPLIT_BYTES:
        return SplitValue(_SPLIT_BYTES[number], data)
    if number == _N_NDARRAY:
        dtype, shape, array, scalar = "", [], b"", False
        shared = None
        for n, w, v, _, _ in fields(data):
            if n == _N_DTYPE and w == 2:
                dtype = str(v, "utf-8")
            elif n == _N_SHAPE and w == 2:
                j = 0
                while j < len(v):
                    x, j = read_varint(v, j)
                    shape.append(x)
            elif n == _N_SHAPE and w == 0:
                shape.append(v)
            elif n == _N_DATA and w == 2:
                array = v
            elif n == _N_SCALAR and w == 0:
                scalar = bool(v)
            elif n == _N_SHARED and w == 2:
                shared = value_pb2.SharedBytes.FromString(bytes(v))
            elif n in _NDARRAY_FIELDS:
                raise Irregular("wire type")
        if shared is not None:
            array = SharedRef(shared.name, shared.length)
        return SplitValue("ndarray_value", (dtype, shape, array, scalar))
    if number == _N_LIST or number == _N_TUPLE:
        items = [parse_value(v, depth + 2) for v in _large_items(data, _N_ITEMS)]
        return SplitValue("list_value" if number == _N_LIST else "tuple_value", items)
    if number == _N_DICT:
        entries = [_parse_entry(v, depth + 3) for v in _large_items(data, _N_ENTRIES)]
        return SplitValue("dict_value", entries)
    raise Irregular("a small kind")


def _large_items(view, number):
    """The items (field `number`) of a ValueList or Dict, when few enough
    to walk and one at least is large; else Irregular, for protobuf to
    parse the container whole."""
    items = []
    large = False
    for n, w, v, _, _ in fields(view):
        if n == number:
            if w != 2 or len(items) == _WALK_ITEMS:
                raise Irregular("mistyped, or too many items to walk")
            items.append(v)
            large = large or len(v) >= LARGE
    if not large:
        raise Irregular("no large item")
    return items


def _parse_entry(view, depth):
    key = item = None
    for n, w, v, _, _ in fields(view):
        if n == _N_ENTRY_KEY or n == _N_ENTRY_VALUE:
            if w != 2 or (key if n == _N_ENTRY_KEY else item) is not None:
                raise Irregular("a repeated or mistyped entry field")
            if n == _N_ENTRY_KEY:
                key = parse_value(v, depth)
            else:
                item = parse_value(v, depth)
    return (key if key is not None else Value(), item if item is not None else Value())
