"""casampi's MPIEnvironment over casa-node: where this process stands in
the cluster.

On the driver, `is_mpi_enabled` is True when a casa-node cluster can be
reached (`casa-node run` names it in $CASA_NODE_ENDPOINT; `casa-node up`
records it), `is_mpi_client` is True, and the cluster's figures (world size,
server ranks, heartbeat and timeout, in whole seconds as ints when they are
whole) come from its front door on first use. In a worker, `is_mpi_enabled`
is True, `is_mpi_client` False and `mpi_processor_rank` its server's rank.
Without a cluster CASA runs serially, as it does without MPI.
"""

import os
import socket

from casampi.private import server_rank

_RANK = server_rank()


class _Common:
    """What casampi's MPIEnvironment has on every rank."""

    hostname = socket.gethostname()
    mpi_pid = os.getpid()
    mpi_client_rank = 0
    mpi_version_info = None
    mpi_vendor_info = None
    mpi_version_str = ""
    mpi_vendor_str = "casa-node"
    mpi_vendor_version_str = ""
    mpi_thread_safe_level = -1
    mpi_any_tag = -1
    mpi_any_source = -1
    # casampi's request log level ('NORMAL', or set_log_level's).
    command_handling_log_level = "NORMAL"
    # casampi polls; casa-node's nodes wake on messages. Kept for scripts
    # that read them.
    mpi_start_service_sleep_time = 0.1
    mpi_stop_service_sleep_time = 3
    mpi_check_start_service_sleep_time = 0.1
    mpi_check_stop_service_sleep_time = 0.1
    mpi_ping_status_request_handler_service_sleep_time = 3
    mpi_ping_status_response_handler_service_sleep_time = 3
    mpi_command_request_handler_service_sleep_time = 0.1
    mpi_command_response_handler_service_sleep_time = 0.1
    mpi_command_request_queue_service_sleep_time = 0.1
    mpi_push_command_request_block_mode_sleep_time = 0.1
    # Debugging mode lives in the head node (MPIMonitorClient's
    # start_debugging_mode); this mirrors it for scripts that read it.
    mpi_monitor_status_service_timeout_enabled = True

    @classmethod
    def is_mpi_disabled_or_client(cls):
        """Whether this is the only process (serial CASA) or the client."""
        return not cls.is_mpi_enabled or cls.is_mpi_client

    @staticmethod
    def finalize_mpi_environment():
        """Nothing to do: casa-node's nodes end MPI themselves."""

    @classmethod
    def abort_mpi_environment(cls):
        """Nothing to do: casa-node's nodes end MPI themselves."""


if _RANK is not None:

    class MPIEnvironment(_Common):
        """A worker of server `mpi_processor_rank`."""

        is_mpi_enabled = True
        is_mpi_client = False
        mpi_initialized = True
        mpi_processor_rank = _RANK
        mpi_execution_role = "MPIServer"
        log_to_console = False
        processor_origin = "@" + _Common.hostname.split(".")[0]
        mpi_info_msg = "MPI Enabled at host %s with rank %s as %s using %s" % (
            _Common.hostname, _RANK, "MPIServer", "casa-node")

        @staticmethod
        def mpi_server_rank_list():
            raise RuntimeError(
                "the server ranks are known to the driver: ask there "
                "(MPIEnvironment.mpi_server_rank_list() in the casa-node run script)"
            )

else:
    from casanode import seed as _seed
    from casanode.connection import CasaNodeError as _CasaNodeError

    class _DriverMeta(_seed._EnvironmentMeta):
        """The cluster's figures, from its front door on first use."""

        @property
        def mpi_initialized(cls):
            return cls.is_mpi_enabled

        @property
        def mpi_world_size(cls):
            if not cls.is_mpi_enabled:
                return 1
            return _seed._EnvironmentMeta.mpi_world_size.fget(cls)

        @property
        def hostname(cls):
            return _Common.hostname

        @property
        def mpi_execution_role(cls):
            return "MPIClient"

        @property
        def mpi_info_msg(cls):
            if not cls.is_mpi_enabled:
                return "MPI Enabled at host %s with rank 0 as MPIClient: no casa-node cluster found" % (
                    cls.hostname)
            try:
                transport = _seed._shared_client().connection.cluster.transport
            except _CasaNodeError:
                transport = "unknown"
            return "MPI Enabled at host %s with rank 0 as MPIClient using casa-node over %s " % (
                cls.hostname, transport)

        @property
        def processor_origin(cls):
            if not cls.is_mpi_enabled:
                return ""
            return "@" + cls.hostname.split(".")[0] + ":MPIClient"

    class MPIEnvironment(_Common, metaclass=_DriverMeta):
        """The driver of a casa-node cluster (rank 0, the client)."""

        log_to_console = True

        @staticmethod
        def mpi_server_rank_list():
            if not MPIEnvironment.is_mpi_enabled:
                return []
            return list(_seed._shared_client().connection.cluster.server_ranks)
