"""casa-node's Python worker: the interpreter of one server node.

The server node's executor (crates/node/src/executor/) starts it as
``PYTHON -u -c SOURCE`` and speaks to it over three pipes whose descriptors
it names in CASA_NODE_WORKER_FDS ("COMMANDS,RESULTS,CONTROL"); stdin, stdout
and stderr are left to user code. Every message is a frame: a 4-byte
big-endian length, then the bytes of a protobuf ``casa.node.v1.Envelope``.

- COMMANDS (executor -> worker, read by the main thread between commands):
  CommandRequest, and ControlRequest Start / SetLogLevel.
- RESULTS (worker -> executor): one ControlResponse once the namespace is
  ready (ok = False and the traceback if the init script raised), one
  CommandResponse per command, and LogRecords for the lines written to
  sys.stdout (INFO) and sys.stderr (WARNING) and for ``logging`` records.
  A LogRecord's ``origin`` says which: "stdout", "stderr" or "logging".
- CONTROL (executor -> worker, read by a thread): ControlRequest Cancel
  {request_id}. If that command runs, or is about to run, the thread sends
  SIGINT to the main thread (again, until its handler has run), so
  KeyboardInterrupt is raised inside it even in a blocking call, once; an
  interrupt for a command that already ended is ignored. A SIGINT from
  elsewhere interrupts a running command too, and is ignored while the
  worker is idle. The same thread watches the COMMANDS pipe: when either
  pipe closes (the executor closed it or its process died) the worker exits
  at once, even in the middle of a command, so no orphan is left behind.

The codec below is a hand-written subset of protobuf: it reads and writes
exactly what prost writes (fields in number order, default scalars left out
except in oneofs and ``optional`` fields, packed repeated scalars), so the
bytes agree with the Rust side. Standard library only; Python 3.8 or newer.
numpy is imported only when an array has to be built; without numpy an
array travels as an NdArray holder that re-encodes to the same bytes.

The codec keeps the protocol's bounds: a frame is at most _MAX_FRAME bytes,
and a value nests at most _MAX_DEPTH protobuf messages. With no protobuf
runtime this file cannot read them (nor field numbers) from the
descriptors, so it spells them out: python/tests/test_wire.py checks each
number it names against envelope.proto's Constant enum and the messages'
descriptors, crates/node/tests/worker_codec.rs against the protocol crate,
and the codec's tests check the bytes it reads and writes against prost's
and protobuf's. Decoding refuses anything else with a
DecodeError, as it refuses malformed bytes; it raises no other exception
(but UnicodeDecodeError, for a string that is not UTF-8), and makes at most
a few dozen bytes of Python objects per byte of input. Encoding pickles a
value nested deeper than the bound whole, so what the worker sends never
breaks it.

With CASA_NODE_WORKER_MODE=codec-echo the worker only echoes values over
stdin/stdout (see _codec_echo), for the codec's tests. Loaded as a module
(__name__ other than "__main__") it defines the codec and runs nothing.
"""

import sys

if sys.version_info < (3, 8):
    sys.stderr.write(
        "casa-node: the Python worker needs Python 3.8 or newer; %s is Python %s\n"
        % (sys.executable, sys.version.split()[0])
    )
    sys.exit(2)

import builtins
import faulthandler
import io
import logging
import mmap
import os
import pickle
import re
import select
import signal
import struct
import threading
import time
import traceback
import types

# CONSTANT_PROTOCOL_VERSION.
PROTOCOL_VERSION = 1

# CommandMode
AUTO, EVAL, EXEC, PUSH = 1, 2, 3, 4
# LogLevel
L_DEBUG, L_INFO, L_WARNING, L_ERROR, L_CRITICAL = 1, 2, 3, 4, 5
_PY_LEVELS = {
    L_DEBUG: logging.DEBUG,
    L_INFO: logging.INFO,
    L_WARNING: logging.WARNING,
    L_ERROR: logging.ERROR,
    L_CRITICAL: logging.CRITICAL,
}

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_U64 = (1 << 64) - 1
_PICKLE_PROTOCOL = pickle.DEFAULT_PROTOCOL
# How often an interrupt is signalled again until its handler has run.
_RESEND_MS = 20
# Payloads at least this large are written without being copied into a
# frame buffer first.
_BIG = 1 << 16
# The largest frame read: CONSTANT_MAX_FRAME.
_MAX_FRAME = 1 << 30
# The deepest a value nests, in protobuf messages: CONSTANT_MAX_VALUE_DEPTH.
# The Value itself is 1 level; None, complex and arrays add 1 (Null,
# Complex, NdArray), a list or tuple 2 (ValueList, the items' Values), a
# dict 3 (Dict, DictEntry, the keys' and values' Values). Protobuf decoders
# (prost, Python's upb) refuse messages nested more than 100 deep, and a
# value sits up to 3 levels down in an envelope.
_MAX_DEPTH = 96
_TOO_DEEP = "a value nests lists, tuples and dicts deeper than %d protobuf messages" % _MAX_DEPTH

_pack_d = struct.Struct("<d").pack
_unpack_d = struct.Struct("<d").unpack_from
_pack_len = struct.Struct(">I").pack
_unpack_len = struct.Struct(">I").unpack_from


class DecodeError(ValueError):
    """A frame that is not valid protobuf for the message expected."""


# ---------------------------------------------------------------------------
# Shared memory (SharedBytes in value.proto): with CASA_NODE_SHM_DIR set (the
# server node leaves it in START only when this host holds the cluster's
# directory), parameters may arrive as files of that directory, mapped here
# copy-on-write and unlinked, and return values of CASA_NODE_SHM_THRESHOLD
# bytes or more (1 MiB by default; 0: never) leave as such files.

_SHM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}\Z")
_shm_state = {"key": None, "dir": None}


