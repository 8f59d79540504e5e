"""casanode against a real cluster: `casa-node up --servers 2`, driven over
its front door."""

import os
import subprocess
import sys
import time

import pytest

import casanode
import clusters
from casanode.connection import resolve_endpoint


def test_the_handshake_describes_the_cluster(client):
    assert client.cluster["server_ranks"] == [1, 2]
    assert client.cluster["world_size"] == 3


def test_eval_with_parameters_returns_the_value(client):
    future = client.submit("a+b", parameters={"a": 1, "b": 2})
    response = future.result(60)
    assert response["ret"] == 3, response
    assert response["id"] == future.id
    assert response["mode"] == "eval"
    assert response["status"] == "response received"
    assert response["successful"] is True
    assert response["traceback"] is None
    assert response["parameters"] == {"a": 1, "b": 2}
    assert response["server"] in (1, 2)
    assert response["command"] == "a+b"
    assert 0 < response["command_start_time"] <= response["command_stop_time"]
    assert set(response) == {
        "command", "id", "mode", "parameters", "ret", "server", "status",
        "successful", "traceback", "command_start_time", "command_stop_time",
        "failure", "worker_signal", "worker_exit_code",
    }
    assert (response["failure"], response["worker_signal"], response["worker_exit_code"]) == (None, None, None)


def test_a_failing_import_reports_its_traceback(client):
    response = client.submit("import something").result(60)
    assert response["successful"] is False
    assert response["mode"] == "exec"
    assert response["ret"] is None
    assert "ModuleNotFoundError" in response["traceback"]


def test_a_targeted_push_runs_once_per_rank_in_order(client):
    futures = client.submit("push", target=[1, 2], parameters={"pushed": (2**80, -0.0, {1: "x"})})
    assert len(futures) == 2 and futures[0].id < futures[1].id
    responses = client.wait(futures, timeout=60)
    assert [r["id"] for r in responses] == [f.id for f in futures]
    assert [r["server"] for r in responses] == [1, 2]
    assert all(r["mode"] == "push" and r["successful"] for r in responses), responses
    # The pushed value stays in each server's globals (rule 2) and comes
    # back losslessly (rule 8).
    again = client.wait(client.submit("pushed", target=[2, 1]), timeout=60)
    assert [r["server"] for r in again] == [2, 1]
    for r in again:
        ret = r["ret"]
        assert ret[0] == 2**80 and str(ret[1]) == "-0.0" and ret[2] == {1: "x"}
        assert isinstance(ret, tuple)


def test_threads_share_one_client(client):
    from concurrent.futures import ThreadPoolExecutor

    def work(i):
        return [client.submit("n * 10", parameters={"n": i * 100 + k}) for k in range(5)]

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(work, range(8)))
    for i, batch in enumerate(batches):
        assert [f.result(60)["ret"] for f in batch] == [(i * 100 + k) * 10 for k in range(5)]
    ids = [f.id for batch in batches for f in batch]
    assert len(set(ids)) == len(ids)


def test_a_done_callback_may_submit_and_wait_for_the_result(client):
    # Callbacks run off the reader thread: one that waits for a result the
    # reader must bring does not hang the connection, and they run in the
    # order their Futures completed.
    import threading

    seen, done = [], threading.Event()

    def then_more(future):
        seen.append(("callback", future.result()["ret"], threading.current_thread().name))
        seen.append(("nested", client.submit("x * 2", parameters={"x": future.result()["ret"]}).result(60)["ret"]))
        if len(seen) == 4:
            done.set()

    first = client.submit("1 + 1", target=1)
    first.add_done_callback(then_more)
    second = client.submit("import time; time.sleep(0.3)\n", target=1)
    client.submit("20 + 1", target=1).add_done_callback(then_more)
    assert done.wait(60), seen
    assert [entry[:2] for entry in seen] == [("callback", 2), ("nested", 4), ("callback", 21), ("nested", 42)]
    assert seen[0][2] == "casanode-callbacks"
    assert second.result(60)["successful"]
    # Added once done: at once, in this thread.
    ran = []
    first.add_done_callback(lambda future: ran.append(threading.current_thread() is threading.main_thread()))
    assert ran == [True]


