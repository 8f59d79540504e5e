"""The seed's unit-test matrix (section 5.9), through the seed's face:

    {blocking, non-blocking} x {eval, exec} x {no target, one target,
    several targets} x {parameters in the string, in a dict} x {successful,
    ImportError, NameError, ZeroDivisionError, TypeError, IndexError,
    KeyError}

plus busy target, server timeout, pushing to a timed-out server, timeout
recovery, debugging mode, singletons, invalid instantiation and client
stop. Every test runs once per transport (the `transport` fixture)."""

import logging
import os
import signal
import time

import pytest

import casanode
import clusters
from casanode import (
    MPICommandClient,
    MPICommandServer,
    MPIEnvironment,
    MPIMonitorClient,
    MPIMonitorServer,
    seed,
)

# outcome: (eval, exec) with parameters in the string, (eval, exec) with
# them in a dict, that dict, eval's ret, the exception the traceback names.
OUTCOMES = {
    "successful": (
        ("1 + 2", "c = 1 + 2"), ("a + b", "c = a + b"), {"a": 1, "b": 2}, 3, None,
    ),
    "ImportError": (
        ("__import__('casanode_no_such_module')", "import casanode_no_such_module"),
        ("__import__(name)", "module = __import__(name)"),
        {"name": "casanode_no_such_module"}, None, "ModuleNotFoundError",
    ),
    "NameError": (
        ("casanode_undefined + 1", "c = casanode_undefined + 1"),
        ("casanode_undefined + a", "c = casanode_undefined + a"),
        {"a": 1}, None, "NameError",
    ),
    "ZeroDivisionError": (
        ("1 / 0", "c = 1 / 0"), ("a / b", "c = a / b"), {"a": 1, "b": 0}, None, "ZeroDivisionError",
    ),
    "TypeError": (
        ("1 + 'x'", "c = 1 + 'x'"), ("a + b", "c = a + b"), {"a": 1, "b": "x"}, None, "TypeError",
    ),
    "IndexError": (
        ("[1, 2][5]", "c = [1, 2][5]"), ("a[b]", "c = a[b]"), {"a": [1, 2], "b": 5}, None, "IndexError",
    ),
    "KeyError": (
        ("{'k': 1}['missing']", "c = {'k': 1}['missing']"), ("a[b]", "c = a[b]"),
        {"a": {"k": 1}, "b": "missing"}, None, "KeyError",
    ),
}


@pytest.fixture(scope="module", params=[2, 4], ids=["2-servers", "4-servers"])
def cluster(request, transport):
    """The matrix runs on clusters of 2 and of 4 servers (mpirun -n 3 and
    -n 5 over MPI)."""
    return clusters.started(request, servers=request.param, transport=transport)


@pytest.fixture
def client(seed_client):
    return seed_client


@pytest.mark.parametrize("outcome", list(OUTCOMES))
@pytest.mark.parametrize("where", ["string", "dict"])
@pytest.mark.parametrize("targets", ["none", "one", "several"])
@pytest.mark.parametrize("mode", ["eval", "exec"])
@pytest.mark.parametrize("block", [True, False], ids=["blocking", "non-blocking"])
def test_matrix(client, block, mode, targets, where, outcome):
    in_string, in_dict, dict_parameters, ret, exception = OUTCOMES[outcome]
    pair, parameters = (in_string, None) if where == "string" else (in_dict, dict_parameters)
    command = pair[0] if mode == "eval" else pair[1]
    ranks = MPIEnvironment.mpi_server_rank_list()
    target = {"none": None, "one": [ranks[-1]], "several": ranks}[targets]

    if block:
        responses = client.push_command_request(command, True, target, parameters)
        ids = [r["id"] for r in responses]
    else:
        ids = client.push_command_request(command, False, target, parameters)
        assert all(isinstance(i, int) for i in ids), ids
        assert client.get_command_response_event(ids).wait(60)
        responses = client.get_command_response(ids, False, False)
        assert responses == client.get_command_response(ids, True)

    # Rules 13 and 16: one request per target, ids in target order, the
    # responses in id order.
    expected_servers = target or [responses[0]["server"]]
    assert len(responses) == len(expected_servers)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [r["server"] for r in responses] == expected_servers
    assert responses[0]["server"] in ranks

    for r in responses:
        assert r["command"] == command
        assert r["mode"] == mode  # rule 2: the server decided
        assert r["parameters"] == parameters
        assert r["status"] == "response received"
        if exception is None:  # rules 6 and 7
            assert r["successful"] is True, r["traceback"]
            assert r["traceback"] is None
            assert r["ret"] == (ret if mode == "eval" else None)
        else:
            assert r["successful"] is False
            assert r["ret"] is None
            assert r["traceback"].startswith("Traceback (most recent call last)"), r["traceback"]
            assert f"{exception}:" in r["traceback"], r["traceback"]

    if parameters:
        # Rule 3: parameters are gone from the servers' globals afterwards,
        # whether the command raised or not.
        names = sorted(parameters)
        left = client.push_command_request(
            f"[n for n in {names!r} if n in globals()]", True, expected_servers
        )
        assert [r["ret"] for r in left] == [[] for _ in expected_servers]


