"""What a driver script records of how CASA ran it: whether
ParallelTaskHelper saw an MPI cluster with this process as its client, and
which file the CASA log went to. Only CASA's own API (and the environment):
the scripts stay what a casampi user would write."""

import os

from casatasks import casalog
from casatasks.private.parallel.parallel_task_helper import ParallelTaskHelper


def evidence():
    return {
        "mpi_enabled": ParallelTaskHelper.isMPIEnabled(),
        "mpi_client": ParallelTaskHelper.isMPIClient(),
        "casa_log": os.path.abspath(casalog.logfile()),
        "casa_node_casa_log": os.environ.get("CASA_NODE_CASA_LOG"),
    }
