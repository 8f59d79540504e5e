"""casa-node against its peers (issue 6), in one run: every figure for
casa-node and for the peer it is measured against, interleaved by
repetition (which of the two goes first alternates from one repetition to
the next), each the median of the repetitions after a warm-up, with min and
max. Prints one Markdown table: figure, casa-node, peer, ratio, goal, met.

    compare.py [--quick] [--reps N] [--only L,T,...]

Group C (CASA's flagdata on a Multi-MS, casa-node against casampi) is in
the full run; --quick leaves it out unless --only names it.

Run it through bench/compare.sh, which builds casa-node (with MPI) and the
Rust round-trip client in release mode and makes the virtual environment
with the peers. Exits non-zero when a measurement fails, never because a
goal is missed: speed is reported, not asserted.
"""

import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time

import casa_group
import harness
from harness import PEERS, PYTHON, Cluster, Failed

CASA_SIDE = harness.HERE / "casa_side.py"

FULL = dict(
    warmup_reps=1, reps=5,
    requests=2000, request_warmup=200,          # L1, L2, L3
    tasks=20000, task_warmup=200,               # T1, T2
    mibs=(1, 64, 256),                          # B1
    bcast_mib=64, bcast_servers=8,              # B2
    heartbeat=1.0, timeout=5.0, sleep=1,        # F1
    start_servers=4, start_pythons=5,           # S1
    memory_servers=64, memory_reps=3,           # M1 (no warm-up: a state, not a speed)
    casa_subms=4, clip_min=0.0, clip_max=70.0,  # C1, C2, C3
    casa_timeout=600,
)
QUICK = dict(
    warmup_reps=0, reps=2,
    requests=200, request_warmup=20,
    tasks=500, task_warmup=50,
    mibs=(1, 8),
    bcast_mib=4, bcast_servers=8,
    heartbeat=0.2, timeout=1.0, sleep=1,
    start_servers=4, start_pythons=5,
    memory_servers=4, memory_reps=1,
    casa_subms=4, clip_min=0.0, clip_max=70.0,
    casa_timeout=300,
)

GROUPS = ("L", "Z", "T", "B", "F", "S", "M", "C")
# What --quick runs without --only: group C needs CASA (a venv of about a
# GiB, made once) and a casampi job takes about 30 s, mostly its own exit.
QUICK_GROUPS = ("L", "Z", "T", "B", "F", "S", "M")


# ------------------------------------------------------------------ figures


class Figure:
    """A row of the table. `better` is "lower" (times, memory) or "higher"
    (rates); `goal` is the ratio (or, without a peer, the absolute value in
    `unit`) the figure should reach, None for a comparison without a goal."""

    def __init__(self, key, name, unit, better, goal, goal_text, peer_name=None):
        self.key, self.name, self.unit, self.better = key, name, unit, better
        self.goal, self.goal_text, self.peer_name = goal, goal_text, peer_name
        self.casa, self.peer = [], []   # one value per measured repetition
        self.bound = None               # F1: the peer column is a bound
        self.errors = []
        self.notes = {}                 # name -> [values], reported under the table

    def note(self, name, value):
        self.notes.setdefault(name, []).append(value)


