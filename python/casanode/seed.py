"""The seed's face (mpi4casa): MPICommandClient, MPIEnvironment and
MPIMonitorClient, built on one shared casanode Client.

    from casanode import MPICommandClient
    client = MPICommandClient()
    client.start_services()
    client.push_command_request("a+b", True, [1], {'a': 1, 'b': 2})
    # [{'ret': 3, 'mode': 'eval', 'status': 'response received', ...}]

The connection goes to the cluster named by $CASA_NODE_ENDPOINT, else the one
`casa-node up` recorded; it is made on first use.
"""

import atexit
import logging
import os
import threading

from ._pb.casa.node.v1 import driver_pb2, node_pb2
from .client import STATUSES, SubmissionRejected, connect
from .connection import CasaNodeError, ConnectionClosed, NoCluster, resolve_endpoint

log = logging.getLogger("casanode")

# The rule-23 keys of get_server_status.
STATUS_KEYS = (
    "rank", "processor", "pid", "worker_pid", "busy", "command",
    "command_start_time", "timeout", "online", "last_ping", "rss",
)

_LEVELS = {
    "DEBUG": node_pb2.LOG_LEVEL_DEBUG,
    "DEBUG1": node_pb2.LOG_LEVEL_DEBUG,
    "DEBUG2": node_pb2.LOG_LEVEL_DEBUG,
    "INFO": node_pb2.LOG_LEVEL_INFO,
    "INFO1": node_pb2.LOG_LEVEL_INFO,
    "INFO2": node_pb2.LOG_LEVEL_INFO,
    "INFO3": node_pb2.LOG_LEVEL_INFO,
    "INFO4": node_pb2.LOG_LEVEL_INFO,
    "INFO5": node_pb2.LOG_LEVEL_INFO,
    "WARN": node_pb2.LOG_LEVEL_WARNING,
    "WARNING": node_pb2.LOG_LEVEL_WARNING,
    "ERROR": node_pb2.LOG_LEVEL_ERROR,
    "SEVERE": node_pb2.LOG_LEVEL_CRITICAL,
    "CRITICAL": node_pb2.LOG_LEVEL_CRITICAL,
}

def _log_rejection(client, command):
    """A Connection.watch callback that logs the rejection of a
    non-blocking push when its first failure response arrives (rule 14)."""

    def logged(response, error):
        rejection = None if error is not None else client.rejection(response.id)
        if rejection is not None:
            log.error("Command request %r rejected: %s", command, rejection.message or rejection.reason)

    return logged


# ------------------------------------------------------------ shared state

_lock = threading.RLock()
_client = None          # the one casanode Client, made on first use
_endpoint = None        # set by _reset (tests); else env / record
_connection_file = None  # likewise, for a tcp:// front door


def _shared_client():
    """The shared Client, connecting on first use."""
    global _client
    with _lock:
        if _client is None or _client.connection.closed:
            _client = connect(_endpoint, connection_file=_connection_file)
        return _client


def _reset(endpoint=None, connection_file=None):
    """For tests only: closes the shared connection, forgets the
    MPICommandClient singleton and points later connections at `endpoint`
    (with `connection_file` for a tcp:// one)."""
    global _client, _endpoint, _connection_file
    with _lock:
        client, _client = _client, None
        _endpoint = endpoint
        _connection_file = connection_file
        MPICommandClient._instance = None
        MPIMonitorClient._instance = None
    if client is not None:
        client.close()


def _server_rank():
    """The rank of the server node this process works for, or None in a
    driver: casa-node gives each worker its server's rank as CASA_NODE_RANK."""
    try:
        rank = int(os.environ.get("CASA_NODE_RANK") or 0)
    except ValueError:
        return None
    return rank or None


# ------------------------------------------------------------ environment


def _whole(seconds):
    """The seed's heartbeat and timeout are ints: so are casa-node's when
    they are whole seconds (`range(timeout + 5)` works)."""
    return int(seconds) if float(seconds).is_integer() else seconds


