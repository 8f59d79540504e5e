"""What the comparison harness shares: the binaries, the MPI launcher with
Open MPI kept on this machine, casa-node clusters started as
python/tests/clusters.py starts them and stopped by PID, and child
processes run to a JSON line.

Every process started here is stopped by its PID (SIGTERM, then SIGKILL),
and so is any process found below it before it was stopped (by PID and
start time, so that a reused PID is never hit). Nothing is stopped by name.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"

# compare.sh builds them and says where; else cargo's release directory.
RELEASE = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "release"
# Absolute: clusters run in directories of their own.
CASA_NODE = Path(os.environ.get("CASA_NODE_BIN") or RELEASE / "casa-node").absolute()
ROUNDTRIP_CLIENT = Path(os.environ.get("ROUNDTRIP_CLIENT") or RELEASE / "roundtrip-client").absolute()

# The workers', the drivers' and the peers' interpreter: this venv's.
PYTHON = sys.executable

START_LIMIT = 180      # seconds for a cluster to print its front door
STOP_LIMIT = 20        # seconds between SIGTERM and SIGKILL


class Failed(Exception):
    """A measurement that could not be made."""


# ------------------------------------------------------------------ processes


def _stat(pid):
    """(state, start time) of `pid` from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[19]), int(fields[1])


def descendants(root):
    """[(pid, start time)] of every process below `root`."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = _stat(int(name))
            if s is not None:
                table[int(name)] = s
    found, parents = [], [root]
    while parents:
        parent = parents.pop()
        for pid, (_, started, ppid) in table.items():
            if ppid == parent:
                found.append((pid, started))
                parents.append(pid)
    return found


def alive(pid, started):
    s = _stat(pid)
    return s is not None and s[1] == started and s[0] != "Z"


def stop_tree(proc, below=()):
    """Stops `proc` by PID: SIGTERM, SIGKILL after STOP_LIMIT; then SIGKILL
    to whatever was below it (`below`, and what is below it now) that is
    still alive after a few seconds. Returns True when nothing had to be
    killed."""
    below = list(below)
    clean = True
    if proc.poll() is None:
        below += [p for p in descendants(proc.pid) if p not in below]
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(STOP_LIMIT)
        except subprocess.TimeoutExpired:
            print(f"compare: {proc.args[0]} (pid {proc.pid}) outlived SIGTERM: SIGKILL", file=sys.stderr)
            proc.kill()
            proc.wait()
            clean = False
    end = time.monotonic() + 5
    while True:
        below = [p for p in below if alive(*p)]
        if not below or time.monotonic() > end:
            break
        time.sleep(0.02)
    for pid, _ in below:
        print(f"compare: process {pid} was left behind: SIGKILL", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        clean = False
    return clean


def mpirun(ranks, session=None):
    """(argv, env) of `mpirun -n RANKS` kept on this machine, as
    tests/src/process.rs sets it up for Open MPI: shared memory between the
    ranks, loopback for the runtime, no binding, oversubscription allowed,
    --allow-run-as-root as root. With `session`, a directory of the
    caller's (which the caller removes), Open MPI keeps the job's session
    there rather than in the shared /tmp/ompi.HOST.UID, which two jobs
    starting at once can race on."""
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher is None:
        raise Failed("neither mpirun nor mpiexec is on PATH: install Open MPI (openmpi-bin)")
    env = dict(os.environ)
    argv = [launcher]
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True)
    if "Open MPI" in version.stdout + version.stderr or "OpenRTE" in version.stdout + version.stderr:
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        argv.append("--oversubscribe")
        env.update(
            OMPI_MCA_pml="ob1",
            OMPI_MCA_btl="self,vader",
            OMPI_MCA_btl_tcp_if_include="lo",
            OMPI_MCA_oob_tcp_if_include="lo",
            OMPI_MCA_hwloc_base_binding_policy="none",
        )
        if session is not None:
            env["OMPI_MCA_orte_tmpdir_base"] = str(session)
    argv += ["-n", str(ranks)]
    return argv, env


def run_json(argv, env=None, timeout=600, cwd=None, name=None):
    """Runs `argv` to its end and returns the JSON object of the last line
    of its stdout that holds one; Failed when it fails, says nothing, or
    runs over `timeout` (then it is stopped by PID)."""
    name = name or " ".join(map(str, argv[:4]))
    proc = subprocess.Popen(
        [str(a) for a in argv], env=env, cwd=cwd,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        out, err = proc.communicate()
        raise Failed(f"{name} ran over {timeout} s\nstdout:\n{out}\nstderr:\n{err}") from None
    except BaseException:
        stop_tree(proc)
        raise
    if proc.returncode != 0:
        raise Failed(f"{name} failed (exit {proc.returncode})\nstdout:\n{out}\nstderr:\n{err}")
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise Failed(f"{name} printed no result\nstdout:\n{out}\nstderr:\n{err}")


def python_json(script, *args, env=None, timeout=600):
    """run_json of one of this harness's Python scripts."""
    return run_json([PYTHON, str(script), *map(str, args)], env=env, timeout=timeout, name=Path(script).name)


