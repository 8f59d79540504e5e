"""casampi's MPICommandClient over casa-node: the driver pushes commands to
the servers and gets their responses (the seed's rules 1-18, 26-28).

A singleton, as casampi's: every MPICommandClient() is a handle on one
client, which shares casanode's connection to the cluster. As in casampi,
commands are pushed only between start_services() and stop_services();
unlike casampi, the queue, the scheduler and the monitor run in casa-node's
head node, not in threads of this process.
"""

import os
import threading
import time

from casampi.MPIEnvironment import MPIEnvironment
from casampi.private import Singleton, casalog, post

log_levels = ['DEBUG', 'DEBUG1', 'DEBUG2', 'NORMAL', 'NORMAL1', 'NORMAL2', 'NORMAL3', 'NORMAL4', 'NORMAL5',
              'INFO', 'INFO1', 'INFO2', 'INFO3', 'INFO4', 'INFO5']

# casampi's log levels as casa-node's (the servers' level).
_LEVELS = {name: ("DEBUG" if name.startswith("DEBUG") else "INFO") for name in log_levels}

_NOT_STARTED, _STARTED, _STOPPED = 0, 1, 2


def _require_client(name, origin):
    if not MPIEnvironment.is_mpi_enabled:
        msg = ("MPI is not enabled. To use the MPI client this process needs to be run "
               "on a casa-node cluster: casa-node run --casa SCRIPT (or under mpirun: "
               "mpirun -n N casa-node --transport mpi run --casa SCRIPT)")
        post(msg, "SEVERE", origin)
        raise RuntimeError(msg)
    if not MPIEnvironment.is_mpi_client:
        msg = ("%s can only be instantiated at master MPI process. "
               "This error suggests that there was no server initialization in this "
               "process or it did not succeed." % name)
        post(msg, "SEVERE", origin)
        raise RuntimeError(msg)


def _mode(command):
    """casampi's mode of a command: push, eval or exec; None if it compiles
    as neither."""
    if command == "push":
        return "push"
    for mode in ("eval", "exec"):
        try:
            compile(command, "send_command_request", mode)
            return mode
        except (SyntaxError, ValueError, TypeError):
            pass
    return None


class MPICommandClient(Singleton):
    """A handle on the one command client (casampi's singleton)."""

    def __init__(self, start_services=False):
        _require_client("MPICommandClient", "MPICommandClient::__init__")
        Singleton.__init__(self)
        if start_services:
            self.start_services()

    @staticmethod
    def _make():
        return _CommandClient()


