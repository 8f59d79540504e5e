"""`casa-node run`: the script runs against a fresh cluster with casanode
importable and the endpoint in its environment; services stop when it ends
and `run` exits with the script's status."""

import os
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest

from clusters import BINARY

pytestmark = pytest.mark.skipif(
    not BINARY.exists() and not os.environ.get("CASA_NODE_REQUIRE_E2E"),
    reason="casa-node is not built",
)


def test_a_script_runs_against_its_own_cluster_and_its_status_is_kept(tmp_path):
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
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("CASA_NODE_ENDPOINT", None)
    done = subprocess.run(
        [str(BINARY), "run", "--servers", "2", "--python", sys.executable,
         "--log-file", str(tmp_path / "log"), str(script), "x", "--flag"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "ret 3 servers 2 args ['x', '--flag']", done.stdout
    log = (tmp_path / "log").read_text()
    assert "Sending stop service signal to all servers" in log


def test_the_quickstart_example_prints_its_results(tmp_path):
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("CASA_NODE_ENDPOINT", None)
    done = subprocess.run(
        [str(BINARY), "run", "--servers", "2", "--python", sys.executable,
         "--log-file", str(tmp_path / "log"), str(quickstart)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
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