def test_rejected_submissions_set_the_rejection_on_their_futures(client):
    # Rule 14: the submission returns its Futures at once; the rejection
    # arrives as each id's failure response and is the Futures' exception.
    futures = client.submit("1+1", target=[1, 7])
    for future in futures:
        with pytest.raises(casanode.SubmissionRejected) as e:
            future.result(60)
        assert e.value.reason == "UNKNOWN_TARGET"
        assert "7" in str(e.value)
    records = client.wait(futures, timeout=60)
    assert [r["id"] for r in records] == [f.id for f in futures]
    for record in records:
        assert record["status"] == "response received" and not record["successful"]
        assert record["traceback"].startswith("rejected (UNKNOWN_TARGET): target 7 ")
        assert record["server"] == 0
    with pytest.raises(casanode.SubmissionRejected) as e:
        client.submit("1 +").result(60)
    assert e.value.reason == "INVALID_COMMAND"


def test_waiting_for_an_unknown_id_is_an_error(client):
    with pytest.raises(casanode.UnknownRequest):
        client.wait([10**9])


def test_status_lists_every_server(client):
    table = client.status()
    assert sorted(table) == [1, 2]
    assert all(s["online"] and not s["timeout"] and s["pid"] > 0 for s in table.values())
    assert list(client.status(2)) == [2]


def test_cancel_a_queued_request(client):
    busy = client.submit("time.sleep(2)", target=1)
    queued = client.submit("1", target=1)
    outcome = client.cancel([queued])
    assert outcome["dequeued"] == [queued.id]
    assert queued.result(60)["status"] == "cancelled"
    assert busy.result(60)["successful"]


def test_map_yields_responses_in_the_order_of_its_inputs(client):
    # The first input is the slowest: order is the inputs', not completion's.
    sets = [{"n": 0.4}] + [{"n": i / 1000} for i in range(1, 6)]
    responses = list(client.map("(time.sleep(n), n)[1]", sets, timeout=60))
    assert [r["ret"] for r in responses] == [s["n"] for s in sets]
    assert [r["parameters"] for r in responses] == sets
    assert {r["server"] for r in responses} == {1, 2}  # spread over both servers
    ids = [r["id"] for r in responses]
    assert ids == sorted(ids)


def test_map_streams_thousands_of_submissions_without_waiting_for_each(client):
    # All submissions go out before any reply is read: more frames than the
    # socket buffers hold must not deadlock the driver and the head node.
    sets = [{"n": i, "pad": "x" * 200} for i in range(5000)]
    responses = list(client.map("n * 2", sets, timeout=120))
    assert [r["ret"] for r in responses] == [2 * i for i in range(5000)]
    ids = [r["id"] for r in responses]
    # Rule 11: unique, and increasing within one connection's pushes.
    assert ids == sorted(set(ids))


def test_forget_drops_responses_and_ids(client):
    futures = [client.submit("1+1") for _ in range(3)]
    client.wait(futures, timeout=60)
    client.forget(futures[:2])
    assert client.connection.response(futures[0].id) is None
    assert client.connection.response(futures[2].id) is not None
    with pytest.raises(casanode.UnknownRequest):
        client.wait([futures[1].id], timeout=60)
    assert client.wait([futures[2]], timeout=60)[0]["ret"] == 2


def test_map_raises_a_rejection_when_its_result_is_reached(client):
    results = client.map("x", [{"x": 1}], target=9)
    with pytest.raises(casanode.SubmissionRejected) as e:
        next(results)
    assert e.value.reason == "UNKNOWN_TARGET"
    # Its lease reply, if one was asked, arrives before its response.
    client.submit("1").result(60)
    left = client.connection._leased
    with pytest.raises(ValueError):
        client.map("x", [{"x": 1}], target=[1, 2])
    assert client.connection._leased == left  # no id taken: nothing was submitted


def test_broadcast_runs_once_on_every_server(client):
    futures = client.broadcast("os.getpid()")
    responses = [f.result(60) for f in futures]
    assert [r["server"] for r in responses] == [1, 2]
    table = client.status()
    assert [r["ret"] for r in responses] == [table[1]["worker_pid"], table[2]["worker_pid"]]


def test_as_completed_yields_the_fastest_first(client):
    slow = client.submit("(time.sleep(1.5), 'slow')[1]", target=1)
    fast = client.submit("'fast'", target=2)
    order = [f.result()["ret"] for f in client.as_completed([slow, fast], timeout=60)]
    assert order == ["fast", "slow"]
    both = client.submit("1", target=[1, 2])
    assert sorted(f.id for f in client.as_completed([both], timeout=60)) == [f.id for f in both]


