"""casampi's MPICommandServer: in casa-node the server nodes serve by
themselves (they are Rust processes that run each command in a Python
worker), so this class cannot be instantiated anywhere, as casampi's cannot
be in the client. The module also holds what the driver asks of its
workers' CASA log (see MPICommandClient.start_services)."""

from casampi.private import casalog, post


class MPICommandServer:
    """Cannot be instantiated: casa-node's server nodes serve by themselves."""

    def __init__(self, start_services=False):
        msg = ("MPICommandServer cannot be instantiated: casa-node's server nodes serve "
               "by themselves (start them with casa-node run --casa, up --casa or mpirun)")
        post(msg, "SEVERE", "MPICommandServer::__init__")
        raise RuntimeError(msg)


def set_log_file(path):
    """Makes this worker's CASA log the driver's file."""
    log = casalog()
    if log is not None and log.logfile() != path:
        log.setlogfile(path)
