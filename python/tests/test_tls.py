"""The Python driver on a tcp:// front door: TLS that trusts only the
connection file's certificate, and the file's token in the Hello. A real
`casa-node up` on loopback, stopped by PID."""

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import casanode
import clusters


@pytest.fixture(scope="module")
def tls_cluster():
    """A one-server cluster whose front door is tcp://127.0.0.1:PORT, with
    the connection file `up` created (cluster.connection_file)."""
    clusters.require_binary()
    directory = tempfile.mkdtemp(prefix="casanode-tls-")
    connection_file = os.path.join(directory, "secrets", "cluster.json")
    env = dict(os.environ, XDG_RUNTIME_DIR=directory)
    env.pop("CASA_NODE_ENDPOINT", None)
    env.pop("CASA_NODE_CONNECTION_FILE", None)
    with open(os.path.join(directory, "stderr"), "wb") as stderr:
        proc = subprocess.Popen(
            [
                str(clusters.BINARY), "up", "--servers", "1",
                "--endpoint", "tcp://127.0.0.1:0",
                "--connection-file", connection_file,
                "--log-file", os.path.join(directory, "log"),
                "--python", sys.executable,
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env,
        )
    cluster = clusters.Cluster(proc, directory, "zmq", 1)
    cluster.connection_file = connection_file
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline().decode() if ready else ""
        assert line.startswith("front door: tcp://127.0.0.1:"), f"{line!r} {cluster.stderr()}"
        cluster.endpoint = line[len("front door: "):].strip()
        yield cluster
    finally:
        clusters.stop(cluster)


def _logged(cluster, *parts, timeout=60):
    """The first WARNING line of the cluster's log holding every part,
    waited for up to `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        for line in cluster.log().splitlines():
            if "WARNING" in line and all(p in line for p in parts):
                return line
        if time.monotonic() > end:
            pytest.fail(f"no warning with {parts} in the log:\n{cluster.log()}")
        time.sleep(0.02)


def _copy(cluster, name, mode=0o600, **changes):
    """A copy of the connection file with `changes`, at `mode`."""
    with open(cluster.connection_file, encoding="utf-8") as f:
        data = json.load(f)
    data.update(changes)
    path = os.path.join(cluster.directory, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.chmod(path, mode)
    return path


def _still_serving(cluster):
    with casanode.connect(connection_file=cluster.connection_file) as client:
        assert client.submit("1+1").result(60)["ret"] == 2


def test_the_right_token_over_tls_is_served(tls_cluster, monkeypatch):
    mode = os.stat(tls_cluster.connection_file).st_mode & 0o777
    assert mode == 0o600
    # The endpoint comes from the connection file ...
    with casanode.connect(connection_file=tls_cluster.connection_file) as client:
        assert client.connection.endpoint == tls_cluster.endpoint
        assert client.submit("1+1").result(60)["ret"] == 2
        # A large parameter goes out in several buffers (no sendmsg on TLS)
        # and its echo comes back as a large frame.
        blob = bytes(range(256)) * (16 << 10)
        response = client.submit("b", parameters={"b": blob}).result(60)
        assert response["ret"] == blob
    # ... or from the environment, as `casa-node run` gives it to scripts.
    monkeypatch.setenv("CASA_NODE_CONNECTION_FILE", tls_cluster.connection_file)
    monkeypatch.setenv("CASA_NODE_ENDPOINT", tls_cluster.endpoint)
    with casanode.connect() as client:
        assert client.submit("2+2").result(60)["ret"] == 4


def test_a_wrong_token_raises_a_clear_error_and_is_logged(tls_cluster):
    wrong = _copy(tls_cluster, "wrong.json", token="0" * 64)
    with pytest.raises(casanode.Refused, match="wrong token"):
        casanode.connect(connection_file=wrong)
    line = _logged(tls_cluster, "front door: refused 127.0.0.1:", "wrong token")
    assert "0" * 64 not in line
    _still_serving(tls_cluster)


def test_a_connection_file_others_can_read_is_refused(tls_cluster):
    open_file = _copy(tls_cluster, "open.json", mode=0o644)
    with pytest.raises(casanode.CasaNodeError, match="mode 644") as raised:
        casanode.connect(connection_file=open_file)
    assert open_file in str(raised.value)
    _still_serving(tls_cluster)


def test_tcp_without_a_connection_file_is_a_clear_error(tls_cluster, monkeypatch):
    monkeypatch.delenv("CASA_NODE_CONNECTION_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", os.path.join(tls_cluster.directory, "elsewhere"))
    with pytest.raises(casanode.CasaNodeError, match="needs its connection file"):
        casanode.connect(tls_cluster.endpoint)


def test_run_hands_the_script_the_connection_file(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import os, casanode\n"
        "print(os.environ['CASA_NODE_ENDPOINT'])\n"
        "print(os.environ['CASA_NODE_CONNECTION_FILE'])\n"
        "with casanode.connect() as c:\n"
        "    print(c.submit('20+22').result(60)['ret'])\n"
    )
    connection_file = tmp_path / "conf" / "cluster.json"
    done = clusters.run(
        script, servers=1, directory=tmp_path,
        options=["--endpoint", "tcp://127.0.0.1:0", "--connection-file", str(connection_file)],
    )
    assert done.returncode == 0, done.stderr
    endpoint, path, ret = done.stdout.split()
    assert endpoint.startswith("tcp://127.0.0.1:")
    assert path == str(connection_file)
    assert ret == "42"
    shutil.rmtree(tmp_path / "conf")
