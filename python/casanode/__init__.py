"""casanode: the Python driver for casa-node clusters.

    import casanode
    client = casanode.connect()
    client.submit("a+b", parameters={"a": 1, "b": 2}).result()["ret"]   # 3
"""

from .client import Client, SubmissionRejected, UnknownRequest, connect, response_dict
from .connection import (
    CasaNodeError,
    Connection,
    ConnectionClosed,
    NoCluster,
    Refused,
    Unreachable,
    UnexpectedReply,
    resolve_endpoint,
)
from .seed import MPICommandClient, MPIEnvironment, MPIMonitorClient
from .values import NdArray, Pickled, from_value, to_value

__version__ = "0.1.0"

__all__ = [
    "CasaNodeError",
    "Client",
    "Connection",
    "MPICommandClient",
    "MPIEnvironment",
    "MPIMonitorClient",
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
    "resolve_endpoint",
    "response_dict",
    "to_value",
]
