"""casanode: the Python driver for casa-node clusters.

    import casanode
    client = casanode.connect()
    client.submit("a+b", parameters={"a": 1, "b": 2}).result()["ret"]   # 3
    casanode.progress([client.submit("work(i)", parameters={"i": i}) for i in range(100)])
"""

from .client import (
    Client,
    CommandFuture,
    LogStream,
    SubmissionRejected,
    UnknownRequest,
    connect,
    log_dict,
    response_dict,
)
from .connection import (
    CasaNodeError,
    Connection,
    ConnectionClosed,
    NoCluster,
    Refused,
    Unreachable,
    UnexpectedReply,
    read_connection_file,
    resolve_endpoint,
)
from .failures import (
    CommandCancelled,
    CommandFailed,
    CommandRaised,
    CommandRejected,
    DeadlineExceeded,
    LostInRestart,
    NoServerLeft,
    NotSent,
    ServerLost,
    TooLarge,
    WorkerDied,
    raise_for_failure,
)
from .progressbar import progress
from .seed import (
    MPICommandClient,
    MPICommandServer,
    MPIEnvironment,
    MPIMonitorClient,
    MPIMonitorServer,
)
from .values import NdArray, Pickled, from_value, to_value

__version__ = "0.1.0"

__all__ = [
    "CasaNodeError",
    "Client",
    "CommandCancelled",
    "CommandFailed",
    "CommandFuture",
    "CommandRaised",
    "CommandRejected",
    "DeadlineExceeded",
    "LostInRestart",
    "NoServerLeft",
    "NotSent",
    "ServerLost",
    "TooLarge",
    "WorkerDied",
    "raise_for_failure",
    "Connection",
    "LogStream",
    "MPICommandClient",
    "MPICommandServer",
    "MPIEnvironment",
    "MPIMonitorClient",
    "MPIMonitorServer",
    "ConnectionClosed",
    "NdArray",
    "NoCluster",
    "Pickled",
    "Refused",
    "SubmissionRejected",
    "UnexpectedReply",
    "UnknownRequest",
    "Unreachable",
    "connect",
    "from_value",
    "log_dict",
    "progress",
    "read_connection_file",
    "resolve_endpoint",
    "response_dict",
    "to_value",
]
