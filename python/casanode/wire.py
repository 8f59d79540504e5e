"""The front door's wire: frames (a 4-byte big-endian length, then one
Envelope), written from buffers without copying large values, and read
into buffers of their own with a ResponseDelivery parsed around its large
values (SplitResponse)."""

import ssl
import struct
import sys

from . import values
from ._pb.casa.node.v1 import driver_pb2, envelope_pb2, node_pb2, value_pb2
from .errors import CasaNodeError, ConnectionClosed

# The protocol's numbers come from envelope.proto's Constant enum, as the
# Rust side's do.
PROTOCOL_VERSION = envelope_pb2.CONSTANT_PROTOCOL_VERSION
MAX_FRAME = envelope_pb2.CONSTANT_MAX_FRAME
_LENGTH = struct.Struct(">I")


def _recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None if got == 0 else _truncated()
        got += k
    return buf  # protobuf parses a bytearray as it does bytes


def _truncated():
    raise ConnectionClosed("the connection closed in the middle of a frame")


def read_frame(sock):
    """The next Envelope, or None at end of stream."""
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise CasaNodeError(f"a frame of {length} bytes exceeds the maximum of {MAX_FRAME}")
    data = _recv_exact(sock, length) if length else b""
    if data is None:
        _truncated()
    return envelope_pb2.Envelope.FromString(data)


def encode_frame(envelope):
    data = envelope.SerializeToString()
    if len(data) > MAX_FRAME:
        raise CasaNodeError(f"a frame of {len(data)} bytes exceeds the maximum of {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


_BODY_TAGS = {}
_Envelope = envelope_pb2.Envelope
_VERSION = values.field_key(_Envelope, "protocol_version") + values._varint(PROTOCOL_VERSION)
_K_CORRELATION = values.field_key(_Envelope, "correlation")
# A SubmitRequest's ids, and pipelined = true: what submit_pipelined appends.
SUBMIT_IDS_KEY = values.field_key(driver_pb2.SubmitRequest, "ids")
PIPELINED_FLAG = values.field_key(driver_pb2.SubmitRequest, "pipelined") + values._varint(1)


def body_tag(name):
    """The tag of the Envelope body field `name` (e.g. submit_request), as
    bytes: it precedes the length and the serialized message."""
    tag = _BODY_TAGS.get(name)
    if tag is None:
        field = _Envelope.DESCRIPTOR.fields_by_name.get(name)
        if field is None or field.containing_oneof is None:
            raise AttributeError(f"an Envelope has no body {name!r}")
        tag = _BODY_TAGS[name] = values.field_key(_Envelope, name)
    return tag


def frame_buffers(correlation, tag, buffers, size):
    """The frame of an Envelope with `correlation` whose body field `tag`
    holds the message serialized in `buffers` (`size` bytes in all), as a
    list of buffers: small pieces joined, large ones (values.LARGE bytes or
    more) as they are."""
    varint = values._varint
    head = _VERSION + (_K_CORRELATION + varint(correlation) if correlation else b"") + tag + varint(size)
    length = len(head) + size
    if length > MAX_FRAME:
        raise CasaNodeError(f"a frame of {length} bytes exceeds the maximum of {MAX_FRAME}")
    if size < values.LARGE:
        return [b"".join([_LENGTH.pack(length), head, *buffers])]
    out, small = [], [_LENGTH.pack(length), head]
    for buffer in buffers:
        if len(buffer) < values.LARGE:
            small.append(buffer)
        else:
            out.append(b"".join(small))
            out.append(buffer)
            small = []
    if small:
        out.append(b"".join(small))
    return out


_IOV_MAX = 512


def send_buffers(sock, buffers):
    """Sends the buffers in order, as sendall would their concatenation."""
    if len(buffers) == 1:
        sock.sendall(buffers[0])
        return
    if isinstance(sock, ssl.SSLSocket):
        # TLS has no sendmsg: each buffer is encrypted on its own anyway.
        for buffer in buffers:
            sock.sendall(buffer)
        return
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + _IOV_MAX])
        while sent:
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


class FrameReader:
    """Reads frames from a socket through a buffer: a small frame usually
    takes one recv with the frames around it; a large one is read into a
    buffer of its own."""

    SIZE = 1 << 16

    def __init__(self, sock):
        self._sock = sock
        self._buf = bytearray(self.SIZE)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def _fill(self, n):
        """Buffers at least n bytes (n <= SIZE); False at the end of the
        stream before any byte."""
        if self._start + n > self.SIZE:
            held = self._end - self._start
            self._view[:held] = self._buf[self._start:self._end]
            self._start, self._end = 0, held
        while self._end - self._start < n:
            k = self._sock.recv_into(self._view[self._end:])
            if k == 0:
                if self._end == self._start:
                    return False
                _truncated()
            self._end += k
        return True

    def next(self):
        """(data, large) for the next frame's Envelope, or None at the end of
        the stream: a small frame's bytes, or a large frame's memoryview."""
        if not self._fill(4):
            return None
        (length,) = _LENGTH.unpack_from(self._buf, self._start)
        if length > MAX_FRAME:
            raise CasaNodeError(f"a frame of {length} bytes exceeds the maximum of {MAX_FRAME}")
        if length + 4 <= self.SIZE:
            self._fill(4 + length) or _truncated()
            start = self._start + 4
            data = self._buf[start:start + length]
            self._start = start + length
            if self._start == self._end:
                self._start = self._end = 0
            return data, False
        view = _frame_buffer(length)
        start = self._start + 4
        got = self._end - start
        view[:got] = self._view[start:self._end]
        self._start = self._end = 0
        while got < length:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                _truncated()
            got += k
        return view, True


