"""The head node's journal (rule 33): a head node SIGKILLed and started
again with the same `--journal` gives back the responses it gave, runs
again what was pending (but for `retry=False`), and gives ids on."""

import os
import signal
import socket
import struct
import time

import pytest

import casanode
import clusters


def _head_node_pid(client):
    """The head node's PID: the peer of the front door's unix socket
    (under MPI, rank 0; `up` itself over ZeroMQ)."""
    creds = client.connection._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    assert pid > 0 and pid != os.getpid()
    return pid


def test_a_head_node_restarted_from_its_journal_loses_no_request(tmp_path, transport):
    journal = tmp_path / "journal"
    runs = tmp_path / "runs"
    options = ["--journal", str(journal), "--heartbeat", "0.2", "--timeout", "3"]
    first = clusters.start(servers=2, transport=transport, options=options)
    second = None
    try:
        client = casanode.connect(first.endpoint)
        done = client.submit("6*7")
        assert done.result(60)["ret"] == 42
        # Pending when the head node dies: each sleeps, then says it ran.
        command = "time.sleep(1.5) or open(path, 'a').write(word + '\\n')"
        again = client.submit(command, target=1, parameters={"path": str(runs), "word": "again"})
        once = client.submit(command, target=2, parameters={"path": str(runs), "word": "once"}, retry=False)
        # The front door answers a connection's messages in order: once
        # status is answered, both submissions were accepted (journaled).
        client.status()
        os.kill(_head_node_pid(client), signal.SIGKILL)
        first.proc.wait(30)
        client.close()

        second = clusters.start(servers=2, transport=transport, options=options)
        client = casanode.connect(second.endpoint)
        answered = client.result(done.id, 60)
        assert (answered["status"], answered["ret"]) == ("response received", 42)
        ran_again = client.result(again.id, 60)
        assert ran_again["successful"], ran_again
        not_again = client.result(once.id, 60)
        assert (not_again["status"], not_again["successful"]) == ("cancelled", False), not_again
        assert "restarted from its journal" in not_again["traceback"], not_again
        assert "retry=False" in not_again["traceback"], not_again
        assert "again" in runs.read_text().split()
        with pytest.raises(casanode.UnknownRequest, match="knows no request with id 987654321"):
            client.claim([987654321])
        # Ids go on: none is given twice.
        assert client.submit("1").id > max(done.id, again.id, once.id)
        client.close()
    finally:
        clusters.stop(first)
        if second is not None:
            clusters.stop(second)


def test_a_waiting_driver_finds_the_head_node_restarted_from_its_journal(tmp_path, transport):
    # Future.result(), Client.wait and the seed face's blocking get wait on
    # through the head node's death and restart (rule 33), and give the
    # answers of the new one.
    journal = tmp_path / "journal"
    options = ["--journal", str(journal), "--heartbeat", "0.2", "--timeout", "3"]
    first = clusters.start(servers=2, transport=transport, options=options)
    second = None
    try:
        client = casanode.connect(first.endpoint, patience=60)
        assert client.cluster["journal"] is True
        slow = client.submit("time.sleep(1.5) or 7", target=1)
        quick = client.submit("6*7", target=2)
        assert quick.result(60)["ret"] == 42
        while not client.status(1)[1]["busy"]:
            time.sleep(0.02)
        os.kill(_head_node_pid(client), signal.SIGKILL)
        first.proc.wait(30)
        clusters.stop(first, remove=False)
        second = clusters.start(servers=2, transport=transport, options=options, directory=first.directory)
        assert second.endpoint == first.endpoint
        answered = slow.result(60)
        assert (answered["status"], answered["ret"]) == ("response received", 7), answered
        assert [r["ret"] for r in client.wait([slow, quick], timeout=60)] == [7, 42]
        assert client.submit("1").result(60)["ret"] == 1
        client.close()
    finally:
        clusters.stop(first, remove=second is None)
        if second is not None:
            clusters.stop(second)


def test_without_a_journal_a_waiting_driver_is_told_at_once(tmp_path):
    # Nothing to come back to: the wait ends with ConnectionClosed, not
    # after the patience.
    first = clusters.start(servers=1, options=["--heartbeat", "0.2", "--timeout", "3"])
    try:
        client = casanode.connect(first.endpoint, patience=600)
        assert client.cluster["journal"] is False
        slow = client.submit("time.sleep(600)")
        client.status()
        os.kill(_head_node_pid(client), signal.SIGKILL)
        with pytest.raises(casanode.ConnectionClosed):
            slow.result(30)
    finally:
        clusters.stop(first)
