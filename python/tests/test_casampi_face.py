"""casa-node's casampi (python/casampi, what `--casa` puts first on the
path) on the driver, against a real cluster: casampi 0.6's names, types
and behaviour for MPIEnvironment, MPICommandClient, MPIMonitorClient,
MPICommandServer and the MPIInterface cluster CASA's parallel imager
drives. Without CASA: the driver side needs casanode only (CASA's own
tasks run through it in tests/casa)."""

import os
import sys
import time

import pytest

import clusters

sys.path.insert(0, os.fspath(clusters.REPO / "python"))

from casanode import seed  # noqa: E402
from casampi.MPICommandClient import MPICommandClient  # noqa: E402
from casampi.MPIEnvironment import MPIEnvironment  # noqa: E402
from casampi.MPIInterface import MPIInterface, MPIInterfaceCore  # noqa: E402
from casampi.private.MPICommandServer import MPICommandServer  # noqa: E402
from casampi.private.MPIMonitorClient import MPIMonitorClient  # noqa: E402

CASAMPI_STATUS_KEYS = {"rank", "processor", "pid", "busy", "command", "command_start_time",
                       "pong_pending", "ping_time", "pong_time", "timeout"}


def _forget():
    """Forgets casampi's singletons and the shared connection."""
    for cls in (MPICommandClient, MPIMonitorClient, MPIInterfaceCore, MPIInterface):
        cls._impl = None
    seed._reset()


@pytest.fixture
def session(cluster):
    """casampi's command client on the module's cluster, services started."""
    _forget()
    seed._reset(cluster.endpoint)
    client = MPICommandClient()
    client.start_services()
    yield client
    _forget()


def test_the_environment_is_casampis(session):
    assert MPIEnvironment.is_mpi_enabled is True
    assert MPIEnvironment.is_mpi_client is True
    assert MPIEnvironment.is_mpi_disabled_or_client() is True
    assert MPIEnvironment.mpi_processor_rank == 0
    assert MPIEnvironment.mpi_server_rank_list() == [1, 2]
    assert MPIEnvironment.mpi_world_size == 3
    # The cluster runs with the default 1 s and 5 s: ints, as casampi's,
    # so that `range(0, timeout + 5)` works.
    assert type(MPIEnvironment.mpi_monitor_status_service_heartbeat) is int
    assert MPIEnvironment.mpi_monitor_status_service_heartbeat == 1
    assert type(MPIEnvironment.mpi_monitor_status_service_timeout) is int
    assert MPIEnvironment.mpi_monitor_status_service_timeout == 5
    assert MPIEnvironment.processor_origin.endswith(":MPIClient")
    assert "MPIClient" in MPIEnvironment.mpi_info_msg


def test_the_command_client_is_a_singleton_handle(session):
    other = MPICommandClient()
    assert other is not session
    [r] = other.push_command_request("a+b", True, [1], {"a": 1, "b": 1})
    assert r["ret"] == 2 and r["status"] == "response received" and r["traceback"] is None
    assert session.get_lifecyle_state() == 1


def test_pushes_need_started_services_and_a_valid_target(cluster, session):
    _forget()
    seed._reset(cluster.endpoint)
    client = MPICommandClient()
    assert client.get_lifecyle_state() == 0
    assert client.push_command_request("1+1", True, [1]) is None  # not started
    client.start_services()
    assert client.push_command_request("1+1", True, "1") is None  # wrong format
    assert client.push_command_request("1+1", True, [9]) is None  # no server 9
    assert client.push_command_request("1 +", True, [1]) is None  # not Python
    [r] = client.push_command_request("1+1", True, (2,))
    assert r["ret"] == 2 and r["server"] == 2


def test_the_request_and_response_lists_follow_each_request(session):
    [slow] = session.push_command_request("time.sleep(1.5)", False, [1])
    [fast] = session.push_command_request("x = 3", False, [2])
    session.get_command_response([fast], True)
    requests = session.get_command_request_list()
    assert requests[slow]["status"] == "request sent" and requests[slow]["server"] == 1
    assert requests[slow]["mode"] == "eval" and requests[fast]["mode"] == "exec"
    assert requests[slow]["command"] == "time.sleep(1.5)"
    assert requests[fast]["status"] == "response received"
    responses = session.get_command_response_list()
    assert fast in responses and slow not in responses
    session.get_command_response([slow], True)
    assert session.get_command_request_list()[slow]["status"] == "response received"
    assert session.get_command_response_list()[slow]["successful"] is True


def test_the_monitor_has_casampis_keys(session):
    monitor = MPIMonitorClient()
    table = monitor.get_server_status()
    assert sorted(table) == [1, 2]
    one = monitor.get_server_status(1)
    assert CASAMPI_STATUS_KEYS <= set(one) and one["rank"] == 1 and one["pid"] > 0
    assert monitor.get_server_status_keyword(2, "processor") == one["processor"]
    assert monitor.get_server_status(7) is None
    assert monitor.get_server_status_keyword(1, "no such key") is None
    assert monitor.get_server_rank_online() == [1, 2]
    assert monitor.get_server_timeout() == []
    monitor.start_debugging_mode()
    assert MPIEnvironment.mpi_monitor_status_service_timeout_enabled is False
    monitor.stop_debugging_mode()
    assert MPIEnvironment.mpi_monitor_status_service_timeout_enabled is True


def test_a_command_server_cannot_be_instantiated(session):
    with pytest.raises(RuntimeError):
        MPICommandServer()


def test_the_cluster_interface_of_the_parallel_imager(session):
    MPIInterface.set_log_mode("redirect")
    sc = MPIInterface.getCluster()
    assert sc.isClusterRunning()
    CL = sc._cluster
    assert CL.get_engines() == [1, 2]
    assert len(CL.get_nodes()) == 1
    CL.pgc("import sys")
    assert [r["ret"] for r in CL.pgc("'sys' in sys.modules")] == [True, True]
    assert sc.get_engine_store(1) == CL.execute("os.getcwd()", 2)[0]["ret"]
    CL.push({"a": 33, "b": {"test": 29.2}}, [1, 2])
    assert CL.pull("a", [1, 2]) == {1: 33, 2: 33}
    assert CL.pull("b") == {1: {"test": 29.2}, 2: {"test": 29.2}}
    CL.pgc({1: "ya=3", 2: "ya='b'"})
    assert CL.pull("ya", [1, 2]) == {1: 3, 2: "b"}
    ids = CL.odo("time.sleep(0.5)", 1)
    deadline = time.monotonic() + 30
    while not CL.check_job(ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert CL.check_job(ids) is True
    ids = CL.odo("1/0", [1, 2])
    session.get_command_response(ids, True)
    with pytest.raises(Exception, match="ZeroDivisionError"):
        CL.check_job(ids)
    [running] = CL.odo("time.sleep(2)", 1)
    table = sc.get_status()
    assert len(table) - 1 == len(CL.get_command_request_list())
    assert [row[3] for row in table[1:] if row[0] == str(running)] == ["request sent"]


def test_stop_services_ends_the_life_cycle(request, transport):
    cluster = clusters.started(request, transport=transport)
    _forget()
    seed._reset(cluster.endpoint)
    try:
        client = MPICommandClient()
        client.start_services()
        client.stop_services()
        assert client.get_lifecyle_state() == 2
        assert client.push_command_request("1+1", True) is None
        client.start_services()  # finalized: stays stopped
        assert client.get_lifecyle_state() == 2
        assert cluster.proc.wait(30) == 0
    finally:
        _forget()