def test_the_matrix_has_more_than_60_cases():
    assert 2 * 2 * 3 * 2 * len(OUTCOMES) > 60


# ---------------------------------------------------------- busy target


def test_a_busy_target_runs_later_pushes_after_its_command(client):
    # Rule 15, the seed's own example.
    first, second = MPIEnvironment.mpi_server_rank_list()[:2]
    client.push_command_request("time.sleep(1); test_bs = 1", False, [first])
    a, b = client.push_command_request("test_bs + 1", True, [first, second])
    assert (a["server"], a["ret"], a["successful"]) == (first, 2, True)
    assert b["server"] == second and not b["successful"] and "NameError" in b["traceback"]


def test_an_untargeted_push_waits_for_a_free_server(client):
    # Rule 12: every server busy, so an untargeted request is held, then
    # runs on whichever frees first.
    ranks = MPIEnvironment.mpi_server_rank_list()
    busy = client.push_command_request("time.sleep(0.5)", False, ranks)
    [held] = client.push_command_request("'ran'", False)
    [response] = client.get_command_response([held], True)
    assert response["ret"] == "ran" and response["server"] in ranks
    assert all(r["successful"] for r in client.get_command_response(busy, True))


# ---------------------------------------------------------- singletons


def test_the_clients_are_singletons(client):
    assert MPICommandClient() is client
    assert MPICommandClient() is MPICommandClient()
    assert MPIMonitorClient() is MPIMonitorClient()


def test_server_classes_cannot_be_instantiated_in_a_driver():
    for cls in (MPICommandServer, MPIMonitorServer):
        with pytest.raises(casanode.CasaNodeError, match=cls.__name__):
            cls()


def test_a_command_client_cannot_be_instantiated_in_a_server(client, repo):
    rank = MPIEnvironment.mpi_server_rank_list()[0]
    setup = f"import sys; sys.path.insert(0, {str(repo / 'python')!r}); import casanode"
    [probe] = client.push_command_request(setup, True, [rank])
    assert probe["successful"], probe["traceback"]
    [env] = client.push_command_request(
        "(casanode.MPIEnvironment.is_mpi_client, casanode.MPIEnvironment.mpi_processor_rank)",
        True, [rank],
    )
    assert env["ret"] == (False, rank)
    [made] = client.push_command_request("casanode.MPICommandClient()", True, [rank])
    assert not made["successful"]
    assert f"MPICommandClient cannot be instantiated in a server (rank {rank})" in made["traceback"]


# ---------------------------------------------------------- client stop


def test_stop_services_refuses_later_pushes_and_ends_the_cluster(request, transport, caplog):
    cluster = clusters.started(request, transport=transport)
    seed._reset(cluster.endpoint)
    request.addfinalizer(seed._reset)
    client = MPICommandClient()
    client.start_services()
    [running] = client.push_command_request("(time.sleep(0.3), 'finished')[1]", False)
    client.stop_services()
    # Rule 27: the running command finishes first.
    assert client.get_command_response([running], True)[0]["ret"] == "finished"
    with caplog.at_level(logging.ERROR, logger="casanode"):
        assert client.push_command_request("1+1", True) is None
    assert "stopped" in caplog.text
    assert cluster.proc.wait(60) == 0