class _EnvironmentMeta(type):
    """Class-level attributes of MPIEnvironment, read from the Welcome's
    ClusterInfo on first use."""

    @property
    def _cluster(cls):
        return _shared_client().connection.cluster

    @property
    def is_mpi_enabled(cls):
        if _client is not None or _endpoint:
            return True
        try:
            resolve_endpoint()
        except (NoCluster, CasaNodeError):
            return False
        return True

    @property
    def hostname(cls):
        return cls._cluster.host

    @property
    def mpi_world_size(cls):
        return cls._cluster.world_size

    @property
    def mpi_monitor_status_service_heartbeat(cls):
        return _whole(cls._cluster.heartbeat_seconds)

    @property
    def mpi_monitor_status_service_timeout(cls):
        return _whole(cls._cluster.timeout_seconds)

    @property
    def is_mpi_client(cls):
        return _server_rank() is None

    @property
    def mpi_processor_rank(cls):
        return _server_rank() or 0


class MPIEnvironment(metaclass=_EnvironmentMeta):
    """The cluster as the driver sees it (the seed's MPIEnvironment). In a
    command running on a server, `is_mpi_client` is False and
    `mpi_processor_rank` is that server's rank."""

    @staticmethod
    def mpi_server_rank_list():
        return list(_shared_client().connection.cluster.server_ranks)


# ------------------------------------------------------------ status


def _status(server=None):
    table = _shared_client().status(server)
    return {rank: {k: s[k] for k in STATUS_KEYS} for rank, s in table.items()}


def _ack(name, message):
    kind, reply = _shared_client().connection.request(**{name: message})
    if kind != "ack":
        raise CasaNodeError(f"expected ack, got {kind or 'nothing'}")
    if not reply.ok:
        raise CasaNodeError(reply.error)


# ------------------------------------------------------------ command client


class MPICommandClient:
    """The seed's command client; a singleton (rule 28)."""

    _instance = None

    def __new__(cls):
        rank = _server_rank()
        if rank is not None:
            raise CasaNodeError(
                f"MPICommandClient cannot be instantiated in a server (rank {rank}): "
                "only the driver pushes commands"
            )
        with _lock:
            if cls._instance is None:
                instance = super().__new__(cls)
                instance._stopped = False
                instance._log_mode = "unified"
                cls._instance = instance
            return cls._instance

    # -------------------------------------------------------- lifecycle

    def start_services(self):
        """Connects to the cluster if not yet connected; idempotent."""
        _shared_client()

    def stop_services(self, force=False):
        """Stops services (rule 27); later pushes return None. Runs by itself
        when the driver exits."""
        if self._stopped:
            return
        self._stopped = True
        try:
            _shared_client().stop(force=force)
        except ConnectionClosed:
            pass
        log.info("All services stopped")

    # ------------------------------------------------------------ push

    def push_command_request(self, command, block=False, target_server=None, parameters=None):
        """Pushes `command`. Non-blocking: the list of request ids, at once
        (rule 16). Blocking: the response dicts in id order. A rejected
        blocking push logs why and returns None; a rejected non-blocking
        push logs why when its failure responses arrive (rule 14)."""
        if self._stopped:
            log.error("Services are stopped: not pushing command request %r", command)
            return None
        if isinstance(target_server, tuple):
            target_server = list(target_server)
        client = _shared_client()
        try:
            if not block:
                ids = client._submit_ids(command, target_server, parameters)
                if ids:
                    client.connection.watch(ids[0], _log_rejection(client, command))
                return ids
            # The reader thread takes the submission's reply and watches
            # its ids: this thread wakes once, when all responses are in.
            submission = client._submit_waiting(command, target_server, parameters)
            submission.wait()
        except SubmissionRejected as e:
            log.error("Command request %r rejected: %s", command, e.message or e.reason)
            return None
        except ConnectionClosed as e:
            log.error("Command request %r not pushed: %s", command, e)
            return None
        return submission.responses()

    # ------------------------------------------------------------ responses

    def get_command_response(self, command_request_id_list, block=False, verbose=True):
        """The responses to the ids already received, in id order, leaving
        out pending ones (rule 17); block=True waits for all. With verbose,
        logs where the pending ones stand."""
        ids = sorted({int(i) for i in _as_list(command_request_id_list)})
        _shared_client().check_known(ids)
        client = _shared_client()
        if block:
            return client.wait(ids)
        responses = {rid: client.response(rid) for rid in ids}
        pending = [rid for rid in ids if responses[rid] is None]
        if verbose and pending:
            self._log_pending(pending)
        return [responses[rid] for rid in ids if responses[rid] is not None]

    def _log_pending(self, ids):
        try:
            kind, reply = _shared_client().connection.request(
                track_request=driver_pb2.TrackRequest(ids=ids)
            )
        except CasaNodeError as e:
            log.warning("Cannot track pending command requests %s: %s", ids, e)
            return
        if kind != "track_reply":
            return
        for state in reply.states:
            if state.server:
                log.info(
                    "Command request with id# %d assigned to server n# %d, response pending ...",
                    state.id, state.server,
                )
            else:
                log.info(
                    "Command request with id# %d %s, response pending ...",
                    state.id, STATUSES.get(state.status, "unknown").replace("holding queue", "in holding queue"),
                )

    def get_command_response_event(self, command_request_id_list):
        """A threading.Event set once every id's response has arrived
        (rule 18)."""
        ids = sorted({int(i) for i in _as_list(command_request_id_list)})
        _shared_client().check_known(ids)
        event = threading.Event()
        left = [len(ids)]
        lock = threading.Lock()

        def arrived(response, error):
            with lock:
                left[0] -= 1
                done = left[0] == 0
            if done:
                event.set()

        if not ids:
            event.set()
        client = _shared_client()
        for rid in ids:
            client._watch(rid, arrived)
        return event

    # ------------------------------------------------------------ status and logs

    def get_server_status(self, server=None):
        """{rank: status dict} with the rule-23 keys."""
        return _status(server)

    def set_log_mode(self, mode):
        """Records the log mode ('unified' or 'redirect')."""
        self._log_mode = mode

    def set_log_level(self, level):
        """Sets the servers' log level: 'DEBUG', 'INFO', 'WARN', 'ERROR', ..."""
        try:
            value = _LEVELS[str(level).upper()]
        except KeyError:
            raise ValueError(f"unknown log level {level!r}") from None
        _ack("log_level_request", driver_pb2.LogLevelRequest(level=value))


