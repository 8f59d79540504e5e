"""`casa-node run`: the script runs against a fresh cluster with casanode
importable and the endpoint in its environment; services stop when it ends
and `run` exits with the script's status."""

import os
from pathlib import Path
import textwrap

import pytest

import clusters
from clusters import BINARY

pytestmark = pytest.mark.skipif(
    not BINARY.exists() and not os.environ.get("CASA_NODE_REQUIRE_E2E"),
    reason="casa-node is not built",
)


def test_a_script_runs_against_its_own_cluster_and_its_status_is_kept(tmp_path, transport):
    script = tmp_path / "pipeline.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import casanode
        client = casanode.connect()
        ret = client.submit("a+b", parameters={"a": 1, "b": 2}).result()["ret"]
        pids = {f.result()["ret"] for f in client.submit("os.getpid()", target=[1, 2])}
        from casanode import MPICommandClient
        seed = MPICommandClient()
        assert seed.push_command_request("a*b", True, [2], {"a": 6, "b": 7})[0]["ret"] == 42
        print("ret", ret, "servers", len(pids), "args", sys.argv[1:])
        sys.exit(3)
    """))
    done = clusters.run(script, "x", "--flag", servers=2, transport=transport, directory=tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "ret 3 servers 2 args ['x', '--flag']", done.stdout
    log = (tmp_path / "log").read_text()
    assert "Sending stop service signal to all servers" in log


def test_the_quickstart_example_prints_its_results(tmp_path, transport):
    # The same results over either transport: `casa-node run --servers 2`,
    # or `mpirun -n 3 casa-node --transport mpi run`.
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
    done = clusters.run(quickstart, servers=2, transport=transport, directory=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in [
        "servers: [1, 2]",
        "a+b on server 1 -> 3 (response received)",
        "exec on server 2 -> exec True",
        "1/0 successful: False",
        "ZeroDivisionError: division by zero",
        "later: ['slept', 'slept']",
        "server 2 online idle",
    ]:
        assert line in out, out


def test_sigterm_ends_run_its_script_and_a_stopped_server_within_the_grace(tmp_path):
    # `run` told to stop (SIGTERM, as a batch system does) while one of its
    # server nodes is stopped (SIGSTOP) and its script waits on something
    # other than the cluster: the script gets the SIGTERM too, the stopped
    # server is continued and leaves with its worker, and `run` exits.
    import signal
    import subprocess
    import sys
    script = tmp_path / "waits.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        import casanode
        client = casanode.connect()
        client.submit("time.sleep(600)", target=[1])
        server = client.status(1)[1]
        while server["worker_pid"] is None or not server["busy"]:
            time.sleep(0.05)
            server = client.status(1)[1]
        os.kill(server["pid"], signal.SIGSTOP)
        print(os.getpid(), server["pid"], server["worker_pid"], flush=True)
        time.sleep(600)
    """))
    clusters.require_binary()
    env = dict(os.environ, XDG_RUNTIME_DIR=os.fspath(tmp_path))
    env.pop("CASA_NODE_ENDPOINT", None)
    proc = subprocess.Popen(
        [str(BINARY), "run", "--servers", "2", "--heartbeat", "0.2", "--timeout", "3",
         "--log-file", os.fspath(tmp_path / "log"), "--python", sys.executable, os.fspath(script)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    pids = []
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        # The timeout (3 s) and the exit grace (5 s) bound it; 600 s if the
        # script were left waiting.
        _, stderr = proc.communicate(timeout=60)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        if pids:  # the script, which holds `run`'s output open
            try:
                os.kill(pids[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    log = (tmp_path / "log").read_text()
    assert "Sending stop service signal to all servers" in log, log
    assert "killed with SIGKILL" not in log, log
    for pid in pids:
        assert clusters.gone(pid), f"process {pid} was left behind\n{log}"