# ---------------------------------------------------------- timeouts
#
# A server is made unresponsive by stopping its server node process
# (SIGSTOP, by the PID the status table gives) and brought back with
# SIGCONT. Waits poll the monitor's own state, bounded in time.

HEARTBEAT = 0.2
TIMEOUT = 1.5


@pytest.fixture(scope="module")
def monitored(request, transport):
    """A cluster with a fast monitor, for the timeout cases."""
    return clusters.started(
        request, transport=transport,
        options=["--heartbeat", str(HEARTBEAT), "--timeout", str(TIMEOUT)],
    )


@pytest.fixture
def monitor_client(monitored):
    with clusters.seed_session(monitored.endpoint) as client:
        yield client


def _until(condition, what, limit=60.0):
    end = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Frozen:
    """A server node stopped with SIGSTOP for the duration of a `with`."""

    def __init__(self, rank):
        self.rank = rank
        self.pid = MPIMonitorClient().get_server_status(rank)[rank]["pid"]
        assert self.pid > 0 and self.pid != os.getpid()

    def __enter__(self):
        os.kill(self.pid, signal.SIGSTOP)
        self.when = time.time()
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGCONT)
        # Leave the cluster as found: the server back online.
        monitor = MPIMonitorClient()
        _until(lambda: self.rank not in monitor.get_server_timeout(), f"server {self.rank} to recover")


def test_server_timeout_pushes_to_it_and_recovery(monitor_client, caplog):
    monitor = MPIMonitorClient()
    ranks = MPIEnvironment.mpi_server_rank_list()
    frozen_rank, other = ranks[-1], ranks[0]
    assert MPIEnvironment.mpi_monitor_status_service_timeout == TIMEOUT
    [rid] = monitor_client.push_command_request("(time.sleep(0.5), 'finished')[1]", False, [frozen_rank])
    with Frozen(frozen_rank):
        # Rule 20: marked timed out; its outstanding request is answered
        # with status timeout.
        _until(lambda: monitor.get_server_timeout() == [frozen_rank], "the timeout")
        [record] = monitor_client.get_command_response([rid], True)
        assert record["status"] == "timeout" and record["successful"] is False
        assert "Timeout" in record["traceback"]
        assert frozen_rank not in monitor.get_server_rank_available()
        # Rule 14: a push naming it is rejected whole; nothing is queued.
        with caplog.at_level(logging.ERROR, logger="casanode"):
            assert monitor_client.push_command_request("1", True, [other, frozen_rank]) is None
        assert str(frozen_rank) in caplog.text
        # Rule 12: untargeted requests go elsewhere.
        served = monitor_client.push_command_request("2", True)
        assert served[0]["server"] != frozen_rank and served[0]["ret"] == 2
    # Rule 21: back online, and the real response replaces the timeout record.
    assert frozen_rank in monitor.get_server_rank_online()
    replaced = _until(
        lambda: [r for r in monitor_client.get_command_response([rid], False, False)
                 if r["status"] == "response received"],
        "the real response",
    )
    assert replaced[0]["ret"] == "finished" and replaced[0]["successful"]
    assert monitor_client.push_command_request("3", True, [frozen_rank])[0]["ret"] == 3


def test_debugging_mode_keeps_a_silent_server_online(monitor_client):
    monitor = MPIMonitorClient()
    ranks = MPIEnvironment.mpi_server_rank_list()
    frozen_rank, other = ranks[-1], ranks[0]
    monitor.start_debugging_mode()
    try:
        with Frozen(frozen_rank) as frozen:
            # Wait until the monitor has seen the other server answer well
            # past the timeout since the freeze.
            _until(
                lambda: monitor.get_server_status(other)[other]["last_ping"]
                > frozen.when + 2 * TIMEOUT,
                "pings past the timeout",
            )
            assert monitor.get_server_timeout() == []  # rule 22
            monitor.stop_debugging_mode()
            _until(lambda: monitor.get_server_timeout() == [frozen_rank], "the timeout after debugging")
    finally:
        monitor.stop_debugging_mode()
