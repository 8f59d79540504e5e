"""The modern face: `casanode.connect()` -> Client, with Futures.

    client = casanode.connect()
    f = client.submit("a+b", parameters={"a": 1, "b": 2})
    f.result()["ret"]                      # 3
    fs = client.submit("x = 1", target=[1, 2])   # one Future per rank
    client.wait(fs)                        # the response dicts, in id order

A Future resolves to the response dict whatever the command did: check its
`successful`, `failure`, `status` and `traceback` (rules 7, 9, 10), or call
its `value()`, which returns `ret` or raises the failure as an exception
(CommandRaised, WorkerDied, DeadlineExceeded, ...: casanode.failures). A
submission the head node refuses sets SubmissionRejected on its Futures;
nothing of it was queued (rule 14). Submitting waits for no reply: the ids
come from the connection's leases.

Callbacks given to a Future's add_done_callback run, one at a time and in
the order their Futures completed, on a thread of casanode's own, not on
the connection's reader thread: a callback may submit and wait for
results (the reader thread goes on reading meanwhile, so the head node,
which stops reading from a driver that leaves its replies unread, rule
31, never waits on it). A callback added to a Future already done runs at
once in the thread that adds it, as concurrent.futures does.
"""

import atexit
import contextlib
import logging
import os
import queue
import struct
import threading
import time
from concurrent import futures as _futures
from concurrent.futures import Future

from . import progressbar, values
from .failures import failure_name, raise_for_failure
from ._pb.casa.node.v1 import driver_pb2, node_pb2
from .connection import (
    CasaNodeError,
    Connection,
    ConnectionClosed,
    LeasesUnsupported,
    UnexpectedReply,
    body_tag,
)

# Seconds a driver waiting for responses looks for its head node again
# when the connection closes, if the cluster keeps a journal (rule 33).
PATIENCE_VAR = "CASA_NODE_DRIVER_PATIENCE"
DEFAULT_PATIENCE = 120.0

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


LEVELS = {
    node_pb2.LOG_LEVEL_UNSPECIFIED: "INFO",
    node_pb2.LOG_LEVEL_DEBUG: "DEBUG",
    node_pb2.LOG_LEVEL_INFO: "INFO",
    node_pb2.LOG_LEVEL_WARNING: "WARNING",
    node_pb2.LOG_LEVEL_ERROR: "ERROR",
    node_pb2.LOG_LEVEL_CRITICAL: "CRITICAL",
}
_LEVEL_BY_NAME = {
    "DEBUG": node_pb2.LOG_LEVEL_DEBUG,
    "INFO": node_pb2.LOG_LEVEL_INFO,
    "WARNING": node_pb2.LOG_LEVEL_WARNING,
    "WARN": node_pb2.LOG_LEVEL_WARNING,
    "ERROR": node_pb2.LOG_LEVEL_ERROR,
    "CRITICAL": node_pb2.LOG_LEVEL_CRITICAL,
}


class _Callbacks:
    """The thread that runs CommandFutures' done-callbacks, in order, so that
    none runs on a connection's reader thread (see the module
    documentation). Started with the first callback; at exit, the
    callbacks already due still run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queue = None
        self._thread = None
        atexit.register(self._drain)

    def put(self, callback, future):
        with self._lock:
            if self._thread is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), name="casanode-callbacks", daemon=True)
                self._thread.start()
            self._queue.put((callback, future))

    @staticmethod
    def _run(due):
        while True:
            item = due.get()
            if item is None:
                return
            callback, future = item
            try:
                callback(future)
            except Exception:
                logging.getLogger("concurrent.futures").exception(
                    "exception calling callback for %r", future)

    def _drain(self):
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()


_CALLBACKS = _Callbacks()


class CommandFuture(Future):
    """A Future of the modern face: resolves to the response dict (rule 9);
    `value()` returns the command's `ret`, or raises the CommandFailed
    subclass of its failure (casanode.failures)."""

    def add_done_callback(self, fn):
        """Runs fn(future) once the Future is done: on casanode's callback
        thread, in completion order, or at once in this thread if it is
        done already."""
        if self.done():
            super().add_done_callback(fn)
            return
        super().add_done_callback(lambda future: _CALLBACKS.put(fn, future))

    def value(self, timeout=None):
        """The command's return value, waiting up to `timeout` seconds;
        raises CommandRaised, WorkerDied, DeadlineExceeded, ... when it
        failed (rule 7), SubmissionRejected when it was refused."""
        return raise_for_failure(self.result(timeout))


class UnknownRequest(CasaNodeError):
    """An id this client never received from a submission (rule 17)."""


class SubmissionRejected(CasaNodeError):
    """The head node refused a submission; nothing of it was queued.
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
        "failure": failure_name(response.failure),
        "worker_signal": response.worker_signal if response.HasField("worker_signal") else None,
        "worker_exit_code": response.worker_exit_code if response.HasField("worker_exit_code") else None,
    }


