"""The real-CASA tests: CASA's own tasks on a Multi-MS, run in parallel
through `casa-node run --casa` (ParallelTaskHelper and tclean dispatching
to casa-node's casampi face), compared with the same tasks run serially on
the plain MS.

tests/casa/run.sh runs them: it makes the CASA environment (env.sh), the
data (prepare_data.py, into $CASA_NODE_CASA_DATA) and runs this directory's
tests under the environment's Python. pytest here has no casampi face on
its path (and the real casampi, installed in the environment, stays serial
outside an MPI job), so what CASA runs in this process, or in a plain
subprocess of this Python, runs serially.

The transports come from $CASA_NODE_TEST_TRANSPORTS (comma-separated: zmq,
mpi; default zmq)."""

import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPTS = HERE / "scripts"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")

# The one launcher of the Python tests (its directory only: the casampi face
# next to it stays off this Python's path).
sys.path.insert(0, str(REPO / "python" / "tests"))
import clusters  # noqa: E402

# CASA reads ~/.casa/config.py when casatools is first imported: the private
# HOME env.sh made (casadata's data, no downloads), for this process and
# every one it starts.
os.environ["HOME"] = os.environ.get("CASA_NODE_CASA_HOME") or str(TARGET / "casa-home")
if not (pathlib.Path(os.environ["HOME"]) / ".casa" / "config.py").is_file():
    raise pytest.UsageError(f"{os.environ['HOME']}/.casa/config.py is missing: run tests/casa/env.sh")

# The binary with --casa (debug: it has the MPI transport).
BINARY = clusters.BINARY
TRANSPORTS = [t for t in os.environ.get("CASA_NODE_TEST_TRANSPORTS", "zmq").split(",") if t]
SERVERS = 2
RUN_TIMEOUT = 300  # seconds a whole `casa-node run` may take before it is stopped

# The sub-MSs of prepare_data.py's ngc5921.mms.
SUB_MSS = 4

# casampi's client logs each command it sends as "Command request with id#
# N sent to server n# R"; casa-node's face logs the same to its unified log.
SENT = re.compile(r"Command request with id#? ?(\d+) sent to server n# ?(\d+)")
# C++ CASA names the MPI server in the origin column of every log line.
SERVER_ORIGIN = re.compile(r"MPIServer-(\d+)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "background(name): the test's `casa-node run` starts in the background as soon as the "
        "tests are collected (see pytest_collection_finish), and the test runs last")


# Background runs: tests marked `background` spend most of their time
# waiting (casampi's own tests sleep and wait for timeouts), so their
# `casa-node run` starts when collection ends and goes on while the other
# tests run; the test itself, put last, collects it. {(name, transport):
# Started}, and the directories to remove at the end.
BACKGROUND = {}
BACKGROUND_DIRS = []


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:
        marker = item.get_closest_marker("background")
        if marker is None:
            continue
        transport = item.callspec.params["transport"]
        start = marker.kwargs["start"]
        directory = pathlib.Path(tempfile.mkdtemp(prefix=f"casa-bg-{transport}-",
                                                  dir=os.environ.get("CASA_NODE_CASA_DATA")))
        BACKGROUND_DIRS.append(directory)
        try:
            BACKGROUND[(marker.args[0], transport)] = start(directory, transport)
        except (Exception, pytest.fail.Exception) as failure:
            # Reported by the test.
            BACKGROUND[(marker.args[0], transport)] = failure


def pytest_sessionfinish(session):
    for started in BACKGROUND.values():
        if isinstance(started, Started):
            started.stop()
    for directory in BACKGROUND_DIRS:
        shutil.rmtree(directory, ignore_errors=True)


def background_run(name, transport, **finish):
    """The Run of the background run `name` over `transport`, finished."""
    started = BACKGROUND.get((name, transport))
    if started is None:
        pytest.fail(f"the background run {name} over {transport} was not started")
    if not isinstance(started, Started):
        pytest.fail(f"the background run {name} over {transport} could not start: {started}")
    return started.finish(**finish)


@pytest.fixture(scope="session", params=TRANSPORTS)
def transport(request):
    """The transport a parallel run goes over: each in
    $CASA_NODE_TEST_TRANSPORTS."""
    return request.param