def make_figures(s):
    h, t = s["heartbeat"], s["timeout"]
    figures = [
        Figure("L1", "L1 latency, Python (µs)", "µs", "lower", 3, "≤ 3×",
               "mpi4py send/recv of dicts, eval"),
        Figure("L2", "L2 latency, Rust (µs)", "µs", "lower", 2, "≤ 2×",
               "the same mpi4py floor"),
        Figure("L3", "L3 latency, ZeroMQ (µs)", "µs", "lower", 1.5, "≤ 1.5×",
               "pyzmq DEALER/ROUTER over ipc, eval"),
    ]
    for key, transport in (("", "MPI"), ("z", "ZeroMQ")):
        for face, face_key in (("seed face", ""), ("Client.map", "m")):
            what = f"{s['tasks']} tasks, {face}, {transport}"
            figures += [
                Figure(f"T1{face_key}{key}", f"T1 throughput (tasks/s, {what})", "tasks/s", "higher", 4,
                       "≥ 4×", "MPIPoolExecutor, 2 workers"),
                Figure(f"T2{face_key}{key}", f"T2 throughput (tasks/s, {what})", "tasks/s", "higher", 20,
                       "≥ 20×", "Dask LocalCluster, 2 processes"),
            ]
    for mib in s["mibs"]:
        figures.append(Figure(f"B1-{mib}", f"B1 bandwidth, MPI (MiB/s, {mib} MiB there and back)", "MiB/s",
                              "higher", 0.5, "≥ 0.5×", "mpi4py Send/Recv"))
    figures += [
        Figure("B2", f"B2 broadcast of {s['bcast_mib']} MiB to {s['bcast_servers']} servers, MPI (s)", "s",
               "lower", None, "—", f"mpi4py Bcast, {s['bcast_servers'] + 1} ranks"),
        Figure("F1", f"F1 failure detection (s; heartbeat {h:g} s, timeout {t:g} s)", "s", "lower", 1,
               f"≤ {t + h:g} s (timeout + 1 heartbeat)", "the bound"),
        Figure("S1", f"S1 start-up, `run --servers {s['start_servers']}` of an empty script (s)", "s",
               "lower", 2, "≤ 2×", f"{s['start_pythons']} × `python3 -c pass`"),
        Figure("S1w", "S1 until every worker answered `1` (context; s)", "s",
               "lower", 2, "≤ 2×", f"{s['start_pythons']} × `python3 -c pass`"),
        Figure("M1s", "M1 RSS of an idle server node, without its worker (MiB)", "MiB", "lower", 10,
               "≤ 10 MiB"),
        Figure("M1c", f"M1 RSS of the head node with {s['memory_servers']} servers (MiB)", "MiB",
               "lower", 30, "≤ 30 MiB"),
    ]
    # Group J: T1's seed face with the head node's journal, against the
    # same without one, in the same run.
    for key, transport in (("", "MPI"), ("z", "ZeroMQ")):
        figures.append(Figure(f"J1{key}", f"J1 T1 with --journal (tasks/s, {s['tasks']} tasks, seed face, "
                              f"{transport})", "tasks/s", "higher", 0.9, "≥ 0.9×",
                              "casa-node without a journal"))
    # Group D: T1's seed face with a dashboard page open (its live updates
    # read as a browser reads them), against the same with the dashboard
    # off, in the same run.
    for key, transport in (("", "MPI"), ("z", "ZeroMQ")):
        figures.append(Figure(f"D1{key}", f"D1 T1 with a dashboard page open (tasks/s, {s['tasks']} tasks, "
                              f"seed face, {transport})", "tasks/s", "higher", 0.95, "≥ 0.95×",
                              "casa-node with --dashboard off"))
    # Group C: one task call each, timed inside the driver script.
    for n, (task, what) in enumerate((("summary", "mode='summary'"),
                                      ("clip", f"mode='clip', clipminmax=[{s['clip_min']:g}, {s['clip_max']:g}]"),
                                      ("unflag", "mode='unflag'")), 1):
        figures.append(Figure(f"C{n}", f"C{n} flagdata {what} of an MMS, 2 servers, MPI (s)", "s",
                              "lower", None, "—", "casampi 0.6.0, `mpirun -n 3`"))
        figures.append(Figure(f"C{n}z", f"C{n} over ZeroMQ (s)", "s",
                              "lower", None, "—", "casampi 0.6.0, `mpirun -n 3`"))
    figures = {f.key: f for f in figures}
    figures["F1"].bound = t + h
    return figures


# ------------------------------------------------------------------ casa-node side