class _ShmDir(object):
    def __init__(self, path, tag):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise ValueError("%s is not a private directory of this user" % path)
            tfd = os.open("tag", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
            try:
                found = os.read(tfd, 256).decode("ascii", "replace")
            finally:
                os.close(tfd)
            if not tag or found != tag:
                raise ValueError("%s is not this cluster's directory" % path)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        text = os.environ.get("CASA_NODE_SHM_THRESHOLD", "").strip()
        try:
            self.threshold = int(text) if text else 1 << 20
        except ValueError:
            self.threshold = 1 << 20

    def unlink(self, name):
        try:
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            pass

    def map(self, name, length):
        if not (_SHM_NAME.match(name) and not name.startswith(".")):
            raise ValueError("invalid shared-memory file name %r" % (name,))
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except OSError as e:
            raise ValueError("shared-memory file %r: %s" % (name, e.strerror))
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000):
                raise ValueError("shared-memory file %r: not a regular file" % (name,))
            if st.st_uid != os.getuid():
                raise ValueError("shared-memory file %r: belongs to another user" % (name,))
            if st.st_size < length:
                raise ValueError(
                    "shared-memory file %r: %d bytes, shorter than the %d of the value"
                    % (name, st.st_size, length)
                )
            if length:
                memory = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                memory = bytearray()
        finally:
            os.close(fd)
        self.unlink(name)
        return memory

    def write_array(self, np, a):
        tmp = "tmp-%d-%s" % (os.getpid(), os.urandom(8).hex())
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            n = a.nbytes
            if a.flags.c_contiguous:
                view = memoryview(a.reshape(-1).view(np.uint8))
                done = 0
                while done < n:
                    done += os.write(fd, view[done:done + (1 << 30)])
            else:
                os.posix_fallocate(fd, 0, n)
                with mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                    target = np.frombuffer(mm, dtype=a.dtype).reshape(a.shape)
                    np.copyto(target, a)
                    del target
            name = "v-" + os.urandom(12).hex()
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            return name
        except BaseException:
            self.unlink(tmp)
            raise
        finally:
            os.close(fd)


def _shm():
    """The cluster's shared-memory directory, or None when this worker may
    not use one."""
    key = (os.environ.get("CASA_NODE_SHM_DIR", ""), os.environ.get("CASA_NODE_SHM_TAG", ""))
    if key != _shm_state["key"]:
        _shm_state["key"] = key
        old, _shm_state["dir"] = _shm_state["dir"], None
        if old is not None:
            os.close(old.fd)
        if key[0]:
            try:
                _shm_state["dir"] = _ShmDir(key[0], key[1])
            except (OSError, ValueError):
                pass
    return _shm_state["dir"]


# Files written for the value being encoded: unlinked if it is not sent.
_written = []


def _unlink_written():
    d = _shm()
    for name in _written:
        if d is not None:
            d.unlink(name)
    del _written[:]


# ---------------------------------------------------------------------------
# Holders for what Python cannot hold as a plain value.


class NdArray(object):
    """A numpy array or scalar carried without numpy (or in codec-echo mode):
    numpy's dtype.str, the shape, the C-order bytes and the scalar flag, as
    in value.proto's NdArray. Encodes back to the same bytes."""

    __slots__ = ("dtype", "shape", "data", "scalar")

    def __init__(self, dtype, shape, data, scalar=False):
        self.dtype = dtype
        self.shape = tuple(shape)
        self.data = bytes(data)
        self.scalar = bool(scalar)

    def _key(self):
        return (self.dtype, self.shape, self.data, self.scalar)

    def __eq__(self, other):
        return type(other) is NdArray and self._key() == other._key()

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((NdArray, self._key()))

    def __repr__(self):
        return "NdArray(dtype=%r, shape=%r, <%d bytes>%s)" % (
            self.dtype,
            self.shape,
            len(self.data),
            ", scalar" if self.scalar else "",
        )


class Pickled(object):
    """A pickle kept as bytes, not loaded (codec-echo mode)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = bytes(data)

    def __eq__(self, other):
        return type(other) is Pickled and self.data == other.data

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((Pickled, self.data))

    def __repr__(self):
        return "Pickled(<%d bytes>)" % len(self.data)


class DictEntries(list):
    """The (key, value) pairs of a dict that a Python dict cannot hold as
    given: an unhashable key, or keys Python takes as equal (1 and True).
    Only made in codec-echo mode; commands get an error instead."""

    __slots__ = ()


# ---------------------------------------------------------------------------
# Decoding


def _varint(buf, pos):
    try:
        b = buf[pos]
        if b < 0x80:
            return b, pos + 1
        result = b & 0x7F
        shift = 7
        pos += 1
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result & _U64, pos
            shift += 7
            if shift > 63:
                raise DecodeError("varint longer than 10 bytes")
    except IndexError:
        raise DecodeError("varint runs past the end of the frame") from None


def _span(buf, pos, end):
    """The bounds of a length-delimited field whose length starts at pos."""
    if pos >= end:
        raise DecodeError("field runs past the end of its message")
    n = buf[pos]
    if n < 0x80:
        pos += 1
    else:
        n, pos = _varint(buf, pos)
    stop = pos + n
    if stop > end:
        raise DecodeError("field runs past the end of its message")
    return pos, stop


def _skip(buf, pos, wire_type, end):
    if wire_type == 0:
        _, pos = _varint(buf, pos)
    elif wire_type == 1:
        pos += 8
    elif wire_type == 2:
        _, pos = _span(buf, pos, end)
    elif wire_type == 5:
        pos += 4
    else:
        raise DecodeError("unsupported wire type %d" % wire_type)
    if pos > end:
        raise DecodeError("field runs past the end of its message")
    return pos


def _tag(buf, pos):
    t = buf[pos]
    if t < 0x80:
        return t, pos + 1
    return _varint(buf, pos)


def _double(buf, pos, end):
    if pos + 8 > end:
        raise DecodeError("truncated double")
    return _unpack_d(buf, pos)[0], pos + 8


def _int32(n):
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n & 0x80000000 else n


def _ended(pos, end):
    """Checks that a message's last field ended at its end."""
    if pos != end:
        raise DecodeError("field runs past the end of its message")


def _dec_value(buf, mv, pos, end, raw, level=1):
    """A Value's Python object. raw (codec-echo mode) keeps pickles and
    arrays as Pickled / NdArray holders and odd dicts as DictEntries;
    otherwise pickles are loaded, arrays built with numpy when it is
    installed, and a dict Python cannot hold is an error. level is the
    Value's depth in protobuf messages (see _MAX_DEPTH)."""
    if level > _MAX_DEPTH:
        raise DecodeError(_TOO_DEEP)
    value = None
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos)
        if tag == 0x18:  # int_value, sint64
            n, pos = _varint(buf, pos)
            value = (n >> 1) ^ -(n & 1)
        elif tag == 0x32:  # string_value
            a, pos = _span(buf, pos, end)
            value = str(mv[a:pos], "utf-8")
        elif tag == 0x29:  # double_value
            value, pos = _double(buf, pos, end)
        elif tag == 0x0A:  # null_value
            if level >= _MAX_DEPTH:
                raise DecodeError(_TOO_DEEP)
            _, pos = _span(buf, pos, end)
            value = None
        elif tag == 0x10:  # bool_value
            n, pos = _varint(buf, pos)
            value = n != 0
        elif tag == 0x22:  # big_int_value
            a, pos = _span(buf, pos, end)
            value = int.from_bytes(mv[a:pos], "big", signed=True)
        elif tag == 0x3A:  # bytes_value
            a, pos = _span(buf, pos, end)
            value = bytes(mv[a:pos])
        elif tag == 0x42:  # list_value
            a, pos = _span(buf, pos, end)
            value = _dec_items(buf, mv, a, pos, raw, level + 1)
        elif tag == 0x4A:  # tuple_value
            a, pos = _span(buf, pos, end)
            value = tuple(_dec_items(buf, mv, a, pos, raw, level + 1))
        elif tag == 0x52:  # dict_value
            a, pos = _span(buf, pos, end)
            value = _dec_dict(buf, mv, a, pos, raw, level + 1)
        elif tag == 0x5A:  # complex_value
            if level >= _MAX_DEPTH:
                raise DecodeError(_TOO_DEEP)
            a, pos = _span(buf, pos, end)
            value = _dec_complex(buf, a, pos)
        elif tag == 0x62:  # ndarray_value
            if level >= _MAX_DEPTH:
                raise DecodeError(_TOO_DEEP)
            a, pos = _span(buf, pos, end)
            value = _dec_ndarray(buf, mv, a, pos, raw)
        elif tag == 0x6A:  # pickle_value
            a, pos = _span(buf, pos, end)
            value = Pickled(mv[a:pos]) if raw else pickle.loads(mv[a:pos])
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    return value


