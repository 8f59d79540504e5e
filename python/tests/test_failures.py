"""Rule 7: every failure says its kind, in the record (`failure`,
`worker_signal`, `worker_exit_code`) and as the exception a Future's
`value()` raises, so a driver can act without reading the traceback."""

import signal

import pytest

import casanode
import clusters
from casanode.failures import CLASSES, NAMES


def test_a_success_has_no_failure_and_value_returns_ret(client):
    future = client.submit("6 * 7")
    assert future.value(60) == 42
    record = future.result()
    assert (record["failure"], record["worker_signal"], record["worker_exit_code"]) == (None, None, None)


def test_a_command_that_raises_is_raised(client):
    future = client.submit("1 / 0")
    record = future.result(60)
    assert record["failure"] == "raised"
    with pytest.raises(casanode.CommandRaised) as raised:
        future.value()
    assert "ZeroDivisionError" in raised.value.traceback
    assert raised.value.id == future.id and raised.value.record is record
    assert isinstance(raised.value, casanode.CommandFailed)
    assert "ZeroDivisionError" in str(raised.value)


def test_a_killed_worker_says_its_signal(client):
    future = client.submit("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", target=1)
    record = future.result(60)
    assert (record["failure"], record["worker_signal"], record["worker_exit_code"]) == (
        "worker_died", int(signal.SIGKILL), None), record
    with pytest.raises(casanode.WorkerDied) as died:
        future.value()
    assert (died.value.signal, died.value.exit_code) == (int(signal.SIGKILL), None)


def test_a_worker_that_exits_says_its_status(client):
    record = client.submit("os._exit(3)", target=2).result(60)
    assert (record["failure"], record["worker_signal"], record["worker_exit_code"]) == (
        "worker_died", None, 3), record


def test_a_deadline_and_a_cancel_say_so(client):
    late = client.submit("time.sleep(30)", target=1, deadline=0.5)
    assert late.result(60)["failure"] == "deadline"
    with pytest.raises(casanode.DeadlineExceeded):
        late.value()
    running = client.submit("time.sleep(30)", target=2)
    queued = client.submit("1", target=2)
    client.cancel([running, queued])
    assert running.result(60)["failure"] == "cancelled"
    assert queued.result(60)["failure"] == "cancelled"
    with pytest.raises(casanode.CommandCancelled):
        queued.value()


def test_a_refused_submission_raises_its_rejection(client):
    future = client.submit("1", target=99)
    with pytest.raises(casanode.SubmissionRejected):
        future.value(60)


def test_the_seed_face_records_carry_the_kind(cluster):
    with clusters.seed_session(cluster.endpoint) as seed:
        records = seed.push_command_request("1 / 0", True, [1])
        assert records[0]["failure"] == "raised"
        records = seed.push_command_request("1", True, [7])
        assert records is None  # refused, logged (rule 14)


def test_every_kind_of_the_proto_has_a_class():
    # Derived from the descriptor: a kind added to the proto without a
    # class here fails this test.
    assert set(NAMES.values()) == set(CLASSES)
    for name, cls in CLASSES.items():
        assert issubclass(cls, casanode.CommandFailed) and cls.kind == name
    record = {"id": 1, "successful": False, "failure": "something new", "traceback": "x"}
    with pytest.raises(casanode.CommandFailed):
        casanode.raise_for_failure(record)