@pytest.fixture(scope="session")
def casa_data(tmp_path_factory):
    """The directory with ngc5921.ms, ngc5921.mms and ngc5921.G: run.sh's
    ($CASA_NODE_CASA_DATA), or made here for a run of pytest alone."""
    given = os.environ.get("CASA_NODE_CASA_DATA")
    if given:
        return pathlib.Path(given)
    directory = tmp_path_factory.mktemp("casa-data")
    subprocess.run([sys.executable, str(HERE / "prepare_data.py"), str(directory)],
                   cwd=directory, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
    return directory


def copy_data(casa_data, directory, *names):
    """Fresh copies of prepared data sets: the tasks change them."""
    for name in names:
        shutil.copytree(casa_data / name, directory / name, symlinks=True)


class Run:
    """A finished `casa-node run --casa`: the process, its directory (the
    working directory of the driver and of the workers, with casa-node.log)
    and the driver's pickled result."""

    def __init__(self, proc, directory, result):
        self.proc = proc
        self.directory = directory
        self.result = result

    def node_log(self):
        path = self.directory / "casa-node.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def casa_log(self):
        path = pathlib.Path(self.result["casa_log"])
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self):
        casa_logs = sorted(self.directory.glob("casa-*.log"))
        casa_log = casa_logs[-1].read_text(errors="replace")[-3000:] if casa_logs else ""
        return (f"exit {self.proc.returncode}\n--- stdout\n{self.proc.stdout[-4000:]}"
                f"\n--- stderr\n{self.proc.stderr[-6000:]}\n--- casa-node.log (end)\n"
                f"{self.node_log()[-4000:]}\n--- CASA log (end)\n{casa_log}")


class Started:
    """A `casa-node run --casa` under way (start_casa_node_run); finish()
    waits for it, or stops it."""

    def __init__(self, proc, argv, directory, runtime, out, script):
        self.proc = proc
        self.argv = argv
        self.directory = directory
        self.runtime = runtime
        self.out = out
        self.script = script

    def stop(self):
        """Stops the run if it is still going (by its PID and its process
        group) and removes its runtime directory."""
        try:
            clusters.stop_group(self.proc)
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    def finish(self, timeout=RUN_TIMEOUT, check=True):
        """Waits for the run (stopping it after `timeout` seconds) and
        returns a Run. With `check`, the run must exit 0 and write its
        pickle."""
        try:
            exited = clusters.exited(self.proc, timeout)
        finally:
            # A clean exit leaves nothing of its process group; a failed or
            # timed out one might.
            self.stop()
        stdout, stderr = (
            (self.directory / name).read_text(errors="replace") for name in ("stdout.txt", "stderr.txt"))
        completed = subprocess.CompletedProcess(self.argv, self.proc.returncode, stdout, stderr)
        loaded = None
        if self.out is not None and self.out.exists():
            with open(self.out, "rb") as f:
                loaded = pickle.load(f)
        run = Run(completed, self.directory, loaded)
        if not exited:
            raise AssertionError(
                f"casa-node run --casa {self.script} took over {timeout} s, stopped: {run.describe()}")
        if not check:
            return run
        assert completed.returncode == 0, f"casa-node run --casa {self.script} failed: {run.describe()}"
        if self.out is not None:
            assert loaded is not None, f"{self.script} wrote no result: {run.describe()}"
        return run


def start_casa_node_run(script, args, directory, transport, *, servers=SERVERS, options=(),
                        result="result.pickle"):
    """Starts `casa-node run --casa SCRIPT ARGS OUT` in `directory` (a
    cluster of `servers` servers over `transport`, the workers on this
    Python; stdout.txt and stderr.txt there) and returns it Started; the
    script's last argument is the path of the pickle it writes (result None:
    the script writes none)."""
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: build casa-node (cargo build -p casa-node --features mpi)")
    directory = pathlib.Path(directory)
    # Short: the front door's socket and Open MPI's session live here, and
    # socket paths are limited to about 100 bytes.
    runtime = tempfile.mkdtemp(prefix="cn-casa-")
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
    for name in ("CASA_NODE_ENDPOINT", "CASA_NODE_CONNECTION_FILE"):
        env.pop(name, None)
    try:
        line = clusters.run_command(transport, servers, ["--casa", *options], env, runtime)
    except ValueError:
        shutil.rmtree(runtime)
        raise
    out = directory / result if result else None
    argv = [*line, str(SCRIPTS / script), *map(str, args), *([str(out)] if out else [])]
    try:
        with open(directory / "stdout.txt", "wb") as stdout, open(directory / "stderr.txt", "wb") as stderr:
            proc = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                    stdout=stdout, stderr=stderr, start_new_session=True)
    except BaseException:
        shutil.rmtree(runtime, ignore_errors=True)
        raise
    return Started(proc, argv, directory, runtime, out, script)


def casa_node_run(script, args, directory, transport, *, servers=SERVERS, options=(),
                  result="result.pickle", timeout=RUN_TIMEOUT, check=True):
    """start_casa_node_run(), then finish(): the finished Run."""
    started = start_casa_node_run(script, args, directory, transport, servers=servers,
                                  options=options, result=result)
    try:
        return started.finish(timeout=timeout, check=check)
    except BaseException:
        started.stop()
        raise


def serial_run(script, args, directory, result="result.pickle"):
    """Runs SCRIPT ARGS OUT under this Python, without casa-node: CASA
    serially. Returns the pickled result."""
    directory = pathlib.Path(directory)
    out = directory / result
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "CASA_NODE_"))}
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args), str(out)],
                          cwd=directory, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"serial {script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out, "rb") as f:
        loaded = pickle.load(f)
    assert not loaded["mpi_enabled"], "the serial run saw an MPI cluster"
    return loaded


