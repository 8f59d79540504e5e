"""casampi's MPIMonitorClient over casa-node: the server table and
debugging mode (rules 19-23). The monitor itself runs in casa-node's head
node, which pings every server each heartbeat; this reads its table.

Each server's status dict has casampi's keys (rank, processor, pid, busy,
command, command_start_time, pong_pending, ping_time, pong_time, timeout)
and casa-node's (worker_pid, online, last_ping, rss, command_id).
"""

from casampi.MPIEnvironment import MPIEnvironment
from casampi.private import Singleton, post


def _casampi_status(status):
    status = dict(status)
    status.setdefault("pong_pending", False)
    status["ping_time"] = status.get("last_ping")
    status["pong_time"] = status.get("last_ping")
    return status


class MPIMonitorClient(Singleton):
    """A handle on the one monitor client (casampi's singleton)."""

    def __init__(self, start_services=True):
        from casampi.MPICommandClient import _require_client

        _require_client("MPIMonitorClient", "MPIMonitorClient::__init__")
        Singleton.__init__(self)

    @staticmethod
    def _make():
        return _MonitorClient()


class _MonitorClient:
    def __init__(self):
        from casanode import seed

        self._seed = seed
        # What set_server_status_keyword set, kept over the cluster's table.
        self._overrides = {}

    def start_services(self):
        """The head node monitors from its start: connects, nothing more."""
        self._seed._shared_client()

    def stop_services(self):
        """The head node's monitor stops with its services."""

    def _table(self, server=None):
        table = self._seed._shared_client().status(server)
        out = {}
        for rank, status in table.items():
            status = _casampi_status(status)
            status.update(self._overrides.get(rank, {}))
            out[rank] = status
        return out

    def get_server_status(self, server=None):
        """{rank: status} for every server, or one server's status dict."""
        from casanode.connection import Refused

        if server is None:
            return self._table()
        try:
            table = self._table(server) if isinstance(server, int) else {}
        except Refused:  # no such rank
            table = {}
        if server not in table:
            post("Server n# %s is out of range" % server, "WARN", "MPIMonitorClient::get_server_status")
            return None
        return table[server]

    def get_server_status_keyword(self, server, keyword):
        origin = "MPIMonitorClient::get_server_status_keyword"
        status = self.get_server_status(server)
        if status is None:
            return None
        if keyword not in status:
            post("Status keyword %s not defined" % keyword, "WARN", origin)
            return None
        return status[keyword]

    def set_server_status_keyword(self, server, keyword, value):
        origin = "MPIMonitorClient::set_server_status_keyword"
        status = self.get_server_status(server)
        if status is None:
            return
        if keyword not in status:
            post("Status keyword %s not defined" % keyword, "WARN", origin)
            return
        self._overrides.setdefault(server, {})[keyword] = value

    def get_server_rank_available(self, verbose=False):
        return [r for r, s in self._table().items() if not (s["busy"] or s["timeout"])]

    def get_server_rank_online(self, verbose=False):
        return [r for r, s in self._table().items() if not s["timeout"]]

    def get_server_timeout(self):
        timeout = [r for r, s in self._table().items() if s["timeout"] is True]
        post("Found {} server in timeout status".format(len(timeout)), "INFO",
             "MPIMonitorClient::get_server_timeout")
        return timeout

    def start_debugging_mode(self):
        """While on, no server is marked timed out (rule 22)."""
        self._seed.MPIMonitorClient().start_debugging_mode()
        MPIEnvironment.mpi_monitor_status_service_timeout_enabled = False
        post("Started debugging mode. Timeout mechanism disabled.", "INFO",
             "MPIMonitorClient::start_debugging_mode")

    def stop_debugging_mode(self):
        self._seed.MPIMonitorClient().stop_debugging_mode()
        MPIEnvironment.mpi_monitor_status_service_timeout_enabled = True
        post("Stopped debugging mode. Timeout mechanism enabled.", "INFO",
             "MPIMonitorClient::stop_debugging_mode")
