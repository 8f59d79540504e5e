"""The modern face: `casanode.connect()` -> Client, with Futures.

    client = casanode.connect()
    f = client.submit("a+b", parameters={"a": 1, "b": 2})
    f.result()["ret"]                      # 3
    fs = client.submit("x = 1", target=[1, 2])   # one Future per rank
    client.wait(fs)                        # the response dicts, in id order

A Future resolves to the response dict whatever the command did: check its
`successful`, `status` and `traceback` (rules 7, 9, 10). A submission the
client node refuses raises SubmissionRejected; nothing was queued (rule 14).
"""

import threading
import time
from concurrent.futures import Future

from . import values
from ._pb.casa.node.v1 import driver_pb2, node_pb2
from .connection import CasaNodeError, Connection, UnexpectedReply

MODES = {
    node_pb2.COMMAND_MODE_UNSPECIFIED: "auto",
    node_pb2.COMMAND_MODE_AUTO: "auto",
    node_pb2.COMMAND_MODE_EVAL: "eval",
    node_pb2.COMMAND_MODE_EXEC: "exec",
    node_pb2.COMMAND_MODE_PUSH: "push",
}
_MODE_BY_NAME = {
    "auto": node_pb2.COMMAND_MODE_AUTO,
    "eval": node_pb2.COMMAND_MODE_EVAL,
    "exec": node_pb2.COMMAND_MODE_EXEC,
    "push": node_pb2.COMMAND_MODE_PUSH,
}
STATUSES = {
    node_pb2.COMMAND_STATUS_UNSPECIFIED: "unknown",
    node_pb2.COMMAND_STATUS_HOLDING_QUEUE: "holding queue",
    node_pb2.COMMAND_STATUS_REQUEST_SENT: "request sent",
    node_pb2.COMMAND_STATUS_RESPONSE_RECEIVED: "response received",
    node_pb2.COMMAND_STATUS_TIMEOUT: "timeout",
    node_pb2.COMMAND_STATUS_CANCELLED: "cancelled",
}


class UnknownRequest(CasaNodeError):
    """An id this client never received from a submission (rule 17)."""


class SubmissionRejected(CasaNodeError):
    """The client node refused a submission; nothing of it was queued.
    `reason` is the RejectReason's short name, e.g. "UNKNOWN_TARGET"."""

    def __init__(self, reason, message):
        super().__init__(f"rejected ({reason}): {message}")
        self.reason = reason
        self.message = message


def response_dict(response):
    """A CommandResponse as the seed's response dict (rule 9)."""
    parameters = values.parameters_from_pb(response.parameters) or None
    return {
        "command": response.command,
        "id": response.id,
        "mode": MODES.get(response.mode, "auto"),
        "parameters": parameters,
        "ret": values.from_value(response.ret) if response.HasField("ret") else None,
        "server": response.server,
        "status": STATUSES.get(response.status, "unknown"),
        "successful": response.successful,
        "traceback": response.traceback if response.HasField("traceback") else None,
        "command_start_time": response.command_start_time,
        "command_stop_time": response.command_stop_time,
    }


def _server_dict(s):
    return {
        "rank": s.rank,
        "processor": s.processor,
        "pid": s.pid,
        "worker_pid": s.worker_pid,
        "busy": s.busy,
        "command": s.command or None,
        "command_id": s.command_id or None,
        "command_start_time": s.command_start_time or None,
        "timeout": s.timeout,
        "online": s.online,
        "last_ping": s.last_ping,
        "rss": s.rss,
    }


def cluster_dict(c):
    """ClusterInfo as a dict."""
    return {
        "transport": c.transport,
        "host": c.host,
        "client_rank": c.client_rank,
        "world_size": c.world_size,
        "server_ranks": list(c.server_ranks),
        "heartbeat_seconds": c.heartbeat_seconds,
        "timeout_seconds": c.timeout_seconds,
        "debugging": c.debugging,
    }


def _ids(items):
    """Request ids from ids, Futures from submit, or lists of either."""
    if isinstance(items, (int, Future)):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, Future):
            out.append(item.id)
        elif isinstance(item, (list, tuple)):
            out.extend(_ids(item))
        else:
            out.append(int(item))
    return out


