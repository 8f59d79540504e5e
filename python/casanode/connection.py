"""A thread-safe connection to a casa-node client node's front door.

Frames are a 4-byte big-endian length followed by one casa.node.v1.Envelope.
The connecting side sends Hello (role DRIVER) and reads Welcome or
ProtocolError. A unix:// front door admits this user's processes; a tcp://
one takes TLS, trusting only the certificate of its connection file (a JSON
file only its owner may read, see read_connection_file), and the file's
token in the Hello. Afterwards a reader thread dispatches replies by envelope
correlation, stores every ResponseDelivery by request id (a later delivery
with replaces_timeout replaces the earlier record, rule 21), and hands
LogRecords to subscribers.

Submissions are pipelined: the connection leases blocks of request ids from
the client node (IdLeaseRequest -> IdLease, read by the reader thread) and
sends each SubmitRequest with its ids and the `pipelined` flag, so a push
returns its ids without waiting for any reply (submit_pipelined). The next
block is asked for, without waiting, once half of the current one is used.

Large values are not copied through protobuf's Python classes: a request's
large parameters go out from their own memory (values.parameter_buffers,
sent with one sendmsg), and a large frame is read into a buffer of its own
and a ResponseDelivery in it parsed around its large values
(SplitResponse), which are decoded from the frame when asked for.
"""

import collections
import json
import os
import socket
import ssl
import stat
import struct
import sys
import threading
from concurrent import futures as _futures
from concurrent.futures import Future

from . import shm, values
from ._pb.casa.node.v1 import driver_pb2, envelope_pb2, node_pb2, value_pb2

# The protocol's numbers come from envelope.proto's Constant enum, as the
# Rust side's do.
PROTOCOL_VERSION = envelope_pb2.CONSTANT_PROTOCOL_VERSION
SOFTWARE = "casa-node-python 0.1.0"
ENDPOINT_VAR = "CASA_NODE_ENDPOINT"
CONNECTION_FILE_VAR = "CASA_NODE_CONNECTION_FILE"
MAX_FRAME = envelope_pb2.CONSTANT_MAX_FRAME
LEASE_BLOCK_VAR = "CASA_NODE_LEASE_BLOCK"
DEFAULT_LEASE_BLOCK = 4096
MAX_LEASE_BLOCK = envelope_pb2.CONSTANT_MAX_LEASE
_LENGTH = struct.Struct(">I")


class CasaNodeError(Exception):
    """Base class of casanode's errors."""


class NoCluster(CasaNodeError):
    """No endpoint given and none recorded."""


class Unreachable(CasaNodeError):
    """The front door could not be reached."""


class Refused(CasaNodeError):
    """The client node answered with a ProtocolError."""

    def __init__(self, message, code=0):
        super().__init__(message)
        self.code = code


class ConnectionClosed(CasaNodeError):
    """The connection to the client node is closed."""


class UnexpectedReply(CasaNodeError):
    """The client node answered with a message this client did not expect."""


class LeasesUnsupported(CasaNodeError):
    """The client node gives no id leases: submissions wait for a SubmitReply."""


