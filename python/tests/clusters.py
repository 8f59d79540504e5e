"""Real casa-node clusters for the tests: started as `casa-node up` (over
ZeroMQ, or over MPI under mpirun), waited for until the front door is
announced, and stopped by PID, also when a test fails.

The transports a parametrized test runs on come from
$CASA_NODE_TEST_TRANSPORTS (comma-separated, default "zmq")."""

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")

# run-tests.sh builds it and says where; else cargo's default place.
BINARY = Path(os.environ.get("CASA_NODE_BIN") or TARGET / "debug" / "casa-node")

TRANSPORTS = [t for t in os.environ.get("CASA_NODE_TEST_TRANSPORTS", "zmq").split(",") if t]


class Cluster:
    """A running `casa-node up`: its process, private directory and the
    front door's endpoint."""

    def __init__(self, proc, directory, transport, servers):
        self.proc = proc
        self.directory = directory
        self.transport = transport
        self.servers = servers
        self.endpoint = None

    def log(self):
        """The unified log so far."""
        try:
            with open(os.path.join(self.directory, "log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def dashboard(self, timeout=30):
        """The dashboard's URL (with its token), from the lines `up` prints
        once ready, after the front door's."""
        end = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0, end - time.monotonic()))
            if not ready:
                pytest.fail(f"no dashboard line within {timeout} s: {self.stderr()}")
            line = self.proc.stdout.readline().decode()
            if not line:
                pytest.fail(f"casa-node up printed no dashboard line: {self.stderr()}")
            if line.startswith("dashboard: "):
                return line[len("dashboard: "):].strip()

    def stderr(self):
        try:
            with open(os.path.join(self.directory, "stderr"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def require_binary():
    if not BINARY.exists():
        message = f"{BINARY} is missing: run `cargo build -p casa-node` first"
        if os.environ.get("CASA_NODE_REQUIRE_E2E"):
            pytest.fail(message)
        pytest.skip(message)


def mpirun():
    """mpirun and the flags every test job needs on this machine."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("the MPI transport was asked for, but mpirun is not installed")
    flags = ["--oversubscribe"]
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return [mpirun, *flags]


def mpi_environment(env, runtime=None):
    """Sets what an Open MPI job of the tests needs in `env`: loopback only;
    with `runtime`, also a session directory of its own there (jobs starting
    at once race on the shared one), shared memory between the ranks and no
    binding to cores."""
    env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
    env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
    if runtime is not None:
        env.update({
            "OMPI_MCA_orte_tmpdir_base": os.fspath(runtime),
            "OMPI_MCA_pml": "ob1",
            "OMPI_MCA_btl": "self,vader",
            "OMPI_MCA_hwloc_base_binding_policy": "none",
        })


def command(transport, servers, options, directory):
    """The command line that starts a cluster of `servers` servers."""
    up = [
        "up", "--transport", transport,
        "--endpoint", f"unix://{directory}/front.sock",
        "--log-file", f"{directory}/log",
        "--python", sys.executable,
        *options,
    ]
    if transport == "zmq":
        return [str(BINARY), *up, "--servers", str(servers)]
    if transport == "mpi":
        return [*mpirun(), "-n", str(servers + 1), str(BINARY), *up]
    raise ValueError(f"unknown transport {transport!r}")


def run_command(transport, servers, options, env, runtime=None):
    """The command line of `casa-node run` (the script and its arguments
    follow) on a cluster of `servers` servers over `transport`, the workers
    on this Python; sets what the job needs in `env`, its runtime directory
    `runtime` if given."""
    options = ["--python", sys.executable, *options]
    if transport == "zmq":
        return [str(BINARY), "run", "--transport", "zmq", "--servers", str(servers), *options]
    if transport == "mpi":
        mpi_environment(env, runtime)
        return [*mpirun(), "-n", str(servers + 1), str(BINARY), "run", "--transport", "mpi", *options]
    raise ValueError(f"unknown transport {transport!r}")


def _wait_unreaped(pid):
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped meanwhile, by stop_group
        pass


def exited(proc, timeout):
    """Waits up to `timeout` seconds for `proc` to exit without reaping it:
    while it is a zombie its PID, which is also its process group's id,
    cannot be given to another process."""
    if proc.returncode is not None:
        return True
    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
        return True
    if timeout <= 0:
        return False
    waiter = threading.Thread(target=_wait_unreaped, args=(proc.pid,), daemon=True)
    waiter.start()
    waiter.join(timeout)
    return not waiter.is_alive()


def stop_group(proc, grace=30):
    """Stops a process started in a session of its own
    (`start_new_session=True`): SIGTERM to its PID if it is still going,
    SIGKILL if it lingers past `grace` seconds, then SIGKILL to whatever is
    left of its process group (sent before it is reaped, so the group's id
    is still its own), and reaps it."""
    if proc.returncode is None:
        if not exited(proc, 0):
            proc.send_signal(signal.SIGTERM)
            if not exited(proc, grace):
                proc.kill()
                exited(proc, grace)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(script, *args, servers=2, transport="zmq", options=(), directory, timeout=180):
    """Runs `casa-node run SCRIPT ARGS` on a fresh cluster and returns the
    finished process (text output captured). `directory` holds the log and
    the runtime directory."""
    require_binary()
    directory = os.fspath(directory)
    env = dict(os.environ, XDG_RUNTIME_DIR=directory)
    env.pop("CASA_NODE_ENDPOINT", None)
    line = run_command(transport, servers, ["--log-file", os.path.join(directory, "log"), *options], env)
    proc = subprocess.Popen(
        [*line, os.fspath(script), *args], cwd=directory, env=env, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        # By PID and its process group: the run, whose cluster stops with it.
        stop_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start(servers=2, transport="zmq", options=(), directory=None):
    """Starts a cluster and returns it once its front door is open; in
    `directory` if given (its front door is `unix://DIRECTORY/front.sock`),
    else in a new one."""
    require_binary()
    if directory is None:
        directory = tempfile.mkdtemp(prefix="casanode-")  # short: socket paths are limited
    env = dict(os.environ, XDG_RUNTIME_DIR=directory)  # keep the user's endpoint record alone
    env.pop("CASA_NODE_ENDPOINT", None)
    if transport == "mpi":
        mpi_environment(env)
    with open(os.path.join(directory, "stderr"), "wb") as stderr:
        proc = subprocess.Popen(
            command(transport, servers, list(options), directory),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env,
            # Unbuffered: select() then sees every line `up` prints.
            bufsize=0,
        )
    cluster = Cluster(proc, directory, transport, servers)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline().decode() if ready else ""
    except BaseException:
        stop(cluster)
        raise
    if not line.startswith("front door: "):
        stop(cluster, remove=False)
        message = f"casa-node up did not start: {line!r} {cluster.stderr()}"
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(message)
    cluster.endpoint = line[len("front door: "):].strip()
    return cluster


def stop(cluster, remove=True):
    """Stops the cluster by its PID: SIGTERM, then SIGKILL if it lingers."""
    proc = cluster.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    proc.stdout.close()
    if remove:
        shutil.rmtree(cluster.directory, ignore_errors=True)


def gone(pid, limit=15):
    """Whether process `pid` has ended (or is a zombie) within `limit`
    seconds."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def started(request, servers=2, transport="zmq", options=()):
    """start(), with the stop registered on the test's `request` at once."""
    cluster = start(servers, transport, options)
    request.addfinalizer(lambda: stop(cluster))
    return cluster


@contextlib.contextmanager
def seed_session(endpoint):
    """The seed's MPICommandClient, services started, on the cluster at
    `endpoint`; the shared connection is closed and forgotten afterwards."""
    from casanode import MPICommandClient, seed

    seed._reset(endpoint)
    try:
        client = MPICommandClient()
        client.start_services()
        yield client
    finally:
        seed._reset()
