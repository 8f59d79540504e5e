"""casanode's errors: what a driver catches."""


class CasaNodeError(Exception):
    """Base class of casanode's errors."""


class NoCluster(CasaNodeError):
    """No endpoint given and none recorded."""


class Unreachable(CasaNodeError):
    """The front door could not be reached."""


class Refused(CasaNodeError):
    """The head node answered with a ProtocolError."""

    def __init__(self, message, code=0):
        super().__init__(message)
        self.code = code


class ConnectionClosed(CasaNodeError):
    """The connection to the head node is closed."""


class UnexpectedReply(CasaNodeError):
    """The head node answered with a message this client did not expect."""


class LeasesUnsupported(CasaNodeError):
    """The head node gives no id leases: submissions wait for a SubmitReply."""
