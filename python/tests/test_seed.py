"""The seed's face (MPICommandClient, MPIEnvironment, MPIMonitorClient)
against a real cluster: the examples of the seed's sections 5.3-5.7."""

import logging
import time

import pytest

import casanode
from casanode import MPICommandClient, MPIEnvironment, MPIMonitorClient, seed
from casanode._pb.casa.node.v1 import driver_pb2
import clusters


@pytest.fixture
def client(seed_client):
    return seed_client


def test_the_command_client_is_a_singleton(client):
    assert MPICommandClient() is client
    client.start_services()  # idempotent
    assert MPICommandClient() is client


def test_the_environment_describes_the_cluster(client):
    assert MPIEnvironment.is_mpi_enabled is True
    assert MPIEnvironment.is_mpi_client is True
    assert MPIEnvironment.mpi_processor_rank == 0
    assert MPIEnvironment.mpi_server_rank_list() == [1, 2]
    assert MPIEnvironment.mpi_world_size == 3
    assert MPIEnvironment.hostname
    assert MPIEnvironment.mpi_monitor_status_service_heartbeat > 0
    assert MPIEnvironment.mpi_monitor_status_service_timeout > 0


def test_a_blocking_push_returns_the_response_dicts(client):
    responses = client.push_command_request("a+b", True, [1], {'a': 1, 'b': 2})
    assert len(responses) == 1
    r = responses[0]
    assert r["ret"] == 3 and r["mode"] == "eval" and r["server"] == 1
    assert r["status"] == "response received"
    assert r["successful"] is True and r["traceback"] is None
    assert r["parameters"] == {'a': 1, 'b': 2}


def test_a_non_blocking_push_returns_ids_then_responses(client, caplog):
    [fast] = client.push_command_request("a+b", False, [1], {'a': 30, 'b': 40})
    [slow] = client.push_command_request("time.sleep(a)", False, [2], {'a': 2})
    assert fast < slow
    assert client.get_command_response_event([fast]).wait(60)
    with caplog.at_level(logging.INFO, logger="casanode"):
        available = client.get_command_response([fast, slow], False, True)
    assert [r["id"] for r in available] == [fast]
    assert available[0]["ret"] == 70
    assert f"id# {slow} assigned to server n# 2, response pending" in caplog.text
    both = client.get_command_response([slow, fast], True)
    assert [r["id"] for r in both] == [fast, slow]
    assert all(r["successful"] for r in both)


def test_a_busy_target_runs_pushes_in_order(client):
    # Rule 15: test_bs is set on server 1 only, after the sleep.
    client.push_command_request("time.sleep(1); test_bs=1", False, [1])
    a, b = client.push_command_request("test_bs+1", True, [1, 2])
    assert a["server"] == 1 and a["ret"] == 2 and a["successful"]
    assert b["server"] == 2 and not b["successful"] and "NameError" in b["traceback"]


def test_a_rejected_push_returns_none_and_logs_why(client, caplog):
    with caplog.at_level(logging.ERROR, logger="casanode"):
        assert client.push_command_request("1+1", True, [7]) is None
    assert "7" in caplog.text


def test_an_unknown_id_is_an_error(client):
    with pytest.raises(casanode.UnknownRequest):
        client.get_command_response([10**9])
    with pytest.raises(casanode.UnknownRequest):
        client.get_command_response_event([10**9])


def test_the_event_is_set_when_every_response_arrived(client):
    ids = client.push_command_request("time.sleep(0.5)", False, [1, 2])
    event = client.get_command_response_event(ids)
    assert not event.is_set()
    assert event.wait(60)
    assert [r["id"] for r in client.get_command_response(ids, verbose=False)] == ids


def test_server_status_has_the_seed_keys(client):
    table = client.get_server_status()
    assert sorted(table) == [1, 2]
    for rank, s in table.items():
        assert set(s) == set(seed.STATUS_KEYS)
        assert s["rank"] == rank and s["online"] and not s["timeout"] and s["pid"] > 0
    assert list(client.get_server_status(2)) == [2]
    client.set_log_mode("redirect")
    client.set_log_level("DEBUG")
    client.set_log_level("WARN")
    client.set_log_level("INFO")
    with pytest.raises(ValueError):
        client.set_log_level("LOUD")


def test_the_monitor_lists_servers(client):
    monitor = MPIMonitorClient()
    assert monitor.get_server_rank_online() == [1, 2]
    assert monitor.get_server_timeout() == []
    [rid] = client.push_command_request("time.sleep(3)", False, [1])
    deadline = time.monotonic() + 10
    while 1 in monitor.get_server_rank_available() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert monitor.get_server_rank_available() == [2]
    assert monitor.get_server_status(1)[1]["busy"]
    client.get_command_response([rid], True)
    assert sorted(monitor.get_server_status()) == [1, 2]


def _debugging():
    kind, reply = seed._shared_client().connection.request(status_request=driver_pb2.StatusRequest())
    return reply.cluster.debugging


def test_debugging_mode_turns_on_and_off(client):
    monitor = MPIMonitorClient()
    monitor.start_debugging_mode()
    assert _debugging() is True
    monitor.stop_debugging_mode()
    assert _debugging() is False


def test_services_stop_when_the_driver_exits(request, transport):
    import os
    import subprocess
    import sys

    cluster = clusters.started(request, transport=transport)
    script = (
        "from casanode import MPICommandClient\n"
        "c = MPICommandClient(); c.start_services()\n"
        "print(c.push_command_request('6*7', True)[0]['ret'])\n"
    )
    env = dict(os.environ, CASA_NODE_ENDPOINT=cluster.endpoint)
    done = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"
    assert cluster.proc.wait(30) == 0  # atexit ran stop_services