def mpi_json(ranks, argv, timeout=600):
    """run_json of `argv` under `mpirun -n RANKS`."""
    launcher, env = mpirun(ranks)
    return run_json([*launcher, *map(str, argv)], env=env, timeout=timeout,
                    name=f"mpirun -n {ranks} {Path(str(argv[-1])).name}")


# ------------------------------------------------------------------ clusters


class DashboardPage:
    """A dashboard page open: its live updates (server-sent events) read
    on a thread as a browser reads them, until `close`, which returns the
    bytes received."""

    def __init__(self, url):
        import http.client
        import threading
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.connection.request("GET", f"/events?{parts.query}")
        self.answer = self.connection.getresponse()
        if self.answer.status != 200:
            raise Failed(f"the dashboard's events: HTTP {self.answer.status}")
        self.received = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        import http.client

        try:
            while chunk := self.answer.read1(65536):
                self.received += len(chunk)
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed by `close`

    def close(self):
        try:
            self.connection.sock.shutdown(2)
        except OSError:
            pass
        self.connection.close()
        self.thread.join(10)
        return self.received


class Cluster:
    """A running `casa-node up`: its process, private directory and front
    door. Use as a context manager: it is stopped by PID on the way out."""

    def __init__(self, transport="zmq", servers=1, options=()):
        if not CASA_NODE.is_file():
            raise Failed(f"{CASA_NODE} is missing: run bench/compare.sh, which builds it")
        self.transport = transport
        self.servers = servers
        self.directory = tempfile.mkdtemp(prefix="casacmp-")  # short: socket paths are limited
        self.endpoint = f"unix://{self.directory}/front.sock"
        env = dict(os.environ, XDG_RUNTIME_DIR=self.directory)
        env.pop("CASA_NODE_ENDPOINT", None)
        up = [
            "up", "--transport", transport,
            "--endpoint", self.endpoint,
            "--log-file", f"{self.directory}/log",
            "--python", PYTHON,
            *options,
        ]
        if transport == "zmq":
            argv = [str(CASA_NODE), *up, "--servers", str(servers)]
        elif transport == "mpi":
            launcher, mpi_env = mpirun(servers + 1)
            env.update({k: v for k, v in mpi_env.items() if k.startswith("OMPI_")})
            argv = [*launcher, str(CASA_NODE), *up]
        else:
            raise ValueError(f"unknown transport {transport!r}")
        self.below = []
        with open(os.path.join(self.directory, "stderr"), "wb") as stderr:
            self.proc = subprocess.Popen(
                argv, cwd=self.directory, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                bufsize=0,  # select() then sees every line `up` prints
            )
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], START_LIMIT)
            line = self.proc.stdout.readline().decode() if ready else ""
            if not line.startswith("front door: "):
                raise Failed(f"casa-node up ({transport}, {servers} servers) did not start: "
                             f"{line!r}\nstderr:\n{self.stderr()}\nlog:\n{self.log_tail()}")
            if line[len("front door: "):].strip() != self.endpoint:
                raise Failed(f"casa-node up opened {line.strip()!r}, not {self.endpoint}")
        except BaseException:
            self.stop()
            raise

    def dashboard(self):
        """The dashboard's URL, with its token, from the lines `up` prints
        once ready."""
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], START_LIMIT)
            line = self.proc.stdout.readline().decode() if ready else ""
            if not line:
                raise Failed(f"casa-node up printed no dashboard line\nstderr:\n{self.stderr()}")
            if line.startswith("dashboard: "):
                return line[len("dashboard: "):].strip()

    @property
    def pid(self):
        """The `casa-node up` process (under MPI: mpirun)."""
        return self.proc.pid

    def stderr(self):
        try:
            with open(os.path.join(self.directory, "stderr"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines=20):
        try:
            with open(os.path.join(self.directory, "log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def status(self):
        """The server table, {rank: dict}."""
        import casanode

        with casanode.connect(self.endpoint) as client:
            return client.status()

    def wait_online(self, workers=False, limit=START_LIMIT):
        """Waits until every server is online, and with `workers` until each
        has its Python worker started (the server table names the worker's
        PID, from the first ping after it started); returns the table.
        Commands sent before a worker is up wait for it, so the warm-ups
        of the measurements take care of that."""
        end = time.monotonic() + limit
        while True:
            table = self.status()
            if len(table) >= self.servers and all(s["online"] and (s["worker_pid"] or not workers)
                                                  for s in table.values()):
                self.remember_descendants()
                return table
            if time.monotonic() > end or self.proc.poll() is not None:
                ready = sum(bool(s["online"] and (s["worker_pid"] or not workers)) for s in table.values())
                raise Failed(f"{self.servers} servers were not online with their workers within "
                             f"{limit} s: {ready} were\nlog:\n{self.log_tail()}")
            time.sleep(0.1)

    def remember_descendants(self):
        for p in descendants(self.proc.pid):
            if p not in self.below:
                self.below.append(p)

    def stop(self):
        if self.proc.poll() is None:
            self.remember_descendants()
        clean = stop_tree(self.proc, self.below)
        self.proc.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        return clean

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def rss_kib(pid):
    """VmRSS of `pid` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise Failed(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------ CPU use

TICKS = os.sysconf("SC_CLK_TCK")


def _read(path, binary=False):
    try:
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    except OSError:
        return b"" if binary else ""


def _is_server_node(pid):
    """`casa-node server` (ZeroMQ), or a rank other than 0 of an MPI job."""
    if b"server" in _read(f"/proc/{pid}/cmdline", True).split(b"\0"):
        return True
    for var in _read(f"/proc/{pid}/environ", True).split(b"\0"):
        for name in (b"OMPI_COMM_WORLD_RANK=", b"PMI_RANK=", b"PMIX_RANK="):
            if var.startswith(name) and var[len(name):] != b"0":
                return True
    return False


def _role(pid, ppid):
    comm = _read(f"/proc/{pid}/comm").strip()
    if comm == "casa-node":
        return "server nodes" if _is_server_node(pid) else "head node"
    if comm.startswith("python"):
        # A server node's worker, or the head node's syntax checker.
        return "workers" if _is_server_node(ppid) else "checker"
    return comm or "?"


def cpu_snapshot(root, extra=()):
    """{(pid, start time): (role, CPU ticks)} of `root`, every process
    below it, and the `extra` processes (with their own role, "driver")."""
    out = {}
    own = _stat(root)
    tree = [(root, own[1] if own else 0), *descendants(root)]
    for pid in extra:
        s = _stat(pid)
        if s is not None:
            tree.append((pid, s[1]))
    for pid, started in tree:
        text = _read(f"/proc/{pid}/stat")
        if not text:
            continue
        fields = text[text.rfind(")") + 2:].split()
        role = "driver" if pid in extra else _role(pid, int(fields[1]))
        out[(pid, started)] = (role, int(fields[11]) + int(fields[12]))
    return out


def cpu_seconds(before, after):
    """CPU seconds per role between two snapshots."""
    roles = {}
    for key, (role, ticks) in after.items():
        used = ticks - before.get(key, (role, 0))[1]
        roles[role] = roles.get(role, 0.0) + used / TICKS
    return roles