def _server_dict(s):
    return {
        "rank": s.rank,
        "processor": s.processor,
        "pid": s.pid,
        # 0 on the wire: not known yet (never a pid to signal).
        "worker_pid": s.worker_pid or None,
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
        "head_rank": c.head_rank,
        "world_size": c.world_size,
        "server_ranks": list(c.server_ranks),
        "heartbeat_seconds": c.heartbeat_seconds,
        "timeout_seconds": c.timeout_seconds,
        "debugging": c.debugging,
        "journal": c.journal,
    }


def log_dict(record):
    """A forwarded LogRecord as a dict: time (seconds since the epoch),
    level ("DEBUG" .. "CRITICAL"), origin ("HOST:server-R" or "HOST:head"),
    rank and message."""
    return {
        "time": record.time,
        "level": LEVELS.get(record.level, "INFO"),
        "origin": record.origin,
        "rank": record.rank,
        "message": record.message,
    }


def level_number(level):
    """A LogLevel from a name ("DEBUG", "INFO", "WARNING", ...)."""
    try:
        return _LEVEL_BY_NAME[str(level).upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(_LEVEL_BY_NAME)}") from None


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
    """A connection to a casa-node cluster's front door.

    When the cluster keeps a journal (rule 33) and the connection closes
    while responses are awaited (the head node died), the client looks
    for the head node again with `reconnect` (a callable making a new
    Connection) for up to `patience` seconds, claims the awaited requests
    there, and the waits (Futures, wait, the seed face's blocking calls)
    go on as if nothing had happened."""

    def __init__(self, connection, reconnect=None, patience=0.0):
        self.connection = connection
        self._reconnect_with = reconnect
        self._patience = patience
        self._orphans = []  # (request id, callback) awaiting a new connection
        self._reconnecting = False
        self._known = set()
        self._lock = threading.Lock()
        self._streams = []
        self._open_streams = ()  # a copy for the reader thread
        self._streams_lock = threading.Lock()  # held across the subscription's request
        self._subscribed = None  # the level the head node forwards from, or None

    @property
    def cluster(self):
        """The cluster as it was when this client connected."""
        return cluster_dict(self.connection.cluster)

    def _expect(self, reply, kind):
        name, message = reply
        if name != kind:
            raise UnexpectedReply(f"expected {kind}, got {name or 'nothing'}")
        return message

    def submit(self, command, target=None, parameters=None, deadline=None, mode=None, retry=True):
        """Pushes `command` (rule 1). `target`: None for the first available
        server, a rank, or a list of ranks (one request each, in order).
        `parameters`: a dict of names bound in the server's globals.
        `deadline`: seconds the command may run. `mode`: "eval", "exec",
        "push" or None to let the server decide (rule 2). `retry=False`:
        should the head node restart from its journal before answering,
        the request is not run again but fails naming the restart (rule
        33), for commands that must not run twice.

        Returns a Future (or, for a list target, a list of Futures) resolving
        to the response dict; each Future's `id` is its request id. It
        returns at once, without waiting for the head node: a refused
        submission (rule 14) sets SubmissionRejected on its Futures."""
        many, buffers, size = _submit_request(
            command, target, parameters, deadline, mode, self.connection.shared, retry
        )
        futures = [self._future(rid) for rid in self._push(many, target, buffers, size)]
        return futures if many else futures[0]

    def claim(self, items):
        """Futures for requests whoever submitted them (rule 33): after this
        driver lost its connection, or the head node restarted from its
        journal. Each resolves to the response dict, at once for a request
        already answered, when it is answered for one still pending. Raises
        UnknownRequest naming the ids the head node does not know (never
        given, or answered and not kept: responses are kept with
        --journal)."""
        ids = _ids(items)
        reply = self._claim_reply(self.connection, ids)
        if reply.unknown:
            raise UnknownRequest(
                "the head node knows no request with id " + ", ".join(str(i) for i in reply.unknown)
            )
        with self._lock:
            self._known.update(ids)
        return [self._future(rid) for rid in ids]

    def _claim_reply(self, connection, ids):
        """The ClaimReply of `connection`'s head node for `ids` (rule 33)."""
        return self._expect(
            connection.request(claim_request=driver_pb2.ClaimRequest(ids=ids)), "claim_reply"
        )

    def result(self, request_id, timeout=None):
        """The response dict of request `request_id`, whoever submitted it
        (see claim), waited for up to `timeout` seconds."""
        return self.claim([request_id])[0].result(timeout)

    def _push(self, many, target, buffers, size):
        """Sends a serialized submission and returns its ids, now known:
        pipelined, with leased ids; with a head node that leases none,
        waiting for its SubmitReply (then a rejection raises
        SubmissionRejected)."""
        count = max(1, len(target)) if many else 1
        try:
            ids = self.connection.submit_pipelined(count, _SUBMIT, buffers, size)
        except LeasesUnsupported:
            return self._accepted(self.connection.request_buffers(_SUBMIT, buffers, size), many)
        with self._lock:
            self._known.update(ids)
        return ids

    def rejection(self, request_id):
        """SubmissionRejected if `request_id`'s submission was refused
        (its response is then a failure record saying why), else None."""
        rejected = self.connection.rejection(request_id)
        if rejected is None:
            return None
        reason = driver_pb2.RejectReason.Name(rejected.reason).replace("REJECT_REASON_", "")
        return SubmissionRejected(reason, rejected.message)

    def _accepted(self, reply, many):
        """The ids of an accepted submission, now known; raises
        SubmissionRejected or UnexpectedReply."""
        reply = self._expect(reply, "submit_reply")
        outcome = reply.WhichOneof("outcome")
        if outcome == "rejected":
            reason = driver_pb2.RejectReason.Name(reply.rejected.reason).replace("REJECT_REASON_", "")
            raise SubmissionRejected(reason, reply.rejected.message)
        if outcome != "accepted":
            raise UnexpectedReply("an empty SubmitReply")
        ids = list(reply.accepted.ids)
        with self._lock:
            self._known.update(ids)
        if not many and len(ids) != 1:
            raise UnexpectedReply(f"one request submitted, {len(ids)} ids given")
        return ids

    def _submit_ids(self, command, target=None, parameters=None):
        """submit, returning the request ids (a list) instead of Futures."""
        many, buffers, size = _submit_request(command, target, parameters, None, None, self.connection.shared)
        return self._push(many, target, buffers, size)

    def _submit_waiting(self, command, target=None, parameters=None):
        """Sends a submission; returns a _Submission whose wait() returns
        once all its responses arrived, with one wake-up of the calling
        thread, and raises SubmissionRejected if it was refused."""
        return _Submission(self, self._submit_ids(command, target, parameters))

    def _future(self, request_id):
        future = CommandFuture()
        future.id = request_id
        # Running: Future.cancel() cannot cancel it locally; Client.cancel
        # cancels on the cluster, and the response says `cancelled`.
        future.set_running_or_notify_cancel()

        def resolve(response, error):
            if error is None:
                error = self.rejection(request_id)
            if error is not None:
                future.set_exception(error)
                return
            try:
                future.set_result(response_dict(response))
            except Exception as e:  # a ret this process cannot hold
                future.set_exception(e)

        self._watch(request_id, resolve)
        return future

    def _watch(self, request_id, callback):
        """connection.watch, carried over to the head node that takes the
        place of one that went away (see the class documentation)."""
        connection = self.connection

        def watched(response, error):
            if isinstance(error, ConnectionClosed) and self._reattach(connection, request_id, callback):
                return
            callback(response, error)

        connection.watch(request_id, watched)

    def _reattach(self, closed, request_id, callback):
        """Queues a watch of `closed` (a Connection that closed) for the
        head node that takes its place; False when there is none to wait
        for: no journal, no patience."""
        if not (self._reconnect_with and self._patience > 0 and closed.cluster.journal):
            return False
        with self._lock:
            replaced = closed is not self.connection
            if not replaced:
                self._orphans.append((request_id, callback))
                if not self._reconnecting:
                    self._reconnecting = True
                    threading.Thread(target=self._reconnect, name="casanode-reconnect", daemon=True).start()
        if replaced:
            self._claim_and_watch([(request_id, callback)])
        return True

    def _reconnect(self):
        """Looks for the head node again, every 0.2 s and then less often
        (up to 1 s), for up to the patience; then claims what is awaited."""
        end = time.monotonic() + self._patience
        pause, error, connection = 0.2, None, None
        while connection is None:
            try:
                connection = self._reconnect_with()
            except (CasaNodeError, OSError) as e:
                error = e
                if time.monotonic() + pause >= end:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        with self._lock:
            orphans, self._orphans = self._orphans, []
            self._reconnecting = False
            if connection is not None:
                # What arrived before the head node went away stays.
                connection.adopt(self.connection)
                self.connection = connection
        if connection is None:
            gone = ConnectionClosed(
                f"the head node went away and was not found again within {self._patience:g} s: {error}"
            )
            for _, callback in orphans:
                callback(None, gone)
            return
        self._claim_and_watch(orphans)

    def _claim_and_watch(self, orphans):
        """Claims the requests of `orphans` (request id, callback) on the
        current connection and watches them there."""
        connection = self.connection
        ids = sorted({rid for rid, _ in orphans})
        try:
            reply = self._claim_reply(connection, ids)
        except CasaNodeError as e:
            for _, callback in orphans:
                callback(None, e if isinstance(e, ConnectionClosed) else ConnectionClosed(str(e)))
            return
        unknown = set(reply.unknown)
        for rid, callback in orphans:
            if rid in unknown:
                callback(None, UnknownRequest(f"the head node that took the place of the one that went away knows no request with id {rid}"))
            else:
                self._watch(rid, callback)

    def check_known(self, ids):
        """Raises UnknownRequest for an id this client never received from
        a submission (rule 17)."""
        with self._lock:
            unknown = [rid for rid in ids if rid not in self._known]
        if unknown:
            raise UnknownRequest(f"unknown request id {unknown[0]}")

    def forget(self, items):
        """Drops what this client holds for `items` (Futures or ids): their
        responses and the ids themselves, which become unknown (rule 17).
        A long-running driver calls it for responses it is done with, so
        that its memory stays bounded. Forget ids whose final response has
        arrived: one that arrives later is held again."""
        ids = set(_ids(items))
        with self._lock:
            self._known.difference_update(ids)
        self.connection.forget(ids)

    def wait(self, items, timeout=None):
        """Waits for the responses to `items` (Futures or ids, rule 16) and
        returns the latest record of each as a dict, in id order. Raises
        TimeoutError when `timeout` seconds pass first."""
        ids = sorted(set(_ids(items)))
        self.check_known(ids)
        latch = _Latch(len(ids))
        for rid in ids:
            self._watch(rid, latch.arrived)
        latch.wait(timeout)
        return [self.response(rid) for rid in ids]

    def map(
        self, command, parameter_sets, target=None, deadline=None, mode=None, timeout=None, retry=True,
        progress=False,
    ):
        """Submits `command` once per parameters dict in `parameter_sets`
        (all at once, spread over the servers unless `target` names one),
        then yields the response dicts in the order of `parameter_sets`.
        `timeout` bounds the whole wait, as in Executor.map; TimeoutError
        when it passes first. All submissions are sent before anything is
        yielded, without waiting for any reply; a rejected one raises
        SubmissionRejected when its result is reached, and the others
        still run. `retry` is as for submit.

        `progress=True` shows the progress of all the commands on stderr
        (as casanode.progress does) while the results are iterated: it
        moves while the iteration waits for the next result, and ends
        before the last one is yielded."""
        if isinstance(target, (list, tuple, range)):
            raise ValueError("map takes one target rank or None, not a list")
        meter = progressbar.Meter() if progress else None
        submitted = []
        for p in parameter_sets:
            _, buffers, size = _submit_request(command, target, p, deadline, mode, self.connection.shared, retry)
            submitted.append(self._future(self._push(False, target, buffers, size)[0]))
            if meter is not None:
                meter.watch(submitted[-1])
        end = None if timeout is None else time.monotonic() + timeout
        if meter is None:

            def results():
                for future in submitted:
                    left = None if end is None else max(0.0, end - time.monotonic())
                    yield future.result(left)

            return results()
        meter.all_watched()

        def results_in_progress():
            last = len(submitted) - 1
            try:
                for i, future in enumerate(submitted):
                    left = None if end is None else max(0.0, end - time.monotonic())
                    meter.wait_for(future.done, left)
                    if i == last:
                        meter.wait()  # every count in
                        meter.close()
                    left = None if end is None else max(0.0, end - time.monotonic())
                    yield future.result(left)
            finally:
                meter.close()

        return results_in_progress()

    def broadcast(self, command, parameters=None, deadline=None, mode=None, retry=True):
        """Submits `command` to every server that is online and not timed out,
        one request each, in rank order. Returns their Futures."""
        ranks = [r for r, s in sorted(self.status().items()) if s["online"] and not s["timeout"]]
        if not ranks:
            raise CasaNodeError("no server is online to broadcast to")
        return self.submit(
            command, target=ranks, parameters=parameters, deadline=deadline, mode=mode, retry=retry
        )

    @staticmethod
    def as_completed(items, timeout=None):
        """Yields the Futures of `items` (Futures or lists of them, as submit
        returns) as they complete, as concurrent.futures.as_completed."""
        flat = []
        for item in items if isinstance(items, (list, tuple, set)) else [items]:
            flat.extend(item if isinstance(item, list) else [item])
        return _futures.as_completed(flat, timeout)

    def logs(self, level="DEBUG"):
        """A LogStream of the log records the cluster writes from now on
        (rule 31): the servers' events, their workers' output and logging
        records, and the head node's own lines, each as a dict (log_dict).
        Close it when done; the cluster's log file keeps everything anyway."""
        stream = LogStream(self, level_number(level))
        with self._streams_lock:
            self._streams.append(stream)
            try:
                self._resubscribe()
            except BaseException:
                self._streams.remove(stream)
                self._open_streams = tuple(self._streams)
                raise
        return stream

    def _close_stream(self, stream):
        with self._streams_lock:
            if stream in self._streams:
                self._streams.remove(stream)
                if self.connection.closed:
                    self._open_streams = tuple(self._streams)
                else:
                    self._resubscribe()

    def _resubscribe(self):
        """Subscribes at the lowest level any open stream wants, or
        unsubscribes when none is open. Called with _streams_lock held."""
        self._open_streams = tuple(self._streams)
        wanted = min((s.level for s in self._streams), default=None)
        if wanted == self._subscribed:
            return
        if self._subscribed is None:
            self.connection.add_log_subscriber(self._deliver_log)
        request = driver_pb2.LogSubscription(enabled=wanted is not None, min_level=wanted or 0)
        reply = self._expect(self.connection.request(log_subscription=request), "ack")
        if not reply.ok:
            raise CasaNodeError(f"log subscription failed: {reply.error}")
        if wanted is None:
            self.connection.remove_log_subscriber(self._deliver_log)
        self._subscribed = wanted

    def _deliver_log(self, record):
        # On the reader thread, which must not wait for _streams_lock: a
        # subscription request holds it while the reader brings the reply.
        for stream in self._open_streams:
            stream._put(record)

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


