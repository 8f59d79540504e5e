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