class Client:
    """A connection to a casa-node cluster's front door."""

    def __init__(self, connection):
        self.connection = connection
        self._known = set()
        self._lock = threading.Lock()

    @property
    def cluster(self):
        """The cluster as it was when this client connected."""
        return cluster_dict(self.connection.cluster)

    def _expect(self, reply, kind):
        name, message = reply
        if name != kind:
            raise UnexpectedReply(f"expected {kind}, got {name or 'nothing'}")
        return message

    def submit(self, command, target=None, parameters=None, deadline=None, mode=None):
        """Pushes `command` (rule 1). `target`: None for the first available
        server, a rank, or a list of ranks (one request each, in order).
        `parameters`: a dict of names bound in the server's globals.
        `deadline`: seconds the command may run. `mode`: "eval", "exec",
        "push" or None to let the server decide (rule 2).

        Returns a Future (or, for a list target, a list of Futures) resolving
        to the response dict; each Future's `id` is its request id."""
        request = driver_pb2.SubmitRequest(command=command)
        if mode is not None:
            request.mode = _MODE_BY_NAME[mode]
        request.parameters.extend(values.parameters_to_pb(parameters))
        many = isinstance(target, (list, tuple, range))
        if target is not None:
            request.targets.extend([int(t) for t in target] if many else [int(target)])
        if deadline is not None:
            request.deadline_seconds = float(deadline)
        reply = self._expect(self.connection.request(submit_request=request), "submit_reply")
        outcome = reply.WhichOneof("outcome")
        if outcome == "rejected":
            reason = driver_pb2.RejectReason.Name(reply.rejected.reason).replace("REJECT_REASON_", "")
            raise SubmissionRejected(reason, reply.rejected.message)
        if outcome != "accepted":
            raise UnexpectedReply("an empty SubmitReply")
        with self._lock:
            self._known.update(reply.accepted.ids)
        futures = [self._future(rid) for rid in reply.accepted.ids]
        if many:
            return futures
        if len(futures) != 1:
            raise UnexpectedReply(f"one request submitted, {len(futures)} ids given")
        return futures[0]

    def _future(self, request_id):
        future = Future()
        future.id = request_id
        # Running: Future.cancel() cannot cancel it locally; Client.cancel
        # cancels on the cluster, and the response says `cancelled`.
        future.set_running_or_notify_cancel()

        def resolve(response, error):
            if error is not None:
                future.set_exception(error)
                return
            try:
                future.set_result(response_dict(response))
            except Exception as e:  # a ret this process cannot hold
                future.set_exception(e)

        self.connection.watch(request_id, resolve)
        return future

    def check_known(self, ids):
        """Raises UnknownRequest for an id this client never received from
        a submission (rule 17)."""
        with self._lock:
            unknown = [rid for rid in ids if rid not in self._known]
        if unknown:
            raise UnknownRequest(f"unknown request id {unknown[0]}")

    def wait(self, items, timeout=None):
        """Waits for the responses to `items` (Futures or ids, rule 16) and
        returns the latest record of each as a dict, in id order. Raises
        TimeoutError when `timeout` seconds pass first."""
        ids = sorted(set(_ids(items)))
        self.check_known(ids)
        end = None if timeout is None else time.monotonic() + timeout
        for rid in ids:
            left = None if end is None else max(0.0, end - time.monotonic())
            future = Future()
            self.connection.watch(rid, lambda r, e, f=future: f.set_exception(e) if e else f.set_result(r))
            future.result(left)
        return [self.response(rid) for rid in ids]

    def response(self, request_id):
        """The latest response dict delivered for `request_id`, or None; a
        real response replaces a timeout record (rule 21)."""
        response = self.connection.response(request_id)
        return None if response is None else response_dict(response)

    def status(self, server=None):
        """The server table (rule 23): {rank: dict} for all servers or one."""
        request = driver_pb2.StatusRequest()
        if server is not None:
            request.server = int(server)
        reply = self._expect(self.connection.request(status_request=request), "status_reply")
        return {s.rank: _server_dict(s) for s in reply.servers}

    def cancel(self, items):
        """Cancels requests (rule 24): Futures or ids. Returns the lists of
        ids dequeued, being interrupted, and not pending."""
        request = driver_pb2.CancelRequest(ids=_ids(items))
        reply = self._expect(self.connection.request(cancel_request=request), "cancel_reply")
        return {
            "dequeued": list(reply.dequeued),
            "interrupting": list(reply.interrupting),
            "not_pending": list(reply.not_pending),
        }

    def stop(self, force=False):
        """Stops services (rule 27): servers finish (or, forced, interrupt)
        their commands and exit; later submissions are refused."""
        reply = self._expect(
            self.connection.request(stop_request=driver_pb2.StopRequest(force=force)), "ack"
        )
        if not reply.ok:
            raise CasaNodeError(f"stop failed: {reply.error}")

    def close(self):
        """Closes the connection (the cluster keeps running)."""
        self.connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(endpoint=None, timeout=30.0):
    """Connects to a cluster's front door: `endpoint` (unix://PATH), else
    $CASA_NODE_ENDPOINT, else the cluster `casa-node up` recorded."""
    return Client(Connection(endpoint, timeout=timeout))