class _CommandClient:
    def __init__(self):
        from casanode import seed
        from casampi.private.MPIMonitorClient import MPIMonitorClient

        self._seed = seed
        self._client = seed.MPICommandClient()
        self._monitor = MPIMonitorClient(False)
        self._state = _NOT_STARTED
        self._log_mode = "unified"
        # casampi keeps every request and response it handled.
        self._requests = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def _ready(self, origin):
        if self._state == _NOT_STARTED:
            post("Services not started", "WARN", origin)
            return False
        if self._state == _STOPPED:
            post("MPICommandClient life cycle finalized", "WARN", origin)
            return False
        return True

    def get_lifecyle_state(self):
        """0: services not started, 1: started, 2: stopped (casampi's
        spelling)."""
        return self._state

    def start_services(self):
        origin = "MPICommandClient::start_services"
        if self._state == _STARTED:
            post("Services already started", "DEBUG", origin)
            return
        if self._state == _STOPPED:
            post("MPICommandClient life cycle finalized", "INFO", origin)
            return
        self._client.start_services()
        self._share_log_file()
        self._state = _STARTED
        post("All services started", "INFO", origin)

    def _share_log_file(self):
        """The servers write the CASA log file this driver writes (casampi's
        servers share the client's): `casa-node run --casa` starts them on
        it; a driver with another one (its ~/.casa/config.py names it, or a
        driver of `casa-node up --casa`) moves them to its own."""
        log = casalog()
        if log is None:
            return
        mine = log.logfile()
        if not mine or mine == os.environ.get("CASA_NODE_CASA_LOG"):
            return
        servers = MPIEnvironment.mpi_server_rank_list()
        if servers:
            # Not waited for: a server busy with another driver's command
            # moves when it is done (its queue keeps this driver's order).
            self._client.push_command_request(
                "import casampi.private.MPICommandServer as _casampi_server; "
                "_casampi_server.set_log_file(casampi_log_file); del _casampi_server",
                False, servers, {"casampi_log_file": mine})

    def stop_services(self, force_command_request_interruption=False):
        origin = "MPICommandClient::stop_services"
        try:
            if self._state == _NOT_STARTED:
                post("Services not started", "WARN", origin)
                return
            if self._state == _STOPPED:
                post("MPICommandClient life cycle finalized", "WARN", origin)
                return
            with self._lock:
                pending = [rid for rid in sorted(self._requests)
                           if self._client_response(rid) is None]
            for rid in pending:
                post("Aborting command request with id# %s: %s" % (rid, self._requests[rid]),
                     "SEVERE", origin)
            self._client.stop_services(force=force_command_request_interruption)
            self._state = _STOPPED
            post("All services stopped", "INFO", origin)
        except Exception as e:  # at exit the cluster may be gone already
            post("Stopping services: %s" % e, "WARN", origin)
            self._state = _STOPPED

    # ------------------------------------------------------------ commands

    def push_command_request(self, command, block=False, target_server=None, parameters=None):
        origin = "MPICommandClient::push_command_request"
        if not self._ready(origin):
            return None
        mode = _mode(command)
        if mode is None:
            post("Command cannot be executed neither as a statement nor as an expression, "
                 "it will be rejected: %r" % command, "SEVERE", origin)
            return None
        targets = self._validate_target_servers(target_server)
        if targets is False:
            return None
        result = self._client.push_command_request(command, block, targets, parameters)
        if result is None:
            return None
        ids = [r["id"] for r in result] if block else list(result)
        servers = targets if targets is not None else [None] * len(ids)
        with self._lock:
            for rid, server in zip(ids, servers):
                self._requests[rid] = {
                    "command": command,
                    "parameters": parameters,
                    "mode": mode,
                    "id": rid,
                    "server": server,
                    "status": "holding queue",
                }
        return result

    def _validate_target_servers(self, target_server):
        """casampi's target check: None, an int or a list of ints; False (and
        a SEVERE line) otherwise. Whether the ranks exist is the cluster's
        call (rule 14)."""
        origin = "MPICommandClient::validate_target_servers"
        if target_server is None:
            return None
        if isinstance(target_server, tuple):
            target_server = list(target_server)
        if isinstance(target_server, int) and not isinstance(target_server, bool):
            return [target_server]
        if isinstance(target_server, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in target_server):
            return list(target_server)
        post("target_server has wrong format (%s), accepted formats are int and list(int)"
             % type(target_server), "SEVERE", origin)
        return False

    def get_command_response(self, command_request_id_list, block=False, verbose=True):
        return self._client.get_command_response(command_request_id_list, block, verbose)

    def get_command_response_event(self, command_request_id_list):
        return self._client.get_command_response_event(command_request_id_list)

    def wait_for_command_request_sent(self, command_request_id_list):
        """Waits until each request has been sent to its server."""
        if not self._ready("MPICommandClient::wait_for_command_request_sent"):
            return
        pending = list(command_request_id_list)
        while pending:
            requests = self.get_command_request_list()
            pending = [rid for rid in pending if requests[rid]["status"] == "holding queue"]
            if pending:
                time.sleep(MPIEnvironment.mpi_push_command_request_block_mode_sleep_time)

    def _client_response(self, rid):
        return self._seed._shared_client().response(rid)

    def get_command_request_list(self):
        """{id: request} for every request this driver pushed, each with its
        current 'status' and 'server' (casampi's table)."""
        from casanode._pb.casa.node.v1 import driver_pb2
        from casanode.client import STATUSES

        with self._lock:
            requests = dict(self._requests)
        pending = []
        for rid, request in requests.items():
            response = self._client_response(rid)
            if response is None:
                pending.append(rid)
            else:
                request["status"] = response["status"]
                request["server"] = response["server"]
        if pending:
            kind, reply = self._seed._shared_client().connection.request(
                track_request=driver_pb2.TrackRequest(ids=pending))
            if kind == "track_reply":
                for state in reply.states:
                    request = requests.get(state.id)
                    if request is not None:
                        request["status"] = STATUSES.get(state.status, request["status"])
                        request["server"] = state.server or request["server"]
        return requests

    def get_command_response_list(self):
        """{id: response} for every request of this driver answered so far."""
        with self._lock:
            ids = list(self._requests)
        responses = {}
        for rid in ids:
            response = self._client_response(rid)
            if response is not None:
                responses[rid] = response
        return responses

    # ------------------------------------------------------------ servers

    def get_server_status(self, server=None):
        return self._monitor.get_server_status(server)

    def set_log_mode(self, logmode):
        self._log_mode = logmode

    def set_log_level(self, log_level):
        origin = "MPICommandClient::set_log_level"
        if not self._ready(origin):
            return
        if log_level not in log_levels:
            post("Unknown log level %s, recognized levels are: %s" % (log_level, log_levels),
                 "WARN", origin)
            return
        MPIEnvironment.command_handling_log_level = log_level
        self._client.set_log_level(_LEVELS[log_level])

    # The settings go as casampi writes them (casatools takes an int where
    # it wants one: setMemoryFraction(50), not 50.0).
    def _on_servers(self, command, target_server):
        if not self._ready("MPICommandClient"):
            return None
        return self.push_command_request(command, True, target_server)

    def set_omp_num_threads(self, omp_max_threads, target_server):
        self._on_servers("casalog.ompSetNumThreads(%s)" % str(omp_max_threads), target_server)

    def setMemoryTotal(self, memory, target_server):
        self._on_servers("casalog.setMemoryTotal(%s)" % str(memory), target_server)

    def setMemoryFraction(self, memfrac, target_server):
        self._on_servers("casalog.setMemoryFraction(%s)" % str(memfrac), target_server)

    def setNumCPUs(self, numCPUs, target_server):
        self._on_servers("casalog.setNumCPUs(%s)" % str(numCPUs), target_server)

    def _ret(self, command, target_server):
        res = self._on_servers(command, target_server)
        if res is None:
            return None
        if len(res) == 1:
            return res[0]["ret"]
        return [r["ret"] for r in res]

    def getMemoryTotal(self, use_aipsrc, target_server):
        return self._ret("casalog.getMemoryTotal(%s)" % str(use_aipsrc), target_server)

    def getNumCPUs(self, use_aipsrc, target_server):
        return self._ret("casalog.getNumCPUs(%s)" % str(use_aipsrc), target_server)
