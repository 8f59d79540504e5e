"""`casa-node up --casa`: a cluster that outlives its drivers. It says
where drivers find casa-node's casampi (`python path: DIR`), and a driver
started by hand with that on its PYTHONPATH runs CASA on it; its workers
move to the driver's CASA log file when it starts services, as casampi's
servers log where their client does."""

import os
import select
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import BINARY, clusters

DRIVER = """
import os, casatasks
from casampi.MPICommandClient import MPICommandClient
import casampi
client = MPICommandClient()
client.start_services()
[response] = client.push_command_request("casalog.logfile()", True, [1])
print(casampi.__file__)
print(casatasks.casalog.logfile())
print(response["ret"])
"""


def test_a_driver_of_up_moves_the_workers_to_its_casa_log(tmp_path):
    runtime = tempfile.mkdtemp(prefix="cn-up-")
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
    for name in ("CASA_NODE_ENDPOINT", "CASA_NODE_CONNECTION_FILE"):
        env.pop(name, None)
    # Unbuffered: select() then sees every line that is not read yet (a
    # buffered reader would hold the later lines of one write).
    up = subprocess.Popen(
        [str(BINARY), "up", "--casa", "--servers", "1", "--python", sys.executable],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, bufsize=0, start_new_session=True)
    try:
        lines = {}
        while "python path" not in lines:
            ready, _, _ = select.select([up.stdout], [], [], 120)
            line = up.stdout.readline().decode() if ready else ""
            if not line:
                pytest.fail(f"casa-node up --casa said {lines} and then nothing")
            key, _, value = line.partition(": ")
            lines[key] = value.strip()
        # Started by hand, in a directory of its own: CASA names its log
        # there, not where up's workers started theirs.
        driver_dir = tmp_path / "driver"
        driver_dir.mkdir()
        driver_env = dict(env, PYTHONPATH=lines["python path"],
                          CASA_NODE_ENDPOINT=lines["front door"])
        done = subprocess.run([sys.executable, "-c", DRIVER], cwd=driver_dir, env=driver_env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        face, driver_log, worker_log = done.stdout.strip().splitlines()[-3:]
        assert face.startswith(lines["python path"]), face
        assert os.path.dirname(driver_log) == str(driver_dir), driver_log
        assert worker_log == driver_log
        up_logs = [p.name for p in tmp_path.glob("casa-*.log")]
        assert up_logs, "up's workers wrote no CASA log before the driver came"
    finally:
        clusters.stop_group(up)
        up.stdout.close()
        shutil.rmtree(runtime, ignore_errors=True)