class LogStream:
    """Forwarded log records as dicts (see log_dict), oldest first.

        with client.logs("INFO") as records:
            for record in records:          # blocks for the next one
                print(record["origin"], record["message"])

    `get(timeout)` waits at most `timeout` seconds (TimeoutError). Iteration
    ends when the stream or the connection closes. A stream holds at most
    `capacity` unread records; past that the oldest are dropped and counted
    in `dropped`."""

    _END = object()

    def __init__(self, client, level, capacity=100_000):
        self._client = client
        self.level = level
        self.capacity = capacity
        self.dropped = 0
        self._records = queue.Queue()
        self._closed = False

    def _put(self, record):
        if record is None:
            self._records.put(self._END)
            return
        if (record.level or node_pb2.LOG_LEVEL_INFO) < self.level:
            return
        while self._records.qsize() >= self.capacity:
            try:
                self._records.get_nowait()
                self.dropped += 1
            except queue.Empty:
                break
        self._records.put(log_dict(record))

    def get(self, timeout=None):
        """The next record; TimeoutError after `timeout` seconds, StopIteration
        once the stream or its connection is closed."""
        try:
            item = self._records.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no log record within {timeout} s") from None
        if item is self._END:
            self._records.put(self._END)  # later calls end too
            raise StopIteration
        return item

    def __iter__(self):
        return self

    def __next__(self):
        return self.get()

    def close(self):
        """Stops this stream; the head node stops forwarding when no
        stream of the connection is left open."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client._close_stream(self)
        finally:
            self._records.put(self._END)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SUBMIT = body_tag("submit_request")
_key = values.field_key
_K_COMMAND = _key(driver_pb2.SubmitRequest, "command")
_K_MODE = _key(driver_pb2.SubmitRequest, "mode")
_K_PARAMETER = _key(driver_pb2.SubmitRequest, "parameters")
_K_TARGETS = _key(driver_pb2.SubmitRequest, "targets")
_K_DEADLINE = _key(driver_pb2.SubmitRequest, "deadline_seconds")
_NO_RETRY = _key(driver_pb2.SubmitRequest, "no_retry") + values._varint(1)  # no_retry = true


def _submit_request(command, target, parameters, deadline, mode, shared=None, retry=True):
    """(many, buffers, size): whether `target` is a list, and the serialized
    SubmitRequest (the bytes protobuf makes), its large parameter values as
    buffers of their own (see values.parameter_buffers), or, with `shared`
    (a shm.SharedDir), as shared-memory references (for a list of targets
    the head node gives each request's worker a name of its own for the
    same file)."""
    if type(command) is str:
        data = command.encode("utf-8")  # a lone surrogate raises as protobuf does
        head = _K_COMMAND + _varint(len(data)) + data if data else b""
    else:  # protobuf converts or refuses it
        head = driver_pb2.SubmitRequest(command=command).SerializeToString()
    if mode is not None:
        head += _K_MODE + _varint(_MODE_BY_NAME[mode])
    buffers, size = [head], len(head)
    many = isinstance(target, (list, tuple, range))
    if parameters:
        with shared.removing_on_error() if shared else contextlib.nullcontext():
            for name, value in parameters.items():
                parameter, length = values.parameter_buffers(name, value, shared or None)
                tag = _K_PARAMETER + _varint(length)
                buffers.append(tag)
                buffers += parameter
                size += len(tag) + length
    tail = b""
    if target is not None:
        targets = [int(t) for t in target] if many else [int(target)]
        if all(_I32_MIN <= t <= _I32_MAX for t in targets):
            packed = b"".join([_varint(t & _U64) for t in targets])
            if packed:
                tail = _K_TARGETS + _varint(len(packed)) + packed
        else:  # protobuf's error
            driver_pb2.SubmitRequest(targets=targets)
    if deadline is not None:
        tail += _K_DEADLINE + _DOUBLE.pack(float(deadline))
    if not retry:
        tail += _NO_RETRY
    if tail:
        buffers.append(tail)
        size += len(tail)
    return many, buffers, size


_varint = values._varint
_DOUBLE = struct.Struct("<d")
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_U64 = (1 << 64) - 1


class _Latch:
    """Counts arrivals (Connection.watch callbacks) down to zero; a thread
    waits for the last."""

    __slots__ = ("_done", "_count", "_left", "error")

    def __init__(self, count):
        self._done = threading.Lock()
        self._count = threading.Lock()
        self._left = count
        self.error = None
        if count:
            self._done.acquire()

    def arrived(self, response, error):
        """Counts one arrival; True for the last."""
        with self._count:
            if error is not None and self.error is None:
                self.error = error
            self._left -= 1
            last = self._left == 0
        if last:
            self._done.release()
        return last

    def wait(self, timeout=None):
        """Returns once all arrived; raises the first error reported, or
        TimeoutError after `timeout` seconds."""
        if not self._done.acquire(True, -1 if timeout is None else max(timeout, 0)):
            raise _futures.TimeoutError()
        self._done.release()
        if self.error is not None:
            raise self.error


class _Submission:
    """A submission's wait for its responses (Client._submit_waiting): the
    reader thread watches its ids, so the waiting thread wakes once."""

    __slots__ = ("_client", "_latch", "ids")

    def __init__(self, client, ids):
        self._client = client
        self.ids = ids
        self._latch = _Latch(len(ids))
        for rid in ids:
            client._watch(rid, self._latch.arrived)

    def wait(self):
        """Waits for the first response to each id. Returns the ids; raises
        SubmissionRejected if the submission was refused, or an error
        reported while waiting (ConnectionClosed)."""
        self._latch.wait()
        rejection = self._client.rejection(self.ids[0]) if self.ids else None
        if rejection is not None:
            raise rejection
        return self.ids

    def responses(self):
        """After wait: the latest response dict of each id, in id order."""
        ids = sorted(set(self.ids))
        return [self._client.response(rid) for rid in ids]


def connect(endpoint=None, timeout=30.0, connection_file=None, patience=None):
    """Connects to a cluster's front door: `endpoint` (unix://PATH or
    tcp://HOST:PORT), else $CASA_NODE_ENDPOINT, else the endpoint of
    `connection_file`, else the cluster `casa-node up` recorded. A tcp://
    front door needs its connection file: `connection_file`, else
    $CASA_NODE_CONNECTION_FILE, else the one `up` recorded.

    `patience`: seconds to look for the head node again (found the same
    way) when it goes away while responses are awaited, if its cluster
    keeps a journal (rule 33); default $CASA_NODE_DRIVER_PATIENCE, else
    120; 0 gives up at once."""
    if patience is None:
        text = os.environ.get(PATIENCE_VAR) or str(DEFAULT_PATIENCE)
        try:
            patience = float(text)
        except ValueError:
            raise CasaNodeError(f"{PATIENCE_VAR}={text!r} is not a number of seconds") from None
    if not patience >= 0:
        raise CasaNodeError(f"patience must be 0 or more seconds, not {patience!r}")

    def reconnect():
        return Connection(endpoint, timeout=timeout, connection_file=connection_file)

    return Client(reconnect(), reconnect=reconnect, patience=patience)