def runtime_dir():
    """Where `casa-node up` keeps its sockets and endpoint record:
    $XDG_RUNTIME_DIR/casa-node, else $TMPDIR (or /tmp)/casa-node-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "casa-node")
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"casa-node-{os.getuid()}")


def _recorded_or_fail():
    """What `_recorded` returns, or NoCluster saying how to start one."""
    record = _recorded()
    if record is None:
        raise NoCluster(
            "no casa-node cluster found: start one with `casa-node up`, "
            f"or pass an endpoint or set {ENDPOINT_VAR}"
        )
    return record


def _recorded():
    """(endpoint, connection file or None) that `casa-node up` recorded,
    or None. A record whose process (its `pid N` line) is gone is stale,
    and taken as none; `casa-node` removes such records when it meets them."""
    record = os.path.join(runtime_dir(), "endpoint")
    try:
        with open(record, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return None
    if not lines:
        return None
    connection_file = None
    for line in lines[1:]:
        if line.startswith("pid "):
            if not _alive(line[len("pid "):]):
                return None
        else:
            connection_file = line
    return lines[0], connection_file


def _alive(pid):
    try:
        pid = int(pid)
    except ValueError:
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_connection_file(path):
    """The connection file of a tcp:// front door, as a dict with
    "endpoint", "token" and "cert" (and, in the node's copy, "key" and
    "signing_key"). Refused unless it is this user's and closed to group
    and others, since it holds secrets."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.getuid():
                raise CasaNodeError(
                    f"connection file {path}: belongs to uid {st.st_uid}, not to this user "
                    f"(uid {os.getuid()}); a connection file holds secrets and must be its user's own"
                )
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise CasaNodeError(
                    f"connection file {path}: group or others may access it (mode {mode:03o}); "
                    f"it holds secrets: make it 0600 (`chmod 600 {path}`)"
                )
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CasaNodeError(f"connection file {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise CasaNodeError(f"connection file {path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CasaNodeError(f"connection file {path}: not a JSON object")
    for field in ("endpoint", "token", "cert"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise CasaNodeError(f"connection file {path}: no {field!r}")
    if not data["endpoint"].startswith("tcp://"):
        raise CasaNodeError(f"connection file {path}: {data['endpoint']!r} is not tcp://HOST:PORT")
    return data


def _split_endpoint(endpoint):
    """("unix", PATH) or ("tcp", (HOST, PORT)) for an endpoint string."""
    endpoint = os.fspath(endpoint)
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
        if path:
            return "unix", path
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and int(port) < 65536:
            return "tcp", (host, int(port))
    elif "://" not in endpoint and endpoint:
        return "unix", endpoint
    raise CasaNodeError(f"invalid endpoint {endpoint!r}: expected unix://PATH or tcp://HOST:PORT")


def resolve(endpoint=None, connection_file=None):
    """(endpoint, connection file dict or None) of the front door to use.

    The endpoint: `endpoint`, else $CASA_NODE_ENDPOINT, else the connection
    file's, else the one `casa-node up` recorded. A tcp:// front door's
    connection file: `connection_file`, else $CASA_NODE_CONNECTION_FILE,
    else the one `up` recorded with that endpoint."""
    if not connection_file:
        connection_file = os.environ.get(CONNECTION_FILE_VAR) or None
    if not endpoint:
        endpoint = os.environ.get(ENDPOINT_VAR)
    conf = None
    if not endpoint and connection_file:
        conf = read_connection_file(connection_file)
        endpoint = conf["endpoint"]
    recorded_file = None
    if not endpoint:
        endpoint, recorded_file = _recorded_or_fail()
    endpoint = os.fspath(endpoint)
    kind, _ = _split_endpoint(endpoint)
    if kind == "unix":
        return endpoint, None
    if conf is None:
        if not connection_file:
            record = _recorded()
            if record is not None and record[0] == endpoint:
                recorded_file = record[1]
            connection_file = recorded_file
        if not connection_file:
            raise CasaNodeError(
                f"{endpoint}: a tcp:// front door needs its connection file: "
                f"pass connection_file or set {CONNECTION_FILE_VAR}"
            )
        conf = read_connection_file(connection_file)
    return endpoint, conf


def resolve_endpoint(endpoint=None):
    """The front door to use: `endpoint` (unix://PATH, a path, or
    tcp://HOST:PORT), else $CASA_NODE_ENDPOINT, else the record left by
    `casa-node up`. Returns a unix:// front door's socket path, or a
    tcp:// endpoint as it is."""
    if not endpoint:
        endpoint = os.environ.get(ENDPOINT_VAR)
    if not endpoint:
        endpoint = _recorded_or_fail()[0]
    endpoint = os.fspath(endpoint)
    kind, address = _split_endpoint(endpoint)
    return address if kind == "unix" else endpoint


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
_K_IDS = values.field_key(driver_pb2.SubmitRequest, "ids")
_PIPELINED = values.field_key(driver_pb2.SubmitRequest, "pipelined") + values._varint(1)


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


def _send_buffers(sock, buffers):
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


class _FrameReader:
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


def _parse_delivery(view):
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


class Connection:
    """One front door connection, shared by any number of threads."""

    def __init__(self, endpoint=None, timeout=30.0, connection_file=None, lease_block=None):
        if lease_block is None:
            lease_block = os.environ.get(LEASE_BLOCK_VAR) or DEFAULT_LEASE_BLOCK
        try:
            lease_block = int(lease_block)
        except ValueError:
            raise CasaNodeError(f"{LEASE_BLOCK_VAR}={lease_block!r} is not a whole number") from None
        if not 1 <= lease_block <= MAX_LEASE_BLOCK:
            raise CasaNodeError(f"an id lease block must hold 1 to {MAX_LEASE_BLOCK} ids, not {lease_block}")
        endpoint, conf = resolve(endpoint, connection_file)
        kind, address = _split_endpoint(endpoint)
        # Shared memory (see shm.py) only on this host: through unix
        # sockets, and once the Welcome's directory holds its tag.
        wants_shared = kind == "unix" and shm.threshold() > 0
        self.shared = None
        while True:
            sock = self._open(kind, address, endpoint, conf, timeout, wants_shared)
            if not wants_shared or self.shared is not None:
                break
            # Refused the directory after asking for references: again,
            # without.
            sock.close()
            wants_shared = False
        self.cluster = self.welcome.cluster
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._next_correlation = 2
        self._replies = {}
        self._responses = {}
        self._mapped = {}
        self._watchers = {}
        self._log_subscribers = []
        self._closed = False
        # Leased ids: [next, end) blocks, oldest first (guarded by
        # _lease_cond; taken under _send_lock, so ids go out in order).
        self.lease_block = lease_block
        self._lease_cond = threading.Condition(threading.Lock())
        self._leases = collections.deque()
        self._leased = 0  # ids left in _leases
        self._lease_asked = False  # an IdLeaseRequest is unanswered
        self._lease_error = None  # why no lease will come
        self._rejected = {}  # request id -> SubmitReply.Rejected
        self._reader = threading.Thread(target=self._read_loop, name="casanode-reader", daemon=True)
        self._reader.start()

    def _open(self, kind, address, endpoint, conf, timeout, wants_shared):
        """A connected, greeted socket; sets welcome and, when the
        Welcome's shared-memory directory checks out, shared."""
        if kind == "unix":
            self.path = address
            self.endpoint = f"unix://{self.path}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.path = None
            self.endpoint = endpoint
            sock = None
        try:
            if sock is None:
                sock = self._connect_tls(endpoint, address, conf["cert"], timeout)
            else:
                sock.settimeout(timeout)
                try:
                    sock.connect(self.path)
                except OSError as e:
                    raise Unreachable(f"cannot reach the casa-node front door at {self.endpoint}: {e}") from e
            self.welcome = self._handshake(sock, conf["token"] if conf else "", wants_shared)
            sock.settimeout(None)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        if wants_shared and self.welcome.shared_memory_directory:
            try:
                self.shared = shm.SharedDir(self.welcome.shared_memory_directory, self.welcome.shared_memory_tag)
            except (OSError, ValueError):
                self.shared = None
        elif wants_shared:
            self.shared = False  # the node offers none: nothing to refuse
        return sock

    @staticmethod
    def _connect_tls(endpoint, address, cert, timeout):
        """A TLS connection to a tcp:// front door that trusts only `cert`
        (the connection file's) and checks it names the endpoint's host."""
        try:
            context = ssl.create_default_context(cadata=cert)
        except (ssl.SSLError, ValueError) as e:
            raise CasaNodeError(f"the connection file's certificate is unusable: {e}") from e
        try:
            raw = socket.create_connection(address, timeout=timeout)
        except OSError as e:
            raise Unreachable(f"cannot reach the casa-node front door at {endpoint}: {e}") from e
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return context.wrap_socket(raw, server_hostname=address[0])
        except (ssl.SSLError, ssl.CertificateError) as e:
            raw.close()
            raise Unreachable(f"TLS with the casa-node front door at {endpoint} failed: {e}") from e
        except BaseException:
            raw.close()
            raise

    @staticmethod
    def _handshake(sock, token="", shared_memory=False):
        hello = envelope_pb2.Envelope(protocol_version=PROTOCOL_VERSION, correlation=1)
        hello.hello.protocol_version = PROTOCOL_VERSION
        hello.hello.role = envelope_pb2.ROLE_DRIVER
        hello.hello.software = SOFTWARE
        hello.hello.host = socket.gethostname()
        hello.hello.pid = os.getpid()
        hello.hello.token = token
        hello.hello.shared_memory = shared_memory
        sock.sendall(encode_frame(hello))
        try:
            reply = read_frame(sock)
        except socket.timeout:
            raise CasaNodeError("the client node did not answer the handshake in time") from None
        if reply is None:
            raise ConnectionClosed("the client node closed the connection during the handshake")
        kind = reply.WhichOneof("body")
        if kind == "welcome":
            return reply.welcome
        if kind == "error":
            raise Refused(f"the client node refused the connection: {reply.error.message}", reply.error.code)
        raise UnexpectedReply(f"expected Welcome, got {kind or 'nothing'}")

    @property
    def closed(self):
        return self._closed

    # ------------------------------------------------------------ requests

    def send(self, envelope):
        self.send_frame([encode_frame(envelope)])

    def send_frame(self, buffers):
        """Sends one frame given as buffers (see frame_buffers)."""
        with self._send_lock:
            if self._closed:
                raise ConnectionClosed("the connection to the client node is closed")
            try:
                _send_buffers(self._sock, buffers)
            except OSError as e:
                raise ConnectionClosed(f"the connection to the client node closed: {e}") from e

    def send_request(self, tag, buffers, size, on_reply):
        """Sends an Envelope with a fresh correlation whose body field `tag`
        (see body_tag) holds the message serialized in `buffers` (`size`
        bytes in all; large buffers are sent as they are, not copied).
        on_reply(kind, message, error) is called once, on the reader
        thread: with the reply's body name and message, or with the error
        (Refused for a ProtocolError reply, ConnectionClosed)."""
        with self._lock:
            if self._closed:
                raise ConnectionClosed("the connection to the client node is closed")
            correlation = self._next_correlation
            self._next_correlation += 1
            self._replies[correlation] = on_reply
        try:
            self.send_frame(frame_buffers(correlation, tag, buffers, size))
        except BaseException:
            with self._lock:
                self._replies.pop(correlation, None)
            raise

    def submit_pipelined(self, count, tag, buffers, size):
        """Sends a SubmitRequest (serialized in `buffers`, `size` bytes, as
        for send_request) for `count` requests with `count` leased ids and
        the pipelined flag, and returns the ids at once: the client node
        answers only with the responses (a rejection comes as a failure
        response for each id, see rejection). Waits only when no leased id
        is left. Raises LeasesUnsupported if the client node gives no
        leases, ConnectionClosed."""
        while True:
            refill = False
            with self._send_lock:
                if self._closed:
                    raise ConnectionClosed("the connection to the client node is closed")
                with self._lease_cond:
                    ids = self._take_ids(count)
                    if ids is not None and not self._lease_asked and self._leased < self.lease_block // 2:
                        refill = self._lease_asked = True
                if ids is not None:
                    packed = b"".join([values._varint(i) for i in ids])
                    tail = _K_IDS + values._varint(len(packed)) + packed + _PIPELINED
                    frame = frame_buffers(0, tag, [*buffers, tail], size + len(tail))
                    try:
                        _send_buffers(self._sock, frame)
                    except OSError as e:
                        raise ConnectionClosed(f"the connection to the client node closed: {e}") from e
            if refill:
                try:
                    self._ask_lease()
                except CasaNodeError:
                    pass  # recorded: the next wait for a lease raises it
            if ids is not None:
                return ids
            self._await_lease(count)

    def _take_ids(self, count):
        """`count` leased ids, in increasing order, or None if fewer are
        left (holding _lease_cond)."""
        if self._leased < count:
            return None
        ids = []
        leases = self._leases
        while len(ids) < count:
            block = leases[0]
            take = min(count - len(ids), block[1] - block[0])
            ids.extend(range(block[0], block[0] + take))
            block[0] += take
            if block[0] == block[1]:
                leases.popleft()
        self._leased -= count
        return ids

    def _await_lease(self, count):
        """Waits until `count` leased ids are at hand, asking for blocks."""
        while True:
            with self._lease_cond:
                while self._lease_asked and self._leased < count and self._lease_error is None:
                    self._lease_cond.wait()
                if self._lease_error is not None:
                    raise self._lease_error
                if self._leased >= count:
                    return
                self._lease_asked = True
            self._ask_lease()

    def _ask_lease(self):
        """Sends an IdLeaseRequest; the reader thread takes the IdLease."""
        data = driver_pb2.IdLeaseRequest(count=self.lease_block).SerializeToString()
        try:
            self.send_request(_LEASE_TAG, [data], len(data), self._on_lease)
        except BaseException as e:
            with self._lease_cond:
                self._lease_asked = False
                if isinstance(e, CasaNodeError):
                    self._lease_error = e
                self._lease_cond.notify_all()
            raise

    def _on_lease(self, kind, message, error):
        with self._lease_cond:
            self._lease_asked = False
            if isinstance(error, Refused):
                self._lease_error = LeasesUnsupported(str(error))
            elif error is not None:
                self._lease_error = error
            elif kind == "id_lease" and message.count > 0:
                self._leases.append([message.first, message.first + message.count])
                self._leased += message.count
            else:
                self._lease_error = UnexpectedReply(f"expected IdLease, got {kind or 'nothing'}")
            self._lease_cond.notify_all()

    def rejection(self, request_id):
        """The SubmitReply.Rejected that `request_id`'s failure response
        carried (a pipelined submission's rejection, rule 14), or None."""
        with self._lock:
            return self._rejected.get(request_id)

    def request_buffers(self, tag, buffers, size, timeout=None):
        """send_request, waited for: the reply's (body name, message)."""
        waiter = _Waiter()
        self.send_request(tag, buffers, size, waiter)
        return waiter.wait(timeout)

    def _body(self, body):
        (name, message), = body.items()
        tag = body_tag(name)
        expected = envelope_pb2.Envelope.DESCRIPTOR.fields_by_name[name].message_type
        if getattr(message, "DESCRIPTOR", None) is not expected:
            raise TypeError(f"{name} takes a {expected.full_name}, not {type(message).__name__}")
        data = message.SerializeToString()
        return tag, [data], len(data)

    def request_async(self, **body):
        """Sends an Envelope with one body field (e.g. submit_request=msg)
        and a fresh correlation; returns a Future of the reply's
        (body name, message). A ProtocolError reply sets Refused."""
        future = Future()

        def resolve(kind, message, error):
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((kind, message))

        self.send_request(*self._body(body), resolve)
        return future

    def request(self, timeout=None, **body):
        """request_async, waited for."""
        waiter = _Waiter()
        self.send_request(*self._body(body), waiter)
        return waiter.wait(timeout)

    # ----------------------------------------------------------- responses

    def watch(self, request_id, callback):
        """Calls callback(response, None) once the first response for
        `request_id` is delivered (at once if it already was), or
        callback(None, ConnectionClosed) if the connection closes first."""
        with self._lock:
            response = self._responses.get(request_id)
            closed = self._closed
            if response is None and not closed:
                self._watchers.setdefault(request_id, []).append(callback)
                return
        if response is not None:
            callback(response, None)
        else:
            callback(None, ConnectionClosed("the connection to the client node closed"))

    def adopt(self, closed):
        """Takes the responses and rejections `closed` (a connection that
        closed) received, for the ids this one has none of: a connection
        that replaces it (Client's reconnection, rule 33)."""
        with closed._lock:
            responses, rejected = dict(closed._responses), dict(closed._rejected)
        with self._lock:
            for rid, response in responses.items():
                self._responses.setdefault(rid, response)
            for rid, rejection in rejected.items():
                self._rejected.setdefault(rid, rejection)

    def response(self, request_id):
        """The latest response delivered for `request_id`, or None: a
        CommandResponse, or for a large frame a SplitResponse that reads
        the same (its message() is the CommandResponse)."""
        with self._lock:
            return self._responses.get(request_id)

    def forget(self, request_ids):
        """Drops stored responses, for long-running drivers."""
        released = []
        with self._lock:
            for rid in request_ids:
                self._responses.pop(rid, None)
                self._rejected.pop(rid, None)
                released += self._mapped.pop(rid, ())
        values.release_shared(released)

    # ---------------------------------------------------------------- logs

    def add_log_subscriber(self, callback):
        """callback(LogRecord) is called, on the reader thread, for every
        log record the client node forwards (after a LogSubscription), and
        callback(None) once when the connection closes."""
        with self._lock:
            if callback not in self._log_subscribers:
                self._log_subscribers.append(callback)

    def remove_log_subscriber(self, callback):
        with self._lock:
            if callback in self._log_subscribers:
                self._log_subscribers.remove(callback)

    # -------------------------------------------------------------- reader

    def _read_loop(self):
        reader = _FrameReader(self._sock)
        try:
            while True:
                frame = reader.next()
                if frame is None:
                    break
                data, large = frame
                if large:
                    self._dispatch_large(data)
                else:
                    self._dispatch(envelope_pb2.Envelope.FromString(data))
        except Exception:  # a closed socket, a malformed frame
            pass
        finally:
            self._shutdown()

    def _dispatch_large(self, view):
        try:
            parsed = _parse_delivery(view)
        except (values.Irregular, UnicodeDecodeError):
            parsed = None
        if parsed is None:
            self._dispatch(envelope_pb2.Envelope.FromString(view))
        else:
            self._deliver(parsed[1])

    def _deliver(self, response):
        rid = response.id
        mapped = None
        if self.shared:
            ret = response.ret if response.HasField("ret") else None
            if ret is not None:
                mapped = values.claim_shared(ret, self.shared)
        with self._lock:
            if mapped:
                self._mapped.setdefault(rid, []).extend(mapped)
            first = rid not in self._responses
            # The latest record wins: a delivery with replaces_timeout
            # replaces the timeout record sent before it (rule 21).
            self._responses[rid] = response
            watchers = self._watchers.pop(rid, None) if first else None
        if watchers:
            for watcher in watchers:
                _call(watcher, response, None)

    def _dispatch(self, envelope):
        kind = envelope.WhichOneof("body")
        if kind == "response_delivery":
            delivery = envelope.response_delivery
            if delivery.HasField("rejected"):
                with self._lock:
                    self._rejected[delivery.response.id] = delivery.rejected
            self._deliver(delivery.response)
        elif kind == "log_record":
            with self._lock:
                subscribers = list(self._log_subscribers)
            for subscriber in subscribers:
                _call(subscriber, envelope.log_record)
        else:
            with self._lock:
                on_reply = self._replies.pop(envelope.correlation, None)
            if on_reply is None:
                return
            if kind == "error":
                error = Refused(f"the client node says: {envelope.error.message}", envelope.error.code)
                _call(on_reply, kind, None, error)
            else:
                _call(on_reply, kind, getattr(envelope, kind) if kind else None, None)

    def _shutdown(self):
        with self._lock:
            mapped, self._mapped = self._mapped, {}
            self._closed = True
            replies, self._replies = self._replies, {}
            watchers, self._watchers = self._watchers, {}
            subscribers, self._log_subscribers = self._log_subscribers, []
        values.release_shared([name for names in mapped.values() for name in names])
        for subscriber in subscribers:
            _call(subscriber, None)
        for on_reply in replies.values():
            _call(on_reply, None, None, ConnectionClosed("the connection to the client node closed"))
        for callbacks in watchers.values():
            for callback in callbacks:
                _call(callback, None, ConnectionClosed("the connection to the client node closed"))
        try:
            self._sock.close()
        except OSError:
            pass

    def close(self):
        """Closes the connection; pending requests fail with ConnectionClosed."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_LEASE_TAG = body_tag("id_lease_request")


class _Waiter:
    """A reply handler (see Connection.send_request) that a thread waits on."""

    __slots__ = ("_done", "_reply", "_error")

    def __init__(self):
        self._done = threading.Lock()
        self._done.acquire()
        self._reply = self._error = None

    def __call__(self, kind, message, error):
        self._reply = (kind, message)
        self._error = error
        self._done.release()

    def wait(self, timeout=None):
        """The reply's (body name, message); raises its error, or
        TimeoutError after `timeout` seconds."""
        if not self._done.acquire(True, -1 if timeout is None else max(timeout, 0)):
            raise _futures.TimeoutError()
        if self._error is not None:
            raise self._error
        return self._reply


def _call(fn, *args):
    try:
        fn(*args)
    except Exception:  # a subscriber's bug must not stop the reader
        pass