def _frame_buffer(n):
    """A writable buffer of n bytes, as a memoryview; numpy's when numpy is
    loaded (it allocates large buffers with huge pages, faulting far less)."""
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            return memoryview(np.empty(n, np.uint8))
        except Exception:  # a numpy that cannot
            pass
    return memoryview(bytearray(n))


class _Parameter:
    """A Parameter of a SplitResponse: its name, and its value for
    values.from_value."""

    __slots__ = ("name", "value")

    def __init__(self, name, value):
        self.name = name
        self.value = value


# The CommandResponse fields a SplitResponse holds as a message.
_SMALL_FIELDS = frozenset(
    f.name for f in node_pb2.CommandResponse.DESCRIPTOR.fields if f.name not in ("parameters", "ret")
)


class SplitResponse:
    """A CommandResponse from a large frame, parsed around its large values:
    `parameters` (objects with `name` and `value`) and `ret` hold
    values.SplitValue (or Value) objects that values.from_value decodes, the
    other fields read as the message's. `message()` is the whole message."""

    __slots__ = ("_small", "parameters", "ret", "_raw", "_message")

    def __init__(self, small, parameters, ret, raw):
        self._small = small
        self.parameters = parameters
        self.ret = ret
        self._raw = raw
        self._message = None

    def HasField(self, name):
        if name == "ret":
            return self.ret is not None
        return self._small.HasField(name)

    def message(self):
        """The CommandResponse message, parsed whole (once)."""
        if self._message is None:
            self._message = node_pb2.CommandResponse.FromString(self._raw)
        return self._message

    def __getattr__(self, name):
        if name in _SMALL_FIELDS:
            return getattr(self._small, name)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.message(), name)


_number = values.field_number
_N_VERSION = _number(_Envelope, "protocol_version")
_N_CORRELATION = _number(_Envelope, "correlation")
_N_DELIVERY = _number(_Envelope, "response_delivery")
_N_DELIVERY_RESPONSE = _number(driver_pb2.ResponseDelivery, "response")
_N_REPLACES_TIMEOUT = _number(driver_pb2.ResponseDelivery, "replaces_timeout")
_N_PARAMETERS = _number(node_pb2.CommandResponse, "parameters")
_N_RET = _number(node_pb2.CommandResponse, "ret")
_N_PARAMETER_NAME = _number(value_pb2.Parameter, "name")
_N_PARAMETER_VALUE = _number(value_pb2.Parameter, "value")


def parse_delivery(view):
    """(correlation, SplitResponse) for a frame carrying a ResponseDelivery
    in the plain encoding, parsed around its large values; None for any
    other frame (protobuf parses it then)."""
    fields = values.fields
    correlation = 0
    delivery = None
    for n, w, v, _, _ in fields(view):
        if n == _N_VERSION and w == 0:
            continue
        if n == _N_CORRELATION and w == 0:
            correlation = v
        elif n == _N_DELIVERY and w == 2 and delivery is None:
            delivery = v
        else:
            return None
    if delivery is None:
        return None
    response = None
    for n, w, v, _, _ in fields(delivery):
        if n == _N_DELIVERY_RESPONSE and w == 2 and response is None:
            response = v
        elif not (n == _N_REPLACES_TIMEOUT and w == 0):
            return None
    if response is None:
        return None
    small, parameters, ret = [], [], None
    for n, w, v, start, end in fields(response):
        if n == _N_PARAMETERS and w == 2:
            parameters.append(_parse_parameter(v))
        elif n == _N_RET and w == 2 and ret is None:
            ret = values.parse_value(v, 3)
        elif n == _N_PARAMETERS or n == _N_RET:
            return None
        else:
            small.append(response[start:end])
    message = node_pb2.CommandResponse.FromString(b"".join(small))
    return correlation, SplitResponse(message, parameters, ret, response)


def _parse_parameter(view):
    name = value = None
    for n, w, v, _, _ in values.fields(view):
        if n == _N_PARAMETER_NAME or n == _N_PARAMETER_VALUE:
            if w != 2 or (name if n == _N_PARAMETER_NAME else value) is not None:
                raise values.Irregular("a repeated or mistyped parameter field")
            if n == _N_PARAMETER_NAME:
                name = str(v, "utf-8")
            else:
                value = values.parse_value(v, 4)
    return _Parameter(name or "", value if value is not None else values.Value())
