"""Imported by `import casatasks`. casampi starts its servers here; casa-node
has started them already (`casa-node run --casa`), so on the driver this
only logs where it runs, as casampi does, and in a worker nothing."""

from casampi.MPIEnvironment import MPIEnvironment
from casampi.private import casalog

if MPIEnvironment.is_mpi_enabled and MPIEnvironment.is_mpi_client:
    _log = casalog()
    if _log is not None:
        _log.processorOrigin(MPIEnvironment.processor_origin)
        _log.post(MPIEnvironment.mpi_info_msg, "INFO", "casa")
