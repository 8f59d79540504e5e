"""A thread-safe connection to a casa-node client node's front door.

Frames are a 4-byte big-endian length followed by one casa.node.v1.Envelope.
The connecting side sends Hello (role DRIVER) and reads Welcome or
ProtocolError. Afterwards a reader thread dispatches replies by envelope
correlation, stores every ResponseDelivery by request id (a later delivery
with replaces_timeout replaces the earlier record, rule 21), and hands
LogRecords to subscribers.
"""

import os
import socket
import struct
import threading
from concurrent.futures import Future

from ._pb.casa.node.v1 import envelope_pb2

PROTOCOL_VERSION = 1
SOFTWARE = "casa-node-python 0.1.0"
ENDPOINT_VAR = "CASA_NODE_ENDPOINT"
MAX_FRAME = 1 << 30
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


def runtime_dir():
    """Where `casa-node up` keeps its sockets and endpoint record:
    $XDG_RUNTIME_DIR/casa-node, else $TMPDIR (or /tmp)/casa-node-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "casa-node")
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"casa-node-{os.getuid()}")


def resolve_endpoint(endpoint=None):
    """The socket path of the front door: `endpoint` (unix://PATH or a
    path), else $CASA_NODE_ENDPOINT, else the record left by `casa-node up`."""
    if not endpoint:
        endpoint = os.environ.get(ENDPOINT_VAR)
    if not endpoint:
        record = os.path.join(runtime_dir(), "endpoint")
        try:
            with open(record, encoding="utf-8") as f:
                endpoint = f.read().strip()
        except FileNotFoundError:
            raise NoCluster(
                "no casa-node cluster found: start one with `casa-node up`, "
                f"or pass an endpoint or set {ENDPOINT_VAR}"
            ) from None
    endpoint = os.fspath(endpoint)
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("tcp://"):
        raise CasaNodeError(f"{endpoint}: only unix:// front doors are supported by this version")
    elif "://" not in endpoint and endpoint:
        path = endpoint
    else:
        raise CasaNodeError(f"invalid endpoint {endpoint!r}: expected unix://PATH")
    if not path:
        raise CasaNodeError(f"invalid endpoint {endpoint!r}: expected unix://PATH")
    return path


def _recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None if got == 0 else _truncated()
        got += k
    return bytes(buf)


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


class Connection:
    """One front door connection, shared by any number of threads."""

    def __init__(self, endpoint=None, timeout=30.0):
        self.path = resolve_endpoint(endpoint)
        self.endpoint = f"unix://{self.path}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except OSError as e:
                raise Unreachable(f"cannot reach the casa-node front door at {self.endpoint}: {e}") from e
            self.welcome = self._handshake(sock)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self.cluster = self.welcome.cluster
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._next_correlation = 2
        self._replies = {}
        self._responses = {}
        self._watchers = {}
        self._log_subscribers = []
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="casanode-reader", daemon=True)
        self._reader.start()

    @staticmethod
    def _handshake(sock):
        hello = envelope_pb2.Envelope(protocol_version=PROTOCOL_VERSION, correlation=1)
        hello.hello.protocol_version = PROTOCOL_VERSION
        hello.hello.role = envelope_pb2.ROLE_DRIVER
        hello.hello.software = SOFTWARE
        hello.hello.host = socket.gethostname()
        hello.hello.pid = os.getpid()
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
        frame = encode_frame(envelope)
        with self._send_lock:
            if self._closed:
                raise ConnectionClosed("the connection to the client node is closed")
            try:
                self._sock.sendall(frame)
            except OSError as e:
                raise ConnectionClosed(f"the connection to the client node closed: {e}") from e

    def request_async(self, **body):
        """Sends an Envelope with one body field (e.g. submit_request=msg)
        and a fresh correlation; returns a Future of the reply's
        (body name, message). A ProtocolError reply sets Refused."""
        (name, message), = body.items()
        envelope = envelope_pb2.Envelope(protocol_version=PROTOCOL_VERSION)
        getattr(envelope, name).CopyFrom(message)
        future = Future()
        with self._lock:
            if self._closed:
                raise ConnectionClosed("the connection to the client node is closed")
            correlation = self._next_correlation
            self._next_correlation += 1
            self._replies[correlation] = future
        envelope.correlation = correlation
        try:
            self.send(envelope)
        except BaseException:
            with self._lock:
                self._replies.pop(correlation, None)
            raise
        return future

    def request(self, timeout=None, **body):
        """request_async, waited for."""
        return self.request_async(**body).result(timeout)

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

    def response(self, request_id):
        """The latest response delivered for `request_id`, or None."""
        with self._lock:
            return self._responses.get(request_id)

    def forget(self, request_ids):
        """Drops stored responses, for long-running drivers."""
        with self._lock:
            for rid in request_ids:
                self._responses.pop(rid, None)

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
        try:
            while True:
                envelope = read_frame(self._sock)
                if envelope is None:
                    break
                self._dispatch(envelope)
        except Exception:  # a closed socket, a malformed frame
            pass
        finally:
            self._shutdown()

    def _dispatch(self, envelope):
        kind = envelope.WhichOneof("body")
        if kind == "response_delivery":
            delivery = envelope.response_delivery
            response = delivery.response
            with self._lock:
                first = response.id not in self._responses
                # The latest record wins: a delivery with replaces_timeout
                # replaces the timeout record sent before it (rule 21).
                self._responses[response.id] = response
                watchers = self._watchers.pop(response.id, []) if first else []
            for watcher in watchers:
                _call(watcher, response, None)
        elif kind == "log_record":
            with self._lock:
                subscribers = list(self._log_subscribers)
            for subscriber in subscribers:
                _call(subscriber, envelope.log_record)
        else:
            with self._lock:
                future = self._replies.pop(envelope.correlation, None)
            if future is None:
                return
            if kind == "error":
                future.set_exception(Refused(f"the client node says: {envelope.error.message}", envelope.error.code))
            else:
                future.set_result((kind, getattr(envelope, kind) if kind else None))

    def _shutdown(self):
        with self._lock:
            self._closed = True
            replies, self._replies = self._replies, {}
            watchers, self._watchers = self._watchers, {}
            subscribers, self._log_subscribers = self._log_subscribers, []
        for subscriber in subscribers:
            _call(subscriber, None)
        for future in replies.values():
            future.set_exception(ConnectionClosed("the connection to the client node closed"))
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


def _call(fn, *args):
    try:
        fn(*args)
    except Exception:  # a subscriber's bug must not stop the reader
        pass
