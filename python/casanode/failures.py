"""What kind of failure a response reports (rule 7), as a name and as an
exception class.

Every response dict has `failure`: None when the command succeeded, else
the kind's name ("raised", "worker_died", "deadline", "cancelled",
"server_lost", "too_large", "not_sent", "rejected", "restarted",
"no_server"), the proto's FailureKind without its prefix, so that a driver
can decide (retry, give up, shrink a value) without reading the traceback.
A worker's death also sets `worker_signal` or `worker_exit_code`.

`raise_for_failure(record)` returns the record's `ret`, or raises the
CommandFailed subclass of its kind; a Future of the modern face does the
same with `future.value()`:

    try:
        area = client.submit("measure(ms)").value()
    except casanode.WorkerDied as e:        # killed, out of memory: retry
        ...
    except casanode.CommandRaised as e:     # the command's own exception
        print(e.traceback)
"""

from ._pb.casa.node.v1 import node_pb2
from .connection import CasaNodeError

_PREFIX = "FAILURE_KIND_"

# Kind number -> name, from the descriptor (the Rust side derives the same
# names from the same proto).
NAMES = {
    number: name[len(_PREFIX):].lower()
    for name, number in node_pb2.FailureKind.items()
    if number != node_pb2.FAILURE_KIND_NONE
}


def failure_name(number):
    """A FailureKind number's name; None for FAILURE_KIND_NONE."""
    if number == node_pb2.FAILURE_KIND_NONE:
        return None
    return NAMES.get(number, f"unknown ({number})")


class CommandFailed(CasaNodeError):
    """A response that says its command failed (rule 7). `record` is the
    response dict, `id` its request id, `kind` the failure's name and
    `traceback` Python's traceback or the reason."""

    kind = None

    def __init__(self, record):
        self.record = record
        self.id = record.get("id")
        self.traceback = record.get("traceback") or ""
        lines = [line for line in self.traceback.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no traceback"
        super().__init__(f"request {self.id} failed ({record.get('failure')}): {last}")


class CommandRaised(CommandFailed):
    """The command raised an exception; `traceback` is Python's."""

    kind = "raised"


class WorkerDied(CommandFailed):
    """The worker died running the command (killed, crashed, out of
    memory), as Dask's KilledWorker: `signal` or `exit_code` says how."""

    kind = "worker_died"

    def __init__(self, record):
        super().__init__(record)
        self.signal = record.get("worker_signal")
        self.exit_code = record.get("worker_exit_code")


class DeadlineExceeded(CommandFailed):
    """The command ran past its deadline and was interrupted (rule 24)."""

    kind = "deadline"


class CommandCancelled(CommandFailed):
    """Cancelled before or while it ran (rules 24, 27)."""

    kind = "cancelled"


class ServerLost(CommandFailed):
    """Its server timed out or disconnected before answering (rule 20)."""

    kind = "server_lost"


class TooLarge(CommandFailed):
    """The request or the response was too large for a frame."""

    kind = "too_large"


class NotSent(CommandFailed):
    """It could not be handed to a worker, or its values could not be
    moved."""

    kind = "not_sent"


class CommandRejected(CommandFailed):
    """Refused at submission (rule 14), as a record (the seed face, or
    ids claimed)."""

    kind = "rejected"


class LostInRestart(CommandFailed):
    """Accepted by a head node that died and not run again by the one
    started from its journal (rule 33)."""

    kind = "restarted"


class NoServerLeft(CommandFailed):
    """Every server has left for good; none can run it (rule 20)."""

    kind = "no_server"


CLASSES = {
    cls.kind: cls
    for cls in (
        CommandRaised, WorkerDied, DeadlineExceeded, CommandCancelled, ServerLost,
        TooLarge, NotSent, CommandRejected, LostInRestart, NoServerLeft,
    )
}


def raise_for_failure(record):
    """The record's `ret` when its command succeeded; else raises the
    CommandFailed subclass of its `failure` (CommandFailed itself for a kind
    this client does not know)."""
    if record.get("successful"):
        return record.get("ret")
    raise CLASSES.get(record.get("failure"), CommandFailed)(record)
