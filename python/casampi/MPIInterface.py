"""casampi's MPIInterface over casa-node: the cluster object CASA's
parallel imager (casatasks' parallel_imager_helper, tclean(parallel=True))
drives with pgc, odo, execute, push, pull and check_job.

    cluster = MPIInterface.getCluster()      # starts services
    CL = cluster._cluster
    CL.pgc("import os")                      # on every server, blocking
    ids = CL.odo("work()", 1)                # on server 1, non-blocking
    CL.check_job(ids)                        # True when done; raises on errors
"""

import time

from casampi.MPICommandClient import MPICommandClient, _require_client
from casampi.MPIEnvironment import MPIEnvironment
from casampi.private import Singleton, post
from casampi.private.MPIMonitorClient import MPIMonitorClient


class MPIInterfaceCore(Singleton):
    """A handle on the one cluster core (casampi's singleton)."""

    def __init__(self):
        _require_client("MPIInterfaceCore", "MPIInterfaceCore::__init__")
        Singleton.__init__(self)

    @staticmethod
    def _make():
        return _Core()


class _Core:
    def __init__(self):
        self._command_client = MPICommandClient()
        self._monitor_client = MPIMonitorClient()

    def start_cluster(self, cl_file=None):
        self._command_client.set_log_mode(MPIInterface._log_mode)
        self._command_client.start_services()

    def stop_cluster(self):
        self._command_client.stop_services()

    def get_engines(self):
        """The server ranks."""
        return MPIEnvironment.mpi_server_rank_list()

    def get_nodes(self):
        """The hosts the servers run on, each once."""
        hosts = [self._monitor_client.get_server_status_keyword(server, "processor")
                 for server in MPIEnvironment.mpi_server_rank_list()]
        return list(set(hosts))

    def pgc(self, commands, block=True):
        """A dict {server: command} runs each command on its server; one
        command runs on every server. Blocking: the response list; else the
        ids (casampi returns the available responses for a dict)."""
        if isinstance(commands, dict):
            ids = []
            for server, command in commands.items():
                ids.append(self._command_client.push_command_request(
                    command, block=False, target_server=server)[0])
            return self._command_client.get_command_response(ids, block=block, verbose=True)
        return self._command_client.push_command_request(
            commands, block=block, target_server=MPIEnvironment.mpi_server_rank_list())

    def odo(self, job, nodes):
        """Runs `job` on `nodes` (a rank, ranks, or None for the first free
        server) without waiting: the request ids."""
        return self._command_client.push_command_request(job, block=False, target_server=nodes)

    def execute(self, job, nodes):
        """Runs `job` on `nodes` and waits: the response list."""
        return self._command_client.push_command_request(job, block=True, target_server=nodes)

    def push(self, variables, targets=None):
        """Sets the variables of the dict `variables` on `targets` (all
        servers for None or 'all')."""
        if targets is None or targets == "all":
            targets = MPIEnvironment.mpi_server_rank_list()
        else:
            targets = list(targets)
        return self._command_client.push_command_request(
            "push", block=True, target_server=targets, parameters=dict(variables))

    def pull(self, varname="", targets=None):
        """{server: value} of `varname` on `targets` (all servers for None)."""
        if targets is None:
            responses = self.pgc(varname)
        else:
            responses = self.execute(varname, nodes=targets)
        return {r["server"]: r["ret"] for r in responses}

    def check_job(self, jobId, verbose=True):
        """True once every job of `jobId` has finished; raises an Exception
        naming each server's traceback if any failed (or timed out)."""
        ids = list(jobId)
        responses = self._command_client.get_command_response(ids, block=False, verbose=verbose)
        errors = []
        completed = set()
        for response in responses:
            if not response["successful"]:
                errors.append("Exception executing command in server %s: %s"
                              % (response["server"], response["traceback"]))
            else:
                completed.add(response["id"])
        if errors:
            msg = "\n".join(errors)
            post(msg, "SEVERE", "MPIInterfaceCore::check_job")
            raise Exception(msg)
        return all(i in completed for i in ids)

    def get_server_status(self):
        return self._command_client.get_server_status()

    def get_command_request_list(self):
        return self._command_client.get_command_request_list()

    def get_command_response_list(self):
        return self._command_client.get_command_response_list()


class MPIInterface(Singleton):
    """A handle on the one cluster (casampi's singleton); `_cluster` is its
    MPIInterfaceCore."""

    # Static, so that getCluster can read it.
    _log_mode = "unified"

    def __init__(self):
        _require_client("MPIInterface", "MPIInterface::__init__")
        Singleton.__init__(self)

    @staticmethod
    def _make():
        return _Interface()

    @staticmethod
    def set_log_mode(logmode):
        MPIInterface._log_mode = logmode

    @staticmethod
    def getCluster():
        """The cluster, its services started."""
        if MPIInterface.__dict__.get("_impl") is None:
            cluster = MPIInterface()
        else:
            cluster = MPIInterface._impl
            if not cluster.isClusterRunning():
                cluster.init_cluster()
        cluster.start_cluster()
        return cluster

    @staticmethod
    def print_table(table):
        widths = [max(len(x) for x in column) for column in zip(*table)]
        for line in table:
            print("| " + " | ".join("{:{}}".format(x, widths[i]) for i, x in enumerate(line)) + " |")


class _Interface:
    def __init__(self):
        self._cluster = MPIInterfaceCore()
        self._command_client = MPICommandClient()

    def isClusterRunning(self):
        return self._command_client.get_lifecyle_state() == 1

    def init_cluster(self, clusterfile=None, project=None):
        self.start_cluster()

    def start_cluster(self):
        self._cluster.start_cluster()

    def stop_cluster(self):
        self._cluster.stop_cluster()

    def do_and_record(self, cmd, id=None, group="", subMS=""):
        return self._cluster.odo(cmd, id)

    def get_engine_store(self, id):
        """The working directory of server `id`."""
        return self._cluster.execute("os.getcwd()", id)[0]["ret"]

    def get_status(self):
        """Prints and returns casampi's job table: running, queued, then
        finished requests."""
        requests = self._cluster.get_command_request_list()
        responses = self._cluster.get_command_response_list()
        servers = self._cluster.get_server_status()
        order = ["request sent", "holding queue", "timeout", "response received"]
        table = [["JOB ID", "SERVER", "HOSTNAME", "QUEUE STATUS", "COMMAND",
                  "ELAPSED TIME (s)", "EXECUTION STATUS"]]
        for status in order:
            for job, request in requests.items():
                if request["status"] != status:
                    continue
                server = request["server"]
                host = servers[server]["processor"] if server in servers else ""
                elapsed, execution = "", ""
                if status == "holding queue":
                    elapsed, execution = "N/A", "pending"
                elif status in ("request sent", "timeout"):
                    start = servers[server]["command_start_time"] if server in servers else None
                    elapsed = "%.2f" % (time.time() - start) if start else "unset"
                    execution = "pending" if status == "request sent" else "timeout"
                else:
                    response = responses[job]
                    start, stop = response["command_start_time"], response["command_stop_time"]
                    elapsed = "%.2f" % (stop - start) if start and stop else "unset"
                    if not response["successful"]:
                        execution = "exception raised"
                    elif isinstance(response["ret"], bool):
                        execution = "completed - %s" % response["ret"]
                    else:
                        execution = "completed"
                table.append([str(job), str(server), host, status, request["command"],
                              elapsed, execution])
        MPIInterface.print_table(table)
        return table

    def set_log_level(self, log_level):
        self._command_client.set_log_level(log_level)