def _dec_items(buf, mv, pos, end, raw, level):
    if level > _MAX_DEPTH:
        raise DecodeError(_TOO_DEEP)
    items = []
    while pos < end:
        tag, pos = _tag(buf, pos)
        if tag == 0x0A:
            a, pos = _span(buf, pos, end)
            items.append(_dec_value(buf, mv, a, pos, raw, level + 1))
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    return items


def _dec_dict(buf, mv, pos, end, raw, level):
    if level > _MAX_DEPTH:
        raise DecodeError(_TOO_DEEP)
    pairs = []
    while pos < end:
        tag, pos = _tag(buf, pos)
        if tag == 0x0A:
            a, pos = _span(buf, pos, end)
            pairs.append(_dec_entry(buf, mv, a, pos, raw, level + 1))
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    result = {}
    try:
        for key, value in pairs:
            result[key] = value
    except TypeError as e:
        problem = str(e)
    else:
        if len(result) == len(pairs):
            return result
        problem = "some keys are equal in Python (such as 1, 1.0 and True)"
    if raw:
        return DictEntries(pairs)
    raise ValueError("a dict Python cannot hold as sent: %s" % problem)


def _dec_entry(buf, mv, pos, end, raw, level):
    if level > _MAX_DEPTH:
        raise DecodeError(_TOO_DEEP)
    key = value = None
    while pos < end:
        tag, pos = _tag(buf, pos)
        if tag == 0x0A:
            a, pos = _span(buf, pos, end)
            key = _dec_value(buf, mv, a, pos, raw, level + 1)
        elif tag == 0x12:
            a, pos = _span(buf, pos, end)
            value = _dec_value(buf, mv, a, pos, raw, level + 1)
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    return key, value


def _dec_complex(buf, pos, end):
    real = imag = 0.0
    while pos < end:
        tag, pos = _tag(buf, pos)
        if tag == 0x09:
            real, pos = _double(buf, pos, end)
        elif tag == 0x11:
            imag, pos = _double(buf, pos, end)
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    return complex(real, imag)


def _dec_ndarray(buf, mv, pos, end, raw):
    dtype = ""
    shape = []
    data = mv[0:0]
    scalar = False
    shared = None
    while pos < end:
        tag, pos = _tag(buf, pos)
        if tag == 0x0A:
            a, pos = _span(buf, pos, end)
            dtype = str(mv[a:pos], "utf-8")
        elif tag == 0x12:  # packed shape
            a, pos = _span(buf, pos, end)
            while a < pos:
                n, a = _varint(buf, a)
                shape.append(n)
            _ended(a, pos)
        elif tag == 0x10:  # unpacked shape element
            n, pos = _varint(buf, pos)
            shape.append(n)
        elif tag == 0x1A:
            a, pos = _span(buf, pos, end)
            data = mv[a:pos]
        elif tag == 0x20:
            n, pos = _varint(buf, pos)
            scalar = n != 0
        elif tag == 0x2A:  # shared: SharedBytes
            a, pos = _span(buf, pos, end)
            name, length = "", 0
            while a < pos:
                t, a = _tag(buf, a)
                if t == 0x0A:
                    s, a = _span(buf, a, pos)
                    name = str(mv[s:a], "utf-8")
                elif t == 0x10:
                    length, a = _varint(buf, a)
                else:
                    a = _skip(buf, a, t & 7, pos)
            _ended(a, pos)
            shared = (name, length)
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    if shared is not None:
        d = _shm()
        if d is None:
            raise ValueError("a shared-memory value, and this worker has no shared-memory directory")
        data = d.map(shared[0], shared[1])
        if raw or _numpy() is None:
            return NdArray(dtype, shape, bytes(data), scalar)
    if raw:
        return NdArray(dtype, shape, data, scalar)
    return _make_ndarray(dtype, shape, data, scalar)


_numpy_module = None


def _numpy():
    """numpy, imported on first use; None when it is not installed."""
    global _numpy_module
    if _numpy_module is None:
        try:
            import numpy
        except ImportError:
            numpy = False
        _numpy_module = numpy
    return _numpy_module or None


def _make_ndarray(dtype, shape, data, scalar):
    """A numpy array or scalar sharing the frame's (writable) memory, or an
    NdArray holder when numpy is not installed."""
    np = _numpy()
    if np is None:
        return NdArray(dtype, shape, data, scalar)
    dt = np.dtype(dtype)
    count = 1
    for n in shape:
        count *= n
    if scalar:
        shape, count = (), 1
    if count * dt.itemsize != len(data):
        raise ValueError(
            "an array of dtype %r and shape %r needs %d bytes, not %d"
            % (dtype, tuple(shape), count * dt.itemsize, len(data))
        )
    if count == 0 or dt.itemsize == 0:
        array = np.zeros(tuple(shape), dtype=dt)
    else:
        array = np.frombuffer(data, dtype=dt).reshape(tuple(shape))
    return array[()] if scalar else array


# The field numbers of Envelope's `body` oneof: the last one present wins;
# any other field is unknown and skipped.
_BODY_FIELDS = frozenset([10, 11, 12] + list(range(20, 27)) + list(range(40, 58)))
# The bodies the worker reads.
_COMMAND_REQUEST = 20
_CONTROL_REQUEST = 22


def _dec_envelope(buf):
    """(protocol_version, correlation, body field number, body start, body
    end) of an Envelope."""
    pos, end = 0, len(buf)
    version = correlation = field = a = b = 0
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos)
        wire = tag & 7
        if tag == 0x08:
            version, pos = _varint(buf, pos)
        elif tag == 0x10:
            correlation, pos = _varint(buf, pos)
        elif wire == 2 and (tag >> 3) in _BODY_FIELDS:
            a, pos = _span(buf, pos, end)
            field, b = tag >> 3, pos
        else:
            pos = _skip(buf, pos, wire, end)
    _ended(pos, end)
    return version, correlation, field, a, b