def test_logs_stream_the_servers_output_and_the_request_lines(client):
    with client.logs() as records:
        future = client.submit("print('hello from the worker')", target=2)
        assert future.result(60)["successful"]
        seen = []
        while not (
            any(r["message"] == "hello from the worker" for r in seen)
            and any(f"id {future.id} successfully handled" in r["message"] for r in seen)
        ):
            seen.append(records.get(timeout=30))
    printed = next(r for r in seen if r["message"] == "hello from the worker")
    assert printed["origin"].endswith(":server-2") and printed["rank"] == 2
    assert printed["time"] > 0 and printed["level"] in ("INFO", "WARNING", "DEBUG")
    handled = next(r for r in seen if f"id {future.id} successfully handled" in r["message"])
    assert handled["origin"].endswith(":head") and handled["rank"] == 0
    # Closed: iteration ends.
    assert list(records) == []


def test_a_log_stream_filters_by_level(client):
    with client.logs("WARNING") as warnings, client.logs("DEBUG") as everything:
        client.submit("import logging; logging.getLogger('t').warning('careful'); "
                      "logging.getLogger('t').info('chatty')", target=1).result(60)
        seen = []
        while not any(r["message"].endswith("chatty") for r in seen):
            seen.append(everything.get(timeout=30))
        assert any(r["message"].endswith("careful") and r["level"] == "WARNING" for r in seen)
        # Every stream gets each record in the same turn of the reader, so
        # whatever the WARNING stream will get of these is there now.
        warned = []
        while True:
            try:
                warned.append(warnings.get(timeout=0))
            except TimeoutError:
                break
    assert any(r["message"].endswith("careful") for r in warned), warned
    assert all(r["level"] in ("WARNING", "ERROR", "CRITICAL") for r in warned), warned


def test_the_endpoint_comes_from_the_environment_or_the_record(cluster, monkeypatch):
    monkeypatch.setenv("CASA_NODE_ENDPOINT", cluster.endpoint)
    assert resolve_endpoint() == cluster.endpoint[len("unix://"):]
    monkeypatch.delenv("CASA_NODE_ENDPOINT")
    monkeypatch.setenv("XDG_RUNTIME_DIR", cluster.directory)
    assert resolve_endpoint() == cluster.endpoint[len("unix://"):]
    with casanode.connect() as other:
        assert other.submit("2*21").result(60)["ret"] == 42


def test_stop_refuses_later_submissions_and_ends_the_cluster(request, transport):
    cluster = clusters.started(request, transport=transport)
    client = casanode.connect(cluster.endpoint)
    running = client.submit("[time.sleep(0.5), 'done'][1]")
    client.stop()
    assert running.result(60)["ret"] == "done"
    with pytest.raises((casanode.SubmissionRejected, casanode.ConnectionClosed)):
        client.submit("1").result(60)
    assert cluster.proc.wait(30) == 0
    client.close()


def test_worker_pid_is_known_once_online_and_at_once_after_a_restart(request, transport, tmp_path):
    # Rule 23. Pings every 30 s: what the status shows comes from the server
    # node's own reports, not from a ping answer.
    init = tmp_path / "init.py"
    init.write_text("import time\ntime.sleep(2)\n")
    cluster = clusters.started(
        request, servers=1, transport=transport,
        options=["--heartbeat", "30", "--timeout", "120", "--init", str(init)],
    )
    with casanode.connect(cluster.endpoint) as client:
        # Online while the worker still runs its init script: its pid is
        # already known, the process a script may signal.
        end = time.monotonic() + 60
        while not (status := client.status(1)[1])["online"]:
            assert time.monotonic() < end, status
            time.sleep(0.02)
        assert status["worker_pid"] is not None, status
        first = client.submit("os.getpid()").result(60)["ret"]
        assert status["worker_pid"] == first
        assert client.status(1)[1]["worker_pid"] == first
        died = client.submit("os._exit(3)").result(60)
        assert not died["successful"] and "A fresh Python worker was started" in died["traceback"]
        fresh = client.submit("os.getpid()").result(60)["ret"]
        assert fresh != first
        assert client.status(1)[1]["worker_pid"] == fresh


def test_a_record_left_by_a_dead_head_node_is_not_used(monkeypatch, tmp_path):
    # Issue 15: `casa-node up` killed before it could remove its record.
    # A child that has exited and been reaped stands for the dead node.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.delenv("CASA_NODE_ENDPOINT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    runtime = tmp_path / "casa-node"
    runtime.mkdir(mode=0o700)
    record = runtime / "endpoint"
    record.write_text(f"unix://{tmp_path}/gone.sock\npid {dead.pid}\n")
    with pytest.raises(casanode.NoCluster):
        resolve_endpoint()
    # The same record naming a live process is used.
    record.write_text(f"unix://{tmp_path}/live.sock\npid {os.getpid()}\n")
    assert resolve_endpoint() == f"{tmp_path}/live.sock"
