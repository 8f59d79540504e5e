"""casa-node's casampi: CASA's MPI framework (casampi 0.6) over casa-node.

`casa-node run --casa` and `up --casa` put this package first on the path of
the driver and of every worker, ahead of an installed casampi, so that
CASA's own parallel code (ParallelTaskHelper, tclean's parallel imager, the
pipeline's tier-0 pushes) runs unmodified on a casa-node cluster. The
modules and names are casampi's: MPIEnvironment, MPICommandClient,
MPIInterface, private.start_mpi, private.MPIMonitorClient and
private.MPICommandServer. On the driver they speak to the cluster through
`casanode`; in a worker they use the standard library and casatools only.
"""