def _dec_command(buf, mv, pos, end):
    """(id, command, mode, [(name, (start, end) or None)]) of a
    CommandRequest; parameter values are decoded when the command runs."""
    rid = mode = 0
    command = ""
    params = []
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos)
        if tag == 0x08:
            rid, pos = _varint(buf, pos)
        elif tag == 0x12:
            a, pos = _span(buf, pos, end)
            command = str(mv[a:pos], "utf-8")
        elif tag == 0x18:
            mode, pos = _varint(buf, pos)
            mode = _int32(mode)
        elif tag == 0x22:
            a, pos = _span(buf, pos, end)
            params.append(_dec_parameter(buf, mv, a, pos))
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    return rid, command, mode, params


def _dec_parameter(buf, mv, pos, end):
    name = ""
    value = None
    while pos < end:
        tag, pos = _tag(buf, pos)
        if tag == 0x0A:
            a, pos = _span(buf, pos, end)
            name = str(mv[a:pos], "utf-8")
        elif tag == 0x12:
            value = _span(buf, pos, end)
            pos = value[1]
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    return name, value


def _fields(buf, pos, end):
    """(tag, start, end) of each length-delimited field, (tag, value, None)
    of each varint; for the rarely used control messages."""
    out = []
    while pos < end:
        tag, pos = _tag(buf, pos)
        if tag & 7 == 2:
            a, pos = _span(buf, pos, end)
            out.append((tag, a, pos))
        elif tag & 7 == 0:
            n, pos = _varint(buf, pos)
            out.append((tag, n, None))
        else:
            pos = _skip(buf, pos, tag & 7, end)
    _ended(pos, end)
    return out


# ---------------------------------------------------------------------------
# Encoding. Encoders append bytes-like parts to a list and return how many
# bytes they appended; a nested message's header goes into a placeholder
# slot once its length is known, so nothing is copied twice.

_SMALL = [bytes((i,)) for i in range(128)]


def _uv(n):
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _enc_value(v, parts):
    encode = _ENCODERS.get(type(v))
    if encode is None:
        return _enc_other(v, parts)
    return encode(v, parts)


def _enc_none(v, parts):
    if _depth[0] + 2 > _MAX_DEPTH:  # Value, Null
        raise _TooDeep()
    parts.append(b"\x0a\x00")
    return 2


def _enc_bool(v, parts):
    parts.append(b"\x10\x01" if v else b"\x10\x00")
    return 2


def _enc_int(v, parts):
    if _I64_MIN <= v <= _I64_MAX:
        b = b"\x18" + _uv(((v << 1) ^ (v >> 63)) & _U64)
    else:
        data = v.to_bytes((v if v >= 0 else ~v).bit_length() // 8 + 1, "big", signed=True)
        b = b"\x22" + _uv(len(data)) + data
    parts.append(b)
    return len(b)


def _enc_float(v, parts):
    parts.append(b"\x29" + _pack_d(v))
    return 9


def _enc_str(v, parts):
    try:
        data = v.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep them, pickled
        return _enc_pickled_object(v, parts)
    return _enc_bytes_field(b"\x32", data, parts)


def _enc_bytes(v, parts):
    return _enc_bytes_field(b"\x3a", v, parts)


def _enc_bytes_field(tag, data, parts):
    n = len(data)
    if n >= _BIG:
        head = tag + _uv(n)
        parts.append(head)
        parts.append(data)
        return len(head) + n
    b = tag + _uv(n) + data
    parts.append(b)
    return len(b)


# A value nested deeper than _MAX_DEPTH messages is pickled whole. While
# a value is encoded, _depth[0] is the number of messages above it (0 for
# the value itself, 2 for a list's items, 3 for a dict's keys and values).
_depth = [0]


class _TooDeep(Exception):
    pass


def _enc_items(tag, items, parts):
    d = _depth[0]
    # Value and ValueList, and the items' Values below them.
    if d + (3 if len(items) else 2) > _MAX_DEPTH:
        raise _TooDeep()
    _depth[0] = d + 2
    try:
        slot = len(parts)
        parts.append(None)
        n = 0
        for item in items:
            i = len(parts)
            parts.append(None)
            m = _enc_value(item, parts)
            head = b"\x0a" + _uv(m)
            parts[i] = head
            n += len(head) + m
        head = tag + _uv(n)
        parts[slot] = head
        return len(head) + n
    finally:
        _depth[0] = d


def _enc_list(v, parts):
    return _enc_items(b"\x42", v, parts)


def _enc_tuple(v, parts):
    return _enc_items(b"\x4a", v, parts)


def _enc_pairs(pairs, parts):
    d = _depth[0]
    # Value and Dict, and the DictEntries and their keys' and values' Values.
    if d + (4 if len(pairs) else 2) > _MAX_DEPTH:
        raise _TooDeep()
    _depth[0] = d + 3
    try:
        slot = len(parts)
        parts.append(None)
        n = 0
        for key, value in pairs:
            i = len(parts)
            parts.append(None)
            j = len(parts)
            parts.append(None)
            mk = _enc_value(key, parts)
            hk = b"\x0a" + _uv(mk)
            parts[j] = hk
            j = len(parts)
            parts.append(None)
            mv = _enc_value(value, parts)
            hv = b"\x12" + _uv(mv)
            parts[j] = hv
            m = len(hk) + mk + len(hv) + mv
            head = b"\x0a" + _uv(m)
            parts[i] = head
            n += len(head) + m
        head = b"\x52" + _uv(n)
        parts[slot] = head
        return len(head) + n
    finally:
        _depth[0] = d


def _enc_dict(v, parts):
    return _enc_pairs(v.items(), parts)


def _enc_complex(v, parts):
    if _depth[0] + 2 > _MAX_DEPTH:  # Value, Complex
        raise _TooDeep()
    parts.append(b"\x5a\x12\x09" + _pack_d(v.real) + b"\x11" + _pack_d(v.imag))
    return 20


def _enc_ndarray(dtype, shape, data, scalar, parts, shared=None):
    if _depth[0] + 2 > _MAX_DEPTH:  # Value, NdArray
        raise _TooDeep()
    slot = len(parts)
    parts.append(None)
    n = 0
    if dtype:
        d = dtype.encode("utf-8")
        b = b"\x0a" + _uv(len(d)) + d
        parts.append(b)
        n += len(b)
    if shape:
        packed = b"".join([_uv(x) for x in shape])
        b = b"\x12" + _uv(len(packed)) + packed
        parts.append(b)
        n += len(b)
    if len(data):
        n += _enc_bytes_field(b"\x1a", data, parts)
    if scalar:
        parts.append(b"\x20\x01")
        n += 2
    if shared is not None:
        name = shared[0].encode("ascii")
        body = b"\x0a" + _uv(len(name)) + name + b"\x10" + _uv(shared[1])
        b = b"\x2a" + _uv(len(body)) + body
        parts.append(b)
        n += len(b)
    head = b"\x62" + _uv(n)
    parts[slot] = head
    return len(head) + n


def _enc_holder_ndarray(v, parts):
    return _enc_ndarray(v.dtype, v.shape, v.data, v.scalar, parts)


def _enc_pickled(v, parts):
    return _enc_bytes_field(b"\x6a", v.data, parts)


def _enc_pickled_object(v, parts):
    return _enc_bytes_field(b"\x6a", pickle.dumps(v, protocol=_PICKLE_PROTOCOL), parts)


_ENCODERS = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    str: _enc_str,
    bytes: _enc_bytes,
    list: _enc_list,
    tuple: _enc_tuple,
    dict: _enc_dict,
    complex: _enc_complex,
    NdArray: _enc_holder_ndarray,
    Pickled: _enc_pickled,
    DictEntries: _enc_pairs,
}

