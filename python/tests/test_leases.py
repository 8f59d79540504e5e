"""Pipelined pushes: ids leased to each connection (rules 11, 14, 16)."""

import logging
import os
import signal
import socket
import struct
import threading
import time

import pytest

import casanode
from casanode.connection import LEASE_BLOCK_VAR


def _head_node_pid(client):
    """The head node's PID: the peer of the front door's unix socket."""
    creds = client.connection._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    assert pid > 0 and pid != os.getpid()
    return pid


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _while_stopped(pid, work, limit=20):
    """Runs work() in a thread while the process `pid` is stopped
    (SIGSTOP); returns its result, or fails if it does not return within
    `limit` seconds. The process is always continued."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except BaseException as e:  # reported below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        # The stop takes effect asynchronously: wait until it has.
        deadline = time.monotonic() + 10
        while _state(pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(pid) == "T", "the head node did not stop"
        thread.start()
        thread.join(limit)
        returned = not thread.is_alive()
        state = _state(pid)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert state == "T", f"the head node was not stopped: state {state}"
    assert returned, "the pushes waited for the stopped head node"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_non_blocking_pushes_return_while_the_head_node_is_stopped(cluster):
    with casanode.connect(cluster.endpoint) as client:
        assert client.submit("0").result(60)["ret"] == 0  # a lease in hand
        pid = _head_node_pid(client)
        futures = _while_stopped(
            pid, lambda: [client.submit("n + 1", parameters={"n": n}) for n in range(200)]
        )
        assert [f.result(60)["ret"] for f in futures] == list(range(1, 201))
        ids = [f.id for f in futures]
        assert ids == sorted(set(ids))


def test_seed_non_blocking_pushes_return_ids_while_the_head_node_is_stopped(seed_client):
    from casanode import seed

    assert seed_client.push_command_request("1", True)[0]["ret"] == 1  # a lease in hand
    pid = _head_node_pid(seed._shared_client())
    ids = _while_stopped(
        pid, lambda: [seed_client.push_command_request("2 * k", False, [1 + k % 2], {"k": k}) for k in range(100)]
    )
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    records = seed_client.get_command_response(flat, True)
    assert [r["ret"] for r in records] == [2 * k for k in range(100)]
    assert [r["server"] for r in records] == [1 + k % 2 for k in range(100)]


def test_an_unknown_target_in_a_non_blocking_push_answers_each_id_with_a_failure(seed_client, caplog):
    with caplog.at_level(logging.ERROR, logger="casanode"):
        ids = seed_client.push_command_request("1+1", False, [1, 7])
        assert len(ids) == 2
        assert seed_client.get_command_response_event(ids).wait(60), "no failure responses"
        records = seed_client.get_command_response(ids, False)
    assert [r["id"] for r in records] == ids
    for record in records:
        assert record["status"] == "response received"
        assert record["successful"] is False and record["ret"] is None
        assert record["traceback"] == "rejected (UNKNOWN_TARGET): target 7 is not a server rank (server ranks: 1-2)"
        assert record["command"] == "1+1" and record["server"] == 0
    # The seed logs the rejection once, as for a blocking push.
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert lines == ["Command request '1+1' rejected: target 7 is not a server rank (server ranks: 1-2)"]
    # A blocking push that is rejected still returns None (rule 14).
    with caplog.at_level(logging.ERROR, logger="casanode"):
        assert seed_client.push_command_request("1+1", True, [7]) is None


def test_ids_are_unique_across_two_drivers_pushing_at_once(cluster, monkeypatch):
    monkeypatch.setenv(LEASE_BLOCK_VAR, "16")  # many leases, interleaved
    clients = [casanode.connect(cluster.endpoint) for _ in range(2)]
    results = [None, None]
    start = threading.Barrier(2)

    def push(i):
        start.wait()
        results[i] = [clients[i].submit("k", parameters={"k": (i, k)}) for k in range(300)]

    threads = [threading.Thread(target=push, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        ids = []
        for i, futures in enumerate(results):
            assert [f.result(60)["ret"] for f in futures] == [(i, k) for k in range(300)]
            mine = [f.id for f in futures]
            assert mine == sorted(set(mine)), "increasing within one connection"
            ids.append(set(mine))
        assert not ids[0] & ids[1], "no id was given to both drivers"
    finally:
        for c in clients:
            c.close()


def test_pushes_beyond_one_lease_ask_for_more_without_waiting(cluster, monkeypatch):
    monkeypatch.setenv(LEASE_BLOCK_VAR, "4")
    with casanode.connect(cluster.endpoint) as client:
        leases = []
        on_lease = client.connection._on_lease

        def counted(kind, message, error):
            leases.append((kind, message.first if message is not None else None))
            on_lease(kind, message, error)

        client.connection._on_lease = counted
        left_when_asked = []
        ask = client.connection._ask_lease

        def asking():
            left_when_asked.append(client.connection._leased)
            ask()

        client.connection._ask_lease = asking
        responses = list(client.map("n * 3", [{"n": n} for n in range(50)], timeout=120))
        assert [r["ret"] for r in responses] == [3 * n for n in range(50)]
        ids = [r["id"] for r in responses]
        assert ids == sorted(set(ids))
        assert all(kind == "id_lease" for kind, _ in leases)
        # 50 ids from blocks of 4: at least 13 leases, each higher.
        assert len(leases) >= 13
        firsts = [first for _, first in leases]
        assert firsts == sorted(firsts)
        # Each block after the first was asked for before the ids ran out.
        assert left_when_asked[0] == 0
        assert all(left > 0 for left in left_when_asked[1:]), left_when_asked


def test_a_bad_lease_block_is_a_clear_error(cluster, monkeypatch):
    for bad in ["0", "70000", "many"]:
        monkeypatch.setenv(LEASE_BLOCK_VAR, bad)
        with pytest.raises(casanode.CasaNodeError, match=LEASE_BLOCK_VAR if bad == "many" else "lease block"):
            casanode.connect(cluster.endpoint)
