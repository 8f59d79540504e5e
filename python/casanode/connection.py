"""A thread-safe connection to a casa-node head node's front door.

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
the head node (IdLeaseRequest -> IdLease, read by the reader thread) and
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
import os
import socket
import ssl
import threading
from concurrent.futures import Future
from concurrent import futures as _futures

from . import shm, values
from ._pb.casa.node.v1 import driver_pb2, envelope_pb2
# casanode.connection's names, as drivers and tests import them.
from .discovery import (  # noqa: F401
    CONNECTION_FILE_VAR,
    ENDPOINT_VAR,
    read_connection_file,
    resolve,
    resolve_endpoint,
    runtime_dir,
    split_endpoint,
)
from .errors import (  # noqa: F401
    CasaNodeError,
    ConnectionClosed,
    LeasesUnsupported,
    NoCluster,
    Refused,
    UnexpectedReply,
    Unreachable,
)
from .wire import (  # noqa: F401
    MAX_FRAME,
    FrameReader,
    PIPELINED_FLAG,
    PROTOCOL_VERSION,
    SUBMIT_IDS_KEY,
    SplitResponse,
    body_tag,
    encode_frame,
    frame_buffers,
    parse_delivery,
    read_frame,
    send_buffers,
)

SOFTWARE = "casa-node-python 0.1.0"
LEASE_BLOCK_VAR = "CASA_NODE_LEASE_BLOCK"
DEFAULT_LEASE_BLOCK = 4096
MAX_LEASE_BLOCK = envelope_pb2.CONSTANT_MAX_LEASE


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
        kind, address = split_endpoint(endpoint)
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
            raise CasaNodeError("the head node did not answer the handshake in time") from None
        if reply is None:
            raise ConnectionClosed("the head node closed the connection during the handshake")
        kind = reply.WhichOneof("body")
        if kind == "welcome":
            return reply.welcome
        if kind == "error":
            raise Refused(f"the head node refused the connection: {reply.error.message}", reply.error.code)
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
                raise ConnectionClosed("the connection to the head node is closed")
            try:
                send_buffers(self._sock, buffers)
            except OSError as e:
                raise ConnectionClosed(f"the connection to the head node closed: {e}") from e

    def send_request(self, tag, buffers, size, on_reply):
        """Sends an Envelope with a fresh correlation whose body field `tag`
        (see body_tag) holds the message serialized in `buffers` (`size`
        bytes in all; large buffers are sent as they are, not copied).
        on_reply(kind, message, error) is called once, on the reader
        thread: with the reply's body name and message, or with the error
        (Refused for a ProtocolError reply, ConnectionClosed)."""
        with self._lock:
            if self._closed:
                raise ConnectionClosed("the connection to the head node is closed")
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
        the pipelined flag, and returns the ids at once: the head node
        answers only with the responses (a rejection comes as a failure
        response for each id, see rejection). Waits only when no leased id
        is left. Raises LeasesUnsupported if the head node gives no
        leases, ConnectionClosed."""
        while True:
            refill = False
            with self._send_lock:
                if self._closed:
                    raise ConnectionClosed("the connection to the head node is closed")
                with self._lease_cond:
                    ids = self._take_ids(count)
                    if ids is not None and not self._lease_asked and self._leased < self.lease_block // 2:
                        refill = self._lease_asked = True
                if ids is not None:
                    packed = b"".join([values._varint(i) for i in ids])
                    tail = SUBMIT_IDS_KEY + values._varint(len(packed)) + packed + PIPELINED_FLAG
                    frame = frame_buffers(0, tag, [*buffers, tail], size + len(tail))
                    try:
                        send_buffers(self._sock, frame)
                    except OSError as e:
                        raise ConnectionClosed(f"the connection to the head node closed: {e}") from e
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
            callback(None, ConnectionClosed("the connection to the head node closed"))

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
        log record the head node forwards (after a LogSubscription), and
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
        reader = FrameReader(self._sock)
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
            parsed = parse_delivery(view)
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
                error = Refused(f"the head node says: {envelope.error.message}", envelope.error.code)
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
            _call(on_reply, None, None, ConnectionClosed("the connection to the head node closed"))
        for callbacks in watchers.values():
            for callback in callbacks:
                _call(callback, None, ConnectionClosed("the connection to the head node closed"))
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