# Subclasses of these are pickled (lossless, Python to Python); when they
# cannot be, they travel as their base type.
_BASES = (int, float, complex, str, bytes, tuple, list, dict)


def _enc_other(v, parts):
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(v, np.ndarray):
            return _enc_numpy_array(np, v, parts)
        if isinstance(v, np.generic):
            return _enc_numpy_scalar(np, v, parts)
    try:
        data = pickle.dumps(v, protocol=_PICKLE_PROTOCOL)
    except Exception:
        for base in _BASES:
            if isinstance(v, base):
                return _ENCODERS[base](v, parts)
        raise
    return _enc_bytes_field(b"\x6a", data, parts)


def _plain_dtype(dt):
    """True when raw bytes and dtype.str carry an array exactly."""
    return not dt.hasobject and dt.fields is None and dt.subdtype is None


def _enc_numpy_array(np, a, parts):
    if type(a) is not np.ndarray or not _plain_dtype(a.dtype):
        return _enc_pickled_object(a, parts)
    if a.nbytes >= _BIG:
        d = _shm()
        if d is not None and d.threshold and a.nbytes >= d.threshold:
            if _depth[0] + 2 > _MAX_DEPTH:
                raise _TooDeep()
            name = d.write_array(np, a)
            _written.append(name)
            return _enc_ndarray(a.dtype.str, a.shape, b"", False, parts, (name, a.nbytes))
    if a.nbytes >= _BIG and a.flags.c_contiguous:
        data = memoryview(a.reshape(-1).view(np.uint8))
    else:
        data = a.tobytes()
    return _enc_ndarray(a.dtype.str, a.shape, data, False, parts)


def _enc_numpy_scalar(np, s, parts):
    if not _plain_dtype(s.dtype):
        return _enc_pickled_object(s, parts)
    return _enc_ndarray(s.dtype.str, (), s.tobytes(), True, parts)


def _encode_value(v):
    """(parts, length) of a Value; structures too deep (or cyclic) for the
    native encoding are pickled whole."""
    parts = []
    _depth[0] = 0
    del _written[:]
    try:
        n = _enc_value(v, parts)
    except (RecursionError, _TooDeep):
        _unlink_written()
        _depth[0] = 0
        parts = []
        n = _enc_pickled_object(v, parts)
    except BaseException:
        _unlink_written()
        raise
    return parts, n


def _response(rid, mode, ret_parts, ret_len, successful, tb, start, stop):
    """(parts, length) of a CommandResponse."""
    parts = []
    n = 0
    if rid:
        b = b"\x08" + _uv(rid)
        parts.append(b)
        n += len(b)
    if mode:
        b = b"\x18" + _uv(mode & _U64)
        parts.append(b)
        n += len(b)
    head = b"\x2a" + _uv(ret_len)
    parts.append(head)
    parts.extend(ret_parts)
    n += len(head) + ret_len
    if successful:
        parts.append(b"\x40\x01")
        n += 2
    if tb is not None:
        n += _enc_bytes_field(b"\x4a", tb.encode("utf-8", "backslashreplace"), parts)
    if start != 0.0:
        parts.append(b"\x51" + _pack_d(start))
        n += 9
    if stop != 0.0:
        parts.append(b"\x59" + _pack_d(stop))
        n += 9
    return parts, n


# The keys of the bodies the worker writes: Envelope fields 21, 23 and 26.
_COMMAND_RESPONSE = b"\xaa\x01"
_CONTROL_RESPONSE = b"\xba\x01"
_LOG_RECORD = b"\xd2\x01"


def _envelope(body_tag, parts, n, correlation=0):
    """The frame's parts: length prefix, Envelope header, body."""
    head = b"\x08" + _uv(PROTOCOL_VERSION)
    if correlation:
        head += b"\x10" + _uv(correlation)
    head += body_tag + _uv(n)
    frame = [_pack_len(len(head) + n), head]
    frame.extend(parts)
    return frame


def _log_frame(level, message, origin, when):
    m = message.encode("utf-8", "backslashreplace")
    o = origin.encode("utf-8")
    body = b"\x09" + _pack_d(when) + b"\x10" + _SMALL[level]
    if o:
        body += b"\x1a" + _uv(len(o)) + o
    if m:
        body += b"\x2a" + _uv(len(m)) + m
    return _envelope(_LOG_RECORD, [body], len(body))


def _ready_frame(error, rank):
    body = b"" if error else b"\x08\x01"
    if error:
        e = error.encode("utf-8", "backslashreplace")
        body += b"\x12" + _uv(len(e)) + e
    if rank:
        body += b"\x18" + _uv(rank & _U64)
    body += b"\x28" + _uv(os.getpid())
    return _envelope(_CONTROL_RESPONSE, [body], len(body))


# ---------------------------------------------------------------------------
# Pipes


def _too_large(n):
    return DecodeError("a frame of %d bytes exceeds the maximum of %d bytes" % (n, _MAX_FRAME))


class _FrameReader(object):
    """Reads frames from a blocking pipe. Small frames come out of one
    buffered read; a large one is read straight into its own buffer."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = bytearray()

    def read(self):
        """The next frame's body (a bytearray), or None at end of input."""
        buf = self.buf
        while True:
            if len(buf) >= 4:
                n = _unpack_len(buf)[0]
                if n > _MAX_FRAME:
                    raise _too_large(n)
                total = n + 4
                if len(buf) >= total:
                    body = buf[4:total]
                    del buf[:total]
                    return body
                if n >= _BIG:
                    return self._read_large(n)
            chunk = os.read(self.fd, _BIG)
            if not chunk:
                return None
            buf += chunk

    def complete(self):
        """The frames already buffered, without reading."""
        buf = self.buf
        frames = []
        while len(buf) >= 4:
            n = _unpack_len(buf)[0]
            if n > _MAX_FRAME:
                raise _too_large(n)
            total = n + 4
            if len(buf) < total:
                break
            frames.append(buf[4:total])
            del buf[:total]
        return frames

    def _read_large(self, n):
        body = bytearray(n)
        have = len(self.buf) - 4
        body[:have] = self.buf[4:]
        del self.buf[:]
        view = memoryview(body)
        while have < n:
            got = os.readv(self.fd, [view[have:]])
            if got == 0:
                return None
            have += got
        return body