class Serial:
    """Serial reference runs, each made once per session and shared by the
    transports."""

    def __init__(self, factory, casa_data):
        self.factory = factory
        self.casa_data = casa_data
        self.done = {}

    def __call__(self, key, script, data, args):
        """(directory, result) of SCRIPT run serially on fresh copies of the
        prepared `data` sets, with `args` (relative to that directory)."""
        if key not in self.done:
            directory = self.factory.mktemp(f"serial-{key}")
            copy_data(self.casa_data, directory, *data)
            self.done[key] = (directory, serial_run(script, args, directory))
        return self.done[key]


@pytest.fixture(scope="session")
def serial(tmp_path_factory, casa_data):
    return Serial(tmp_path_factory, casa_data)


def assert_ran_on_casa_node(run, commands, servers=SERVERS):
    """The parallel path really ran on casa-node: ParallelTaskHelper saw an
    MPI cluster with the driver as its client; casa-node's unified log shows
    at least `commands` commands sent to its servers (one per sub-MS and
    task call), to no server but 1..servers; and the one CASA log the driver
    and the workers share (CASA_NODE_CASA_LOG) has lines of the servers."""
    result = run.result
    assert result["mpi_enabled"] and result["mpi_client"], \
        f"ParallelTaskHelper did not see an MPI cluster: {result}"
    assert result["casa_node_casa_log"], "CASA_NODE_CASA_LOG was not set in the driver"
    assert os.path.samefile(result["casa_log"], result["casa_node_casa_log"]), \
        f"the driver's CASA log {result['casa_log']} is not CASA_NODE_CASA_LOG {result['casa_node_casa_log']}"
    sent = SENT.findall(run.node_log())
    assert len(sent) >= commands, \
        f"casa-node.log shows {len(sent)} commands sent to servers, expected at least {commands}: {run.describe()}"
    assert {int(server) for _, server in sent} <= set(range(1, servers + 1)), sent
    origins = {int(n) for n in SERVER_ORIGIN.findall(run.casa_log())}
    assert origins, f"the CASA log {result['casa_log']} has no line from an MPIServer"
    assert origins <= set(range(1, servers + 1)), origins


# Row order: a Multi-MS lists its sub-MSs' rows one sub-MS after another,
# the plain MS in time order. These keys name a row uniquely in NGC 5921
# (checked in read_sorted).
ROW_KEYS = ["TIME", "ANTENNA1", "ANTENNA2", "DATA_DESC_ID", "FIELD_ID", "SCAN_NUMBER"]


def read_sorted(vis, columns):
    """`columns` (and ROW_KEYS) of the MS or Multi-MS `vis`, rows sorted by
    ROW_KEYS, read with casatools.table."""
    import numpy as np
    from casatools import table

    tb = table()
    assert tb.open(str(vis)), f"cannot open {vis}"
    try:
        keys = [tb.getcol(k) for k in ROW_KEYS]
        order = np.lexsort(keys[::-1])
        values = {c: tb.getcol(c)[..., order] for c in [*ROW_KEYS, *columns]}
    finally:
        tb.close()
    stacked = np.stack([values[k] for k in ROW_KEYS])
    assert np.unique(stacked, axis=1).shape[1] == stacked.shape[1], f"{vis}: ROW_KEYS do not name rows uniquely"
    return values


# Data columns: the same computation on the same rows, in another process.
# They have come out bit for bit equal; the tolerance allows a few float32
# roundings: |parallel - serial| <= DATA_RTOL * max|serial| over the column.
DATA_RTOL = 1e-6


def assert_columns_match(serial_vis, parallel_vis, columns, rtol=DATA_RTOL):
    """The row keys and FLAG-like (boolean, integer) columns equal exactly,
    the others within rtol of the column's largest magnitude."""
    import numpy as np

    expected = read_sorted(serial_vis, columns)
    got = read_sorted(parallel_vis, columns)
    for key in ROW_KEYS:
        assert np.array_equal(expected[key], got[key]), \
            f"{parallel_vis} and {serial_vis} have other rows ({key} differs)"
    for column in columns:
        a, b = expected[column], got[column]
        assert a.shape == b.shape, f"{column}: shape {b.shape}, serial {a.shape}"
        if a.dtype.kind in "biu":
            differing = int(np.count_nonzero(a != b))
            assert differing == 0, f"{column}: {differing} values differ from the serial run's"
        else:
            scale = float(np.max(np.abs(a))) if a.size else 0.0
            worst = float(np.max(np.abs(a - b))) if a.size else 0.0
            assert worst <= rtol * scale, (
                f"{column}: max |parallel - serial| = {worst:.3g} exceeds the tolerance "
                f"{rtol:g} x max|serial| ({scale:.3g})")