def _as_list(ids):
    if isinstance(ids, int):
        return [ids]
    return list(ids)


# ------------------------------------------------------------ monitor client


class MPIMonitorClient:
    """The seed's monitor client: server status and debugging mode. A
    singleton, like MPICommandClient."""

    _instance = None

    def __new__(cls):
        with _lock:
            if cls._instance is None:
                cls._instance = super().__new__(cls)
            return cls._instance

    def start_debugging_mode(self):
        """While on, no server is marked timed out (rule 22)."""
        _ack("debugging_mode_request", driver_pb2.DebuggingModeRequest(enabled=True))

    def stop_debugging_mode(self):
        _ack("debugging_mode_request", driver_pb2.DebuggingModeRequest(enabled=False))

    def get_server_status(self, server=None):
        return _status(server)

    def get_server_rank_online(self):
        return [r for r, s in _status().items() if s["online"]]

    def get_server_rank_available(self):
        return [r for r, s in _status().items() if s["online"] and not s["busy"] and not s["timeout"]]

    def get_server_timeout(self):
        return [r for r, s in _status().items() if s["timeout"]]


class _ServerSide:
    """The seed's server-side singletons. casa-node's server nodes do their
    work in Rust, so these exist only to fail clearly where a port of a
    seed script instantiates them."""

    def __new__(cls, *args, **kwargs):
        raise CasaNodeError(
            f"{cls.__name__} cannot be instantiated here: casa-node server nodes "
            "serve by themselves (start them with `casa-node up`, `casa-node run` or mpirun)"
        )


class MPICommandServer(_ServerSide):
    """The seed's command server; see _ServerSide."""


class MPIMonitorServer(_ServerSide):
    """The seed's monitor server; see _ServerSide."""


@atexit.register
def _stop_at_exit():
    """Stops services when the driver exits (rule 27), if it started them."""
    instance = MPICommandClient._instance
    if instance is None or _client is None or _client.connection.closed:
        return
    try:
        instance.stop_services()
    except Exception:  # the cluster may be gone already
        pass