class _State(object):
    """What the main thread runs, shared with the control thread and the
    SIGINT handler."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running_id = None  # id of the command being run
        self.interrupt_id = None  # id the executor asked to interrupt
        self.delivered = True  # the SIGINT handler ran since that request
        self.armed = False  # user code runs: SIGINT raises KeyboardInterrupt
        self.sending = 0  # the main thread is writing a frame
        self.deferred = False  # a SIGINT arrived while it was


class _Out(object):
    """Writes frames to the results pipe, whole, from any thread."""

    def __init__(self, fd, state=None):
        self.fd = fd
        self.lock = threading.Lock()
        self.state = state
        self.main = threading.get_ident()

    def after_fork(self):
        self.lock = threading.Lock()
        self.main = threading.get_ident()

    def send(self, frame):
        state = self.state
        guard = state is not None and threading.get_ident() == self.main
        # A KeyboardInterrupt must not cut a frame short: while the main
        # thread writes, the SIGINT handler defers it to the end of the write.
        if guard:
            state.sending += 1
        try:
            with self.lock:
                self._write(frame)
        finally:
            if guard:
                state.sending -= 1
        if guard and state.deferred and not state.sending:
            state.deferred = False
            if state.armed:
                raise KeyboardInterrupt

    def _write(self, frame):
        total = 0
        for part in frame:
            total += len(part)
        # The prefix counts the bytes really sent: should an encoder ever
        # miscount, the executor sees a malformed frame rather than waiting
        # for bytes that never come.
        frame[0] = _pack_len(total - 4)
        try:
            if total < (1 << 20):
                _write_all(self.fd, b"".join(frame))
                return
            small = bytearray()
            for part in frame:
                if len(part) >= _BIG:
                    if small:
                        _write_all(self.fd, small)
                        small = bytearray()
                    _write_all(self.fd, part)
                else:
                    small += part
            if small:
                _write_all(self.fd, small)
        except OSError:
            # The executor is gone: nobody is left to serve.
            _leave()

    def log(self, level, message, origin, when=None):
        self.send(_log_frame(level, message, origin, time.time() if when is None else when))


def _leave():
    """Ends the worker because its server node is gone, with whatever it
    started: the server node made the worker the leader of a process group
    of its own, and a server node that was killed cannot take that group
    down itself (rule 30). The others in the group get SIGKILL, as the
    server node would send them; the worker itself exits with status 0."""
    me = os.getpid()
    if os.getpgid(0) == me:
        try:
            pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            pids = None
        if pids is None:
            # No /proc to find them by: the group is told to end.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                os.killpg(0, signal.SIGTERM)
            except OSError:
                pass
        for pid in pids or ():
            try:
                if pid != me and os.getpgid(pid) == me:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    os._exit(0)


def _write_all(fd, data):
    written = os.write(fd, data)
    if written == len(data):
        return
    view = memoryview(data).cast("B")[written:]
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


class _Sink(io.RawIOBase):
    """What sys.stdout and sys.stderr write to: each line becomes a LogRecord
    frame. fileno() is the real descriptor, so subprocesses and C code that
    write there reach the executor too (as plain lines of the pipe)."""

    def __init__(self, out, fd, level, origin):
        io.RawIOBase.__init__(self)
        self._out = out
        self._fd = fd
        self._level = level
        self._origin = origin
        self._partial = b""
        self._lock = threading.Lock()

    def writable(self):
        return True

    def fileno(self):
        return self._fd

    def isatty(self):
        return False

    def write(self, b):
        data = bytes(b)
        with self._lock:
            data = self._partial + data
            if b"\n" in data:
                lines = data.split(b"\n")
                self._partial = lines.pop()
            elif len(data) < _BIG:
                self._partial = data
                return len(b)
            else:
                lines = [data]
                self._partial = b""
        for line in lines:
            self._send(line)
        return len(b)

    def flush(self):
        # sys.stdout.flush() and print(..., flush=True) send a partial line.
        self.flush_partial()

    def flush_partial(self):
        if not self._partial:  # the common case, without taking the lock
            return
        with self._lock:
            data, self._partial = self._partial, b""
        if data:
            self._send(data)

    def _send(self, line):
        self._out.log(self._level, line.decode("utf-8", "replace"), self._origin)

    def after_fork(self):
        self._lock = threading.Lock()


class _LogHandler(logging.Handler):
    """Sends `logging` records to the executor."""

    def __init__(self, out):
        logging.Handler.__init__(self)
        self.out = out
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record):
        try:
            message = self.format(record)
            self.out.log(_log_level(record.levelno), message, "logging", record.created)
        except KeyboardInterrupt:
            raise
        except Exception:
            self.handleError(record)


def _log_level(levelno):
    if levelno >= logging.CRITICAL:
        return L_CRITICAL
    if levelno >= logging.ERROR:
        return L_ERROR
    if levelno >= logging.WARNING:
        return L_WARNING
    if levelno >= logging.INFO:
        return L_INFO
    return L_DEBUG


# ---------------------------------------------------------------------------
# Running commands

def _casa_namespace(g):
    """--casa: the namespace casampi's servers have, `casalog`, every CASA
    task and MPIEnvironment, logging to the CASA log file the cluster
    shares (named by CASA_NODE_CASA_LOG) and, through stderr, to the
    unified log; casampi's filters apply (server_run in casampi 0.6)."""
    log_file = os.environ.get("CASA_NODE_CASA_LOG")
    if log_file:
        # casatasks opens its log where casaconfig says, when imported.
        from casaconfig import config

        config.logfile = log_file
    exec(
        "from casatools import logsink\n"
        "casalog = logsink()\n"
        "from casatasks import *\n"
        "from casampi.MPIEnvironment import MPIEnvironment\n",
        g,
    )
    # casatasks made its casalog the global sink; the console (stderr, so
    # the unified log) takes effect only after a first post, and setglobal
    # again before one crashes casatools 6.7.
    casalog = g["casalog"]
    casalog.post(g["MPIEnvironment"].mpi_info_msg, "INFO", "casa-node")
    casalog.showconsole(True)
    casalog.filter("NORMAL1")
    casalog.filterMsg("MSSelectionNullSelection")
    casalog.filterMsg("non-existent spw")