def casa_side(cluster, *args, timeout=900):
    """Runs casa_side.py against `cluster` and returns its result, with the
    CPU seconds each part of the cluster and the driver used during the
    timed part (`cpu`, by role) and that part's wall time (`wall`): the
    driver prints `ready` before it and its result after it, and waits
    each time until told to go on."""
    env = dict(os.environ, CASA_NODE_ENDPOINT=cluster.endpoint)
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([PYTHON, str(CASA_SIDE), *map(str, args)], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        end = time.monotonic() + timeout
        before = began = result = None
        lines = []
        try:
            while result is None:
                ready, _, _ = select.select([proc.stdout], [], [], max(0, end - time.monotonic()))
                line = proc.stdout.readline() if ready else None
                if not line:
                    break
                lines.append(line)
                if line.strip() == "ready":
                    before = harness.cpu_snapshot(cluster.pid, extra=[proc.pid])
                    began = time.perf_counter()
                elif line.startswith("{"):
                    wall = time.perf_counter() - (began or 0)
                    after = harness.cpu_snapshot(cluster.pid, extra=[proc.pid])
                    result = json.loads(line)
                    if before is not None:
                        result["cpu"] = harness.cpu_seconds(before, after)
                        result["wall"] = wall
                else:
                    continue
                proc.stdin.write("\n")
                proc.stdin.flush()
            proc.stdin.close()
            proc.wait(max(1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                harness.stop_tree(proc)
            proc.stdout.close()
        stderr.seek(0)
        err = stderr.read()
    if result is None or proc.returncode != 0:
        raise Failed(f"casa_side.py {' '.join(map(str, args))} failed (exit {proc.returncode})\n"
                     f"stdout:\n{''.join(lines)}\nstderr:\n{err}\nthe cluster's log:\n{cluster.log_tail()}")
    return result


def measure_latency_mpi(s, figures, record):
    """L1 and L2 on one MPI cluster of one server: the Rust client first,
    then the Python driver (whose exit stops services, as the seed's does)."""
    with Cluster("mpi", 1) as cluster:
        cluster.wait_online()
        rust = harness.run_json([harness.ROUNDTRIP_CLIENT, cluster.endpoint,
                                 "--requests", s["requests"], "--warmup", s["request_warmup"]],
                                name="roundtrip-client")
        python = casa_side(cluster, "latency", s["requests"], s["request_warmup"])
    if record:
        figures["L2"].casa.append(rust["median_us"])
        figures["L2"].note("casa-node p99 µs", rust["p99_us"])
        figures["L1"].casa.append(python["median_us"])
        figures["L1"].note("casa-node p99 µs", python["p99_us"])


def peer_latency_mpi(s, figures, record):
    r = harness.mpi_json(2, [PYTHON, PEERS / "mpi_pingpong.py", "latency", s["requests"], s["request_warmup"]])
    if record:
        for key in ("L1", "L2"):
            figures[key].peer.append(r["median_us"])
        figures["L1"].note("peer p99 µs", r["p99_us"])


def measure_latency_zmq(s, figures, record):
    with Cluster("zmq", 1) as cluster:
        cluster.wait_online()
        python = casa_side(cluster, "latency", s["requests"], s["request_warmup"])
    if record:
        figures["L3"].casa.append(python["median_us"])
        figures["L3"].note("casa-node p99 µs", python["p99_us"])


def peer_latency_zmq(s, figures, record):
    r = harness.python_json(PEERS / "zmq_pingpong.py", s["requests"], s["request_warmup"])
    if record:
        figures["L3"].peer.append(r["median_us"])
        figures["L3"].note("peer p99 µs", r["p99_us"])


def measure_throughput(s, figures, record):
    """T1 and T2, casa-node's side: on one cluster per transport, the
    modern face's Client.map first, then the seed face (whose driver stops
    services when it exits)."""
    for transport, suffix in (("mpi", ""), ("zmq", "z")):
        with Cluster(transport, 2) as cluster:
            cluster.wait_online()
            runs = (("m", casa_side(cluster, "map", s["tasks"], s["task_warmup"])),
                    ("", casa_side(cluster, "throughput", s["tasks"], s["task_warmup"])))
        if not record:
            continue
        for face, r in runs:
            for key in (f"T1{face}{suffix}", f"T2{face}{suffix}"):
                figures[key].casa.append(r["tasks_per_s"])
            f = figures[f"T1{face}{suffix}"]
            f.note("casa-node: seconds pushing (of the total)", r["push_s"])
            f.note("casa-node: seconds in all", r["total_s"])
            f.note("casa-node: share of server 1", r["per_server"].get("1", 0) / s["tasks"])
            for role, seconds in r["cpu"].items():
                f.note(f"casa-node cores busy, {role}", seconds / r["wall"])


def journal_throughput(s, figures, record, journal):
    """T1's seed face on one cluster per transport, with a journal in the
    cluster's directory or without one: J1's figure or its baseline."""
    for transport, key in (("mpi", "J1"), ("zmq", "J1z")):
        with tempfile.TemporaryDirectory(prefix="casacmp-journal-") as directory:
            options = ["--journal", os.path.join(directory, "journal")] if journal else []
            with Cluster(transport, 2, options) as cluster:
                cluster.wait_online()
                r = casa_side(cluster, "throughput", s["tasks"], s["task_warmup"])
            if not record:
                continue
            if journal:
                figures[key].casa.append(r["tasks_per_s"])
                figures[key].note("journal bytes after the run", os.path.getsize(
                    os.path.join(directory, "journal")))
            else:
                figures[key].peer.append(r["tasks_per_s"])


def measure_journal(s, figures, record):
    journal_throughput(s, figures, record, True)


def peer_no_journal(s, figures, record):
    journal_throughput(s, figures, record, False)


def dashboard_throughput(s, figures, record, page_open):
    """T1's seed face on one cluster per transport, with a dashboard page
    open or the dashboard off: D1's figure or its baseline."""
    for transport, key in (("mpi", "D1"), ("zmq", "D1z")):
        options = [] if page_open else ["--dashboard", "off"]
        with Cluster(transport, 2, options) as cluster:
            cluster.wait_online()
            page = harness.DashboardPage(cluster.dashboard()) if page_open else None
            try:
                r = casa_side(cluster, "throughput", s["tasks"], s["task_warmup"])
            finally:
                received = page.close() if page else 0
        if not record:
            continue
        if page_open:
            figures[key].casa.append(r["tasks_per_s"])
            figures[key].note("page: bytes of live updates received", received)
        else:
            figures[key].peer.append(r["tasks_per_s"])


def measure_dashboard(s, figures, record):
    dashboard_throughput(s, figures, record, True)


def peer_no_dashboard(s, figures, record):
    dashboard_throughput(s, figures, record, False)


def t_keys(figure):
    """The keys of the T figures whose peer is `figure` ("T1" or "T2")."""
    return [f"{figure}{face}{suffix}" for face in ("", "m") for suffix in ("", "z")]


def peer_pool(s, figures, record):
    r = harness.mpi_json(3, [PYTHON, "-m", "mpi4py.futures", PEERS / "mpi_pool.py",
                             s["tasks"], s["task_warmup"]])
    if record:
        for key in t_keys("T1"):
            figures[key].peer.append(r["tasks_per_s"])
        figures["T1"].note("peer: seconds submitting (of the total)", r["push_s"])


def peer_dask(s, figures, record):
    r = harness.python_json(PEERS / "dask_map.py", s["tasks"], s["task_warmup"], timeout=1800)
    if record:
        for key in t_keys("T2"):
            figures[key].peer.append(r["tasks_per_s"])
        figures["T2"].note("peer: seconds submitting (of the total)", r["push_s"])


def measure_bandwidth(s, figures, record):
    results = []
    for mib in s["mibs"]:
        # One cluster each: the seed face's driver stops services as it exits.
        with Cluster("mpi", 1) as cluster:
            cluster.wait_online()
            results.append((mib, casa_side(cluster, "bandwidth", mib)))
    if record:
        for mib, r in results:
            f = figures[f"B1-{mib}"]
            f.casa.append(r["mib_per_s"])
            f.note("casa-node: seconds there and back", r["seconds"])
            for role, seconds in r["cpu"].items():
                f.note(f"casa-node CPU seconds, {role}", seconds)


def peer_bandwidth(s, figures, record):
    for mib in s["mibs"]:
        r = harness.mpi_json(2, [PYTHON, PEERS / "mpi_pingpong.py", "bandwidth", mib])
        if record:
            figures[f"B1-{mib}"].peer.append(r["mib_per_s"])
            figures[f"B1-{mib}"].note("peer: seconds there and back", r["seconds"])


def measure_broadcast(s, figures, record):
    with Cluster("mpi", s["bcast_servers"]) as cluster:
        cluster.wait_online()
        r = casa_side(cluster, "broadcast", s["bcast_mib"], s["bcast_servers"])
    if record:
        figures["B2"].casa.append(r["seconds"])
        for role, seconds in r["cpu"].items():
            figures["B2"].note(f"casa-node CPU seconds, {role}", seconds)


def peer_broadcast(s, figures, record):
    r = harness.mpi_json(s["bcast_servers"] + 1, [PYTHON, PEERS / "mpi_pingpong.py", "broadcast",
                                                   s["bcast_mib"]])
    if record:
        figures["B2"].peer.append(r["seconds"])


def measure_failure(s, figures, record):
    options = ["--heartbeat", f"{s['heartbeat']:g}", "--timeout", f"{s['timeout']:g}"]
    with Cluster("zmq", 1, options) as cluster:
        cluster.wait_online()
        r = casa_side(cluster, "failure", s["sleep"])
    if record:
        figures["F1"].casa.append(r["seconds"])


# S1's scripts: an empty one, and one that waits until every server's
# worker has run a command (an empty script ends before the workers are up).
SCRIPTS = {"S1": "", "S1w": "import casanode\nc = casanode.connect()\nc.wait(c.broadcast('1'))\n"}


def measure_start(s, figures, record):
    for key, text in SCRIPTS.items():
        with tempfile.TemporaryDirectory(prefix="casacmp-") as directory:
            script = os.path.join(directory, "script.py")
            with open(script, "w") as f:
                f.write(text)
            env = dict(os.environ, XDG_RUNTIME_DIR=directory)
            env.pop("CASA_NODE_ENDPOINT", None)
            argv = [str(harness.CASA_NODE), "run", "--servers", str(s["start_servers"]),
                    "--python", PYTHON, "--log-file", os.path.join(directory, "log"), script]
            began = time.perf_counter()
            proc = subprocess.run(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=300)
            wall = time.perf_counter() - began
            if proc.returncode != 0:
                raise Failed(f"casa-node run of {key}'s script failed (exit {proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
        if record:
            figures[key].casa.append(wall)


def peer_start(s, figures, record):
    began = time.perf_counter()
    for _ in range(s["start_pythons"]):
        subprocess.run([PYTHON, "-c", "pass"], check=True, stdin=subprocess.DEVNULL, timeout=60)
    wall = time.perf_counter() - began
    if record:
        figures["S1"].peer.append(wall)
        figures["S1w"].peer.append(wall)


def measure_memory(s, figures, record):
    began = time.perf_counter()
    with Cluster("zmq", s["memory_servers"]) as cluster:
        table = cluster.wait_online(workers=True)
        online = time.perf_counter() - began
        time.sleep(2)  # idle
        servers = []
        for rank, server in sorted(table.items()):
            comm = harness._read(f"/proc/{server['pid']}/comm").strip()
            if comm != "casa-node":
                raise Failed(f"server {rank}'s pid {server['pid']} is {comm!r}, not a casa-node server node")
            servers.append(harness.rss_kib(server["pid"]) / 1024)
        client = harness.rss_kib(cluster.pid) / 1024
        workers = [harness.rss_kib(server["worker_pid"]) / 1024 for server in table.values()
                   if server["worker_pid"]]
    if record:
        figures["M1s"].casa.append(max(servers))
        figures["M1s"].note("median over the servers, MiB", statistics.median(servers))
        figures["M1s"].note("a worker (median, for context), MiB", statistics.median(workers))
        figures["M1c"].casa.append(client)
        figures["M1c"].note(f"seconds until all {s['memory_servers']} servers were online", online)


def measure_data(s, figures, record):
    measure_bandwidth(s, figures, record)
    measure_broadcast(s, figures, record)


def peer_data(s, figures, record):
    peer_bandwidth(s, figures, record)
    peer_broadcast(s, figures, record)


# Each group: (figures it fills, casa-node side, peer side or None).
PLAN = {
    "L": (("L1", "L2"), measure_latency_mpi, peer_latency_mpi),
    "Z": (("L3",), measure_latency_zmq, peer_latency_zmq),
    "T": ((*t_keys("T1"), *t_keys("T2")), measure_throughput, [peer_pool, peer_dask]),
    "B": ((*(f"B1-{mib}" for mib in set(FULL["mibs"]) | set(QUICK["mibs"])), "B2"),
          measure_data, peer_data),
    "J": (("J1", "J1z"), measure_journal, peer_no_journal),
    "D": (("D1", "D1z"), measure_dashboard, peer_no_dashboard),
    "F": (("F1",), measure_failure, None),
    "S": (("S1", "S1w"), measure_start, peer_start),
    "M": (("M1s", "M1c"), measure_memory, None),
    "C": (("C1", "C1z", "C2", "C2z", "C3", "C3z"), casa_group.measure_casa_tasks,
          [casa_group.peer_casampi, casa_group.serial_context]),
}


# ------------------------------------------------------------------ the table


def fmt(v):
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}".replace(",", " ")
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(values):
    if not values:
        return "—"
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]"


def verdict(f):
    """(casa cell, peer cell, ratio cell, met cell) of a figure."""
    if f.errors and not f.casa:
        return "error", cell(f.peer), "—", "error"
    casa = statistics.median(f.casa) if f.casa else None
    if f.bound is not None:
        # Every repetition must be within the bound.
        worst = max(f.casa)
        return (cell(f.casa), f"{f.bound:g} (bound)", f"{casa / f.bound:.2f}",
                "yes" if worst <= f.bound else f"no (max {fmt(worst)})")
    if f.peer_name is None:
        worst = max(f.casa)
        return cell(f.casa), "—", "—", "yes" if worst <= f.goal else "no"
    if not f.peer:
        return cell(f.casa), "error", "—", "error"
    ratio = casa / statistics.median(f.peer)
    if f.goal is None:
        return cell(f.casa), cell(f.peer), f"{ratio:.2f}×", "—"
    met = ratio <= f.goal if f.better == "lower" else ratio >= f.goal
    return cell(f.casa), cell(f.peer), f"{ratio:.2f}×", "yes" if met else "no"


def print_table(figures, settings, elapsed):
    print()
    print("| figure | casa-node | peer | ratio | goal | met? |")
    print("|---|--:|--:|--:|---|---|")
    for f in figures.values():
        casa, peer, ratio, met = verdict(f)
        peer_label = f"{peer} ({f.peer_name})" if f.peer_name and f.bound is None and peer != "—" else peer
        print(f"| {f.name} | {casa} | {peer_label} | {ratio} | {f.goal_text} | {met} |")
    print()
    print("Cells: median [min–max] over the measured repetitions; ratio = casa-node median / peer median.")
    notes = [(f, name, values) for f in figures.values() for name, values in f.notes.items()]
    if notes:
        print()
        print("Details (median [min–max] over the repetitions):")
        for f, name, values in notes:
            print(f"  {f.key:<4} {name}: {cell(values)}")
    print()
    print(f"{settings['reps']} measured repetition(s) after {settings['warmup_reps']} of warm-up "
          f"(M1: {settings['memory_reps']}); {elapsed:.0f} s in all; {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    if casa_group.ENV.versions:
        print(f"C: {casa_group.ENV.versions}; an MMS of {len(casa_group.ENV.subms)} sub-MSs "
              f"(NGC5921, partition numsubms={settings['casa_subms']})")


# ------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts, to check the harness (about 30 s); without group C")
    parser.add_argument("--reps", type=int, help="measured repetitions (default 5, quick 2)")
    parser.add_argument("--only", help=f"comma-separated groups of {','.join(GROUPS)} "
                        "(L: L1+L2, Z: L3, T: T1+T2, J: J1, D: D1, B: B1+B2, F: F1, S: S1, M: M1, "
                        "C: C1+C2+C3, CASA's flagdata on a Multi-MS against casampi)")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    if args.reps:
        settings["reps"] = args.reps
    if args.only:
        groups = [g.strip().upper() for g in args.only.split(",")]
    else:
        groups = QUICK_GROUPS if args.quick else GROUPS
    for g in groups:
        if g not in PLAN:
            parser.error(f"unknown group {g!r}")
    figures = make_figures(settings)
    wanted = {k for g in groups for k in PLAN[g][0]}
    figures = {k: f for k, f in figures.items() if k in wanted}
    started = time.perf_counter()
    try:
        return run(groups, settings, figures, started)
    finally:
        casa_group.cleanup()


def run(groups, settings, figures, started):
    failed = set()
    if "C" in groups:
        # The CASA venv (once) and the MMS (once per run), outside the timed sides.
        t0 = time.perf_counter()
        try:
            casa_group.setup(settings)
            print(f"compare: C: set up in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        except (Failed, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
            print(f"compare: C setup failed: {e}", file=sys.stderr, flush=True)
            for k in PLAN["C"][0]:
                figures[k].errors.append(str(e))
            failed.add("C")
    total = settings["warmup_reps"] + settings["reps"]
    for rep in range(total):
        record = rep >= settings["warmup_reps"]
        label = f"repetition {rep + 1 - settings['warmup_reps']}" if record else "warm-up"
        for g in groups:
            keys, casa, peers = PLAN[g]
            if g in failed:
                continue
            if g == "M" and (not record or rep - settings["warmup_reps"] >= settings["memory_reps"]):
                continue
            peers = peers if isinstance(peers, list) else [peers] if peers else []
            sides = [casa, *peers]
            if rep % 2:
                sides.reverse()  # the peer first in odd repetitions
            for side in sides:
                t0 = time.perf_counter()
                try:
                    side(settings, figures, record)
                except (Failed, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
                    print(f"compare: {g} {side.__name__} failed: {e}", file=sys.stderr, flush=True)
                    for k in keys:
                        if k in figures:
                            figures[k].errors.append(str(e))
                    failed.add(g)
                    break
                print(f"compare: {label}: {side.__name__} {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
    print_table(figures, settings, time.perf_counter() - started)
    errors = [(k, e) for k, f in figures.items() for e in f.errors]
    if errors:
        print(f"\ncompare: {len(errors)} measurement(s) failed:", file=sys.stderr)
        for k, e in errors:
            print(f"  {k}: {e.splitlines()[0] if e else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