_WORKER_GLOBALS = globals()
_MISSING = object()


def _format_exc(e):
    """The traceback of e from the user's code on: the worker's own frames
    are left out."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_globals is _WORKER_GLOBALS:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


class _Worker(object):
    def __init__(self, fds, env):
        self.commands_fd, results_fd, self.control_fd = fds
        for fd in fds:
            os.set_inheritable(fd, False)
        self.rank = int(env.get("CASA_NODE_RANK", "0") or 0)
        self.init = env.pop("CASA_NODE_WORKER_INIT", "")
        self.casa = env.pop("CASA_NODE_WORKER_CASA", "") == "1"
        level = int(env.pop("CASA_NODE_WORKER_LOG_LEVEL", "0") or 0)
        self.state = _State()
        self.out = _Out(results_fd, self.state)
        self.reader = _FrameReader(self.commands_fd)
        self.compiled = {}
        self.main_ident = threading.get_ident()

        signal.signal(signal.SIGINT, self._on_sigint)
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
        self.stdout = _Sink(self.out, 1, L_INFO, "stdout")
        self.stderr = _Sink(self.out, 2, L_WARNING, "stderr")
        sys.stdout = io.TextIOWrapper(
            self.stdout, encoding="utf-8", errors="backslashreplace", write_through=True
        )
        sys.stderr = io.TextIOWrapper(
            self.stderr, encoding="utf-8", errors="backslashreplace", write_through=True
        )
        self.handler = _LogHandler(self.out)
        logging.getLogger().addHandler(self.handler)
        self.set_log_level(level)
        os.register_at_fork(after_in_child=self._after_fork)

        # The user's namespace is a real __main__ module, so that classes
        # and functions defined by commands can be pickled.
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main
        self.g = main.__dict__
        exec("import os, sys, time", self.g)

        threading.Thread(target=self._control_loop, name="casa-node-control", daemon=True).start()

    def _after_fork(self):
        self.out.after_fork()
        self.stdout.after_fork()
        self.stderr.after_fork()

    # -- interrupts ---------------------------------------------------------

    def _on_sigint(self, signum, frame):
        state = self.state
        state.delivered = True
        if not state.armed:
            return
        if state.sending:
            state.deferred = True
            return
        raise KeyboardInterrupt

    def _control_loop(self):
        """Reads the control pipe, and ends the worker as soon as either
        the control or the commands pipe is closed (the executor is gone),
        whatever the main thread is doing."""
        poller = select.poll()
        poller.register(self.control_fd, select.POLLIN)
        poller.register(self.commands_fd, 0)  # only POLLHUP: the writer left
        reader = _FrameReader(self.control_fd)
        state = self.state
        while True:
            # A SIGINT that lands just before the main thread blocks in a
            # system call (time.sleep, a read) runs its Python handler only
            # when that call returns: until the handler has run, send it
            # again now and then.
            waiting = state.interrupt_id is not None and not state.delivered
            events = poller.poll(_RESEND_MS if waiting else None)
            if not events:
                with state.lock:
                    if state.running_id == state.interrupt_id and not state.delivered:
                        signal.pthread_kill(self.main_ident, signal.SIGINT)
            for fd, _ in events:
                if fd == self.commands_fd:
                    _leave()
                chunk = os.read(self.control_fd, _BIG)
                if not chunk:
                    _leave()
                reader.buf += chunk
                try:
                    frames = reader.complete()
                except DecodeError as e:
                    # The pipe is out of step: nothing more can be read.
                    self.out.log(L_ERROR, "the control pipe is broken: %s" % e, "worker")
                    os._exit(1)
                for body in frames:
                    self._cancel(body)

    def _cancel(self, body):
        try:
            _, _, field, a, b = _dec_envelope(body)
            if field != _CONTROL_REQUEST:
                return
            requests = []
            for tag, start, end in _fields(body, a, b):
                if tag == 0x22:  # ControlRequest.cancel
                    rid = 0
                    for t, n, _ in _fields(body, start, end):
                        if t == 0x08:
                            rid = n
                    requests.append(rid)
        except DecodeError as e:
            self.out.log(L_ERROR, "a malformed control frame was dropped: %s" % e, "worker")
            return
        for rid in requests:
            state = self.state
            with state.lock:
                state.interrupt_id = rid
                state.delivered = False
                if state.running_id == rid:
                    signal.pthread_kill(self.main_ident, signal.SIGINT)

    # -- the main loop ------------------------------------------------------

    def serve(self):
        error = ""
        if self.casa or self.init:
            try:
                if self.casa:
                    _casa_namespace(self.g)
                if self.init:
                    with open(self.init, "rb") as f:
                        source = f.read()
                    exec(compile(source, self.init, "exec", dont_inherit=True), self.g)
            except BaseException as e:
                error = _format_exc(e)
            self._flush()
        self.out.send(_ready_frame(error, self.rank))
        while True:
            body = self.reader.read()
            if body is None:
                return
            version, correlation, field, a, b = _dec_envelope(body)
            if field == _COMMAND_REQUEST:
                self._run(body, a, b)
            elif field == _CONTROL_REQUEST:
                self._control(body, a, b)

    def _flush(self):
        self.stdout.flush_partial()
        self.stderr.flush_partial()

    def set_log_level(self, level):
        py_level = _PY_LEVELS.get(level, logging.INFO)
        logging.getLogger().setLevel(py_level)
        self.handler.setLevel(py_level)

    def _control(self, body, a, b):
        for tag, start, end in _fields(body, a, b):
            if tag == 0x0A:  # start
                self._apply_start(body, start, end)
            elif tag == 0x1A:  # set_log_level
                for t, n, _ in _fields(body, start, end):
                    if t == 0x08:
                        self.set_log_level(_int32(n))

    def _apply_start(self, body, a, b):
        mv = memoryview(body)
        for tag, start, end in _fields(body, a, b):
            try:
                if tag == 0x0A:
                    directory = str(mv[start:end], "utf-8")
                    if directory:
                        os.chdir(directory)
                elif tag == 0x12:
                    name = value = ""
                    for t, s, e in _fields(body, start, end):
                        if t == 0x0A:
                            name = str(mv[s:e], "utf-8")
                        elif t == 0x12:
                            value = str(mv[s:e], "utf-8")
                    os.environ[name] = value
                elif tag == 0x18:
                    self.set_log_level(_int32(start))
            except Exception as e:
                self.out.log(L_ERROR, "could not apply the head node's settings: %s" % e, "worker")

    def _compile(self, command, mode, with_params):
        """(mode, code, callee) for a command; callee is the code of `f`
        when an EVAL command `f()` is to be called with the parameters as
        keyword arguments (rule 4)."""
        key = (command, mode, with_params)
        hit = self.compiled.get(key)
        if hit is not None:
            return hit
        code = callee = None
        if mode == PUSH or (mode in (0, AUTO) and command == "push"):
            mode = PUSH
        elif mode in (0, AUTO):
            try:
                code = compile(command, "<command>", "eval", dont_inherit=True)
                mode = EVAL
            except (SyntaxError, ValueError):
                mode = EXEC
            if mode == EXEC:  # outside the except: no chained traceback
                code = compile(command, "<command>", "exec", dont_inherit=True)
        elif mode == EVAL:
            code = compile(command, "<command>", "eval", dont_inherit=True)
        elif mode == EXEC:
            code = compile(command, "<command>", "exec", dont_inherit=True)
        else:
            raise ValueError("unknown command mode %d" % mode)
        if mode == EVAL and with_params:
            stripped = command.rstrip()
            if stripped.endswith("()") and stripped[:-2].strip():
                try:
                    callee = compile(stripped[:-2], "<command>", "eval", dont_inherit=True)
                except (SyntaxError, ValueError):
                    callee = None
        result = (mode, code, callee)
        if len(self.compiled) >= 512:
            self.compiled.clear()
        self.compiled[key] = result
        return result

    def _decode_params(self, body, mv, params):
        values = []
        failure = None
        for name, span in params:
            if span is None:
                values.append((name, None))
                continue
            try:
                values.append((name, _dec_value(body, mv, span[0], span[1], False)))
            except Exception as e:
                # The others are still decoded: their shared-memory files
                # are unlinked once mapped.
                if failure is None:
                    failure = "parameter %r could not be decoded: %s: %s" % (name, type(e).__name__, e)
        if failure is not None:
            raise ValueError(failure)
        return values

    def _run(self, body, a, b):
        mv = memoryview(body)
        rid, command, mode, params = _dec_command(body, mv, a, b)
        state = self.state
        g = self.g
        resolved = mode if mode in (EVAL, EXEC, PUSH) else AUTO
        ret = None
        failure = None
        saved = None
        start = time.time()
        try:
            with state.lock:
                state.running_id = rid
            state.armed = True
            if state.interrupt_id == rid:
                raise KeyboardInterrupt
            try:
                values = self._decode_params(body, mv, params)
                resolved, code, callee = self._compile(command, mode, bool(values))
                if values:
                    saved = [(name, g.get(name, _MISSING)) for name, _ in values]
                    for name, value in values:
                        g[name] = value
                if resolved == EVAL:
                    if callee is not None:
                        ret = eval(callee, g)(**dict(values))
                    else:
                        ret = eval(code, g)
                elif resolved == EXEC:
                    exec(code, g)
            finally:
                state.armed = False
        except BaseException as e:
            state.armed = False
            ret = None
            failure = _format_exc(e)
        stop = time.time()
        with state.lock:
            state.running_id = None
            state.interrupt_id = None
        # Rule 3: parameters go away after the command (a global they
        # shadowed comes back), except in PUSH mode.
        if saved is not None and resolved != PUSH:
            for name, old in reversed(saved):
                if old is _MISSING:
                    g.pop(name, None)
                else:
                    g[name] = old
        self._flush()
        if failure is None:
            try:
                ret_parts, ret_len = _encode_value(ret)
            except Exception as e:
                failure = "The command's return value, of type %s, cannot be sent back: %s" % (
                    _type_name(ret),
                    "".join(traceback.format_exception_only(type(e), e)).strip(),
                )
        if failure is not None:
            ret_parts, ret_len = [b"\x0a\x00"], 2
        parts, n = _response(rid, resolved, ret_parts, ret_len, failure is None, failure, start, stop)
        self.out.send(_envelope(_COMMAND_RESPONSE, parts, n))


def _type_name(v):
    t = type(v)
    if t.__module__ in ("builtins", "__main__"):
        return t.__qualname__
    return "%s.%s" % (t.__module__, t.__qualname__)


# ---------------------------------------------------------------------------
# Codec-echo mode, for the codec's tests: each CommandRequest on stdin is
# answered on stdout by a CommandResponse with the same correlation and id
# whose ret is either the first parameter's value, decoded (in raw mode)
# and encoded again, or, when the command is not empty, the value of the
# command as a Python expression, built with the helpers below. Any other
# frame, and one that cannot be decoded, is answered by a failed
# CommandResponse whose traceback says why.


def _echo_float(bits):
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _echo_dict(pairs):
    result = {}
    try:
        for key, value in pairs:
            result[key] = value
    except TypeError:
        return DictEntries(pairs)
    return result if len(result) == len(pairs) else DictEntries(pairs)


def _echo_ndarray(dtype, shape, data, scalar):
    """A real numpy object when numpy is installed and gives back exactly
    these bytes, else a holder."""
    np = _numpy()
    if np is not None:
        try:
            made = _make_ndarray(dtype, shape, bytearray(data), scalar)
            if made.dtype.str == dtype and made.tobytes() == data:
                return made
        except Exception:
            pass
    return NdArray(dtype, shape, data, scalar)


def _codec_echo(in_fd, out_fd):
    reader = _FrameReader(in_fd)
    out = _Out(out_fd)
    namespace = {
        "__builtins__": builtins,
        "_f": _echo_float,
        "_d": _echo_dict,
        "_nd": _echo_ndarray,
        "_pk": Pickled,
    }
    while True:
        body = reader.read()
        if body is None:
            return
        mv = memoryview(body)
        correlation = rid = 0
        failure = None
        try:
            _, correlation, field, a, b = _dec_envelope(body)
            if field != _COMMAND_REQUEST:
                raise DecodeError("not a CommandRequest")
            rid, command, _, params = _dec_command(body, mv, a, b)
            if command:
                value = eval(command, namespace)
            else:
                span = params[0][1]
                value = _dec_value(body, mv, span[0], span[1], True) if span else None
            ret_parts, ret_len = _encode_value(value)
        except BaseException as e:
            failure = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            ret_parts, ret_len = [b"\x0a\x00"], 2
        parts, n = _response(rid, 0, ret_parts, ret_len, failure is None, failure, 0.0, 0.0)
        out.send(_envelope(_COMMAND_RESPONSE, parts, n, correlation))


def main():
    env = os.environ
    fds = [int(fd) for fd in env.pop("CASA_NODE_WORKER_FDS", "0,1,-1").split(",")]
    if env.pop("CASA_NODE_WORKER_MODE", "") == "codec-echo":
        _codec_echo(fds[0], fds[1])
        os._exit(0)
    _Worker(fds, env).serve()
    # The commands pipe closed: the server node is gone or done with this
    # worker. Threads that user code left running must not hold it, nor
    # may processes it started outlive it.
    _leave()


if __name__ == "__main__":
    main()
