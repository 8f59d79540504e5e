"""Load and soak (issue 7, part 4): many commands through one casa-node
cluster, every response checked, the resident memory of every process
followed from start to end.

    soak.py            # 1 000 000 tiny commands, then 10 000 with 1 MiB parameters
    soak.py --quick    # 20 000 and 200: the test command's variant

bench/soak/soak.sh builds casa-node and the virtual environment, then runs
this with the venv's Python. The cluster is `casa-node up --servers 4` over
ZeroMQ in a private temporary directory with its own unix:// front door
(bench/compare/harness.py's Cluster), stopped by PID on the way out, also
on failure, Ctrl-C or SIGTERM.

Phase A (tiny): `i+1` with parameters {"i": i}, through the modern client
(`casanode.connect()`, `Client.submit`); half the chunks untargeted (the
first free server takes each), half with `target=[1, 2, 3, 4]` (one
submission, four requests, one per server), in chunks of CHUNK_A requests with at most two chunks
outstanding: chunk k+1 is submitted while chunk k runs, then chunk k is
waited for, checked (successful, status `response received`, ret == i+1, a
server of the cluster) and its stored responses dropped
(`Client.forget`), so the driver holds a bounded window.

Phase B (large): a 1 MiB float64 array `x` (one of 16 random arrays, whose
CRC-32s the driver computed beforehand) and `i` as parameters; the server
returns `(i, zlib.crc32(x), x.dtype.str, x.shape)`, checked against the
driver's; every tenth command returns `x` itself instead, checked equal
element by element. Chunks of CHUNK_B, two outstanding at most.

Memory: VmRSS (from /proc/PID/status) of the head node (the `casa-node up`
process), every server node and every worker (`pid` and `worker_pid` of
the server table), anything else below the head node (the syntax
checker), and this driver; at the start of each phase, after its warm-up
(the first 5% of its commands), at every tenth of it, at its end (after a
1 s pause), and every SAMPLE_SECONDS in between for the maximum.

It fails (exit 1) when a response is wrong or missing, a worker or node
changed PID (a restart) or vanished, or a process's RSS at the end of a
phase is above its RSS after that phase's warm-up by more than both
GROWTH_PERCENT % and GROWTH_MIB MiB (see bench/README.md, "Load and soak",
for why that bound).
"""

import argparse
import os
import signal
import sys
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "compare"))

import harness  # noqa: E402  (bench/compare/harness.py: clusters started and stopped by PID)

import casanode  # noqa: E402
import numpy as np  # noqa: E402

SERVERS = 4
CHUNK_A = 1000          # tiny requests per chunk; two chunks outstanding at most
CHUNK_B = 8             # 1 MiB requests per chunk (16 MiB of parameters outstanding at most)
ARRAY_BYTES = 1 << 20
BASES = 16              # distinct 1 MiB arrays phase B cycles through
SAMPLE_EVERY = 10       # phase B: every tenth command returns the array itself
WARM_UP = 0.05          # the share of a phase before its reference sample
SAMPLE_SECONDS = 0.5    # the background sampler's period (for the maxima)
RESULT_LIMIT = 300      # seconds a chunk may take before its responses count as missing
GROWTH_PERCENT = 50
GROWTH_MIB = 32

KIB = 1024


def log(message):
    print(f"soak: {message}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


# ------------------------------------------------------------------ memory


def rss_kib(pid):
    """VmRSS of `pid` in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Processes:
    """The processes followed: name -> (pid, start time), in display order."""

    def __init__(self, cluster, client):
        self.cluster = cluster
        self.client = client
        self.table = self._discover()

    def _discover(self):
        up = self.cluster.pid
        found = {"head node": up}
        servers = self.client.status()
        if len(servers) != SERVERS:
            raise Failure(f"{len(servers)} servers in the table, {SERVERS} expected")
        for rank, s in sorted(servers.items()):
            found[f"server {rank}"] = s["pid"]
        for rank, s in sorted(servers.items()):
            found[f"worker {rank}"] = s["worker_pid"]
        known = set(found.values())
        others = []
        for pid, _ in harness.descendants(up):
            if pid not in known:
                stat = harness._stat(pid)
                others.append((harness._role(pid, stat[2]) if stat else "?", pid))
        roles = [role for role, _ in others]
        for role, pid in others:
            found[role if roles.count(role) == 1 else f"{role} {pid}"] = pid
        found["driver"] = os.getpid()
        table = {}
        for name, pid in found.items():
            stat = harness._stat(pid)
            if stat is None:
                raise Failure(f"{name} (pid {pid}) is gone")
            table[name] = (pid, stat[1])
        return table

    def check(self):
        """Raises Failure when a followed process has gone or changed: a
        worker restarted, a node replaced (the server table names other
        PIDs), or one of the below-the-head-node processes exited."""
        now = self._discover()
        problems = []
        for name, (pid, started) in self.table.items():
            if name not in now:
                problems.append(f"{name} (pid {pid}) is gone")
            elif now[name] != (pid, started):
                problems.append(f"{name} changed from pid {pid} to pid {now[name][0]}")
        for name in now.keys() - self.table.keys():
            problems.append(f"a new process appeared: {name} (pid {now[name][0]})")
        if problems:
            raise Failure("; ".join(problems))

    def sample(self):
        """{name: RSS in KiB} of every followed process still there."""
        out = {}
        for name, (pid, started) in self.table.items():
            if harness.alive(pid, started):
                rss = rss_kib(pid)
                if rss is not None:
                    out[name] = rss
        return out


class Sampler:
    """Samples every SAMPLE_SECONDS on a thread of its own, keeping each
    process's maximum; `mark(label)` records a named sample too."""

    def __init__(self, processes):
        self.processes = processes
        self.maxima = {}
        self.marks = []  # (label, {name: KiB})
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def _take(self):
        sample = self.processes.sample()
        with self._lock:
            for name, kib in sample.items():
                if kib > self.maxima.get(name, 0):
                    self.maxima[name] = kib
        return sample

    def _run(self):
        while not self._stop.wait(SAMPLE_SECONDS):
            self._take()

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def reset(self):
        with self._lock:
            self.maxima = {}
            self.marks = []

    def mark(self, label):
        sample = self._take()
        self.marks.append((label, sample))
        return sample


# ------------------------------------------------------------------ phases


class Phase:
    """Runs `count` commands in chunks, two chunks outstanding at most,
    checking each chunk's responses; samples RSS at the marks."""

    def __init__(self, name, client, sampler, count, chunk, warm_up_min):
        self.name = name
        self.client = client
        self.sampler = sampler
        self.count = count
        self.chunk = chunk
        warm_up = max(warm_up_min, int(count * WARM_UP))
        self.warm_up = max(chunk, warm_up // chunk * chunk)
        self.per_server = {}
        self.checked = 0
        self.errors = []

    def submit(self, i):
        """Submits command i; returns its Future."""
        raise NotImplementedError

    def submit_chunk(self, start, n, k):
        """Submits commands start .. start+n-1 (chunk number k); returns
        [(i, target rank or None, Future)], one per request."""
        return [(i, None, self.submit(i)) for i in range(start, start + n)]

    def verify(self, i, response):
        """A problem with the response to command i, or None."""
        raise NotImplementedError

    def _wait(self, chunk):
        ids = []
        for i, target, future in chunk:
            try:
                response = future.result(RESULT_LIMIT)
            except Exception as e:  # TimeoutError, ConnectionClosed
                raise Failure(f"{self.name}: no response to command {i} (request {future.id}): "
                              f"{type(e).__name__}: {e}") from None
            ids.append(future.id)
            problem = self._common(response) or self.verify(i, response)
            if not problem and target is not None and response["server"] != target:
                problem = f"sent to server {target}, answered by server {response['server']}"
            if problem:
                self.errors.append(f"command {i} (request {future.id}): {problem}")
                if len(self.errors) >= 10:
                    raise Failure(f"{self.name}: wrong responses:\n  " + "\n  ".join(self.errors))
            self.per_server[response["server"]] = self.per_server.get(response["server"], 0) + 1
            self.checked += 1
        # The client keeps every response until told: a long-running driver
        # drops them once read.
        self.client.forget(ids)

    def _common(self, response):
        if not response["successful"]:
            return f"failed on server {response['server']}: {response['traceback']}"
        if response["status"] != "response received":
            return f"status {response['status']!r}"
        if not 1 <= response["server"] <= SERVERS:
            return f"answered by server {response['server']}"
        return None

    def run(self):
        # (commands checked, label): after the warm-up and every tenth,
        # rounded down to a whole chunk.
        marks = {self.warm_up: "warm"}
        for k in range(1, 10):
            m = self.count * k // 10
            marks.setdefault(m - m % self.chunk, f"{10 * k}%")
        marks = sorted((m, label) for m, label in marks.items() if 0 < m < self.count)
        self.sampler.reset()
        self.sampler.mark("start")
        cpu0 = harness.cpu_snapshot(self.sampler.processes.cluster.pid, extra=[os.getpid()])
        t0 = time.monotonic()
        tw = None
        previous = None
        i = k = 0
        next_report = time.monotonic() + 10
        while i < self.count:
            n = min(self.chunk, self.count - i)
            current = self.submit_chunk(i, n, k)
            i += n
            k += 1
            if previous is not None:
                self._wait(previous)
            previous = current
            done = i - n  # checked so far (all but the chunk in flight)
            if marks and done >= marks[0][0]:
                _, label = marks.pop(0)
                self.sampler.mark(label)
                if label == "warm":
                    tw = (time.monotonic(), done)
                self.sampler.processes.check()
            if time.monotonic() >= next_report:
                next_report += 10
                rate = done / (time.monotonic() - t0)
                log(f"{self.name}: {done} of {self.count} checked, {rate:,.0f} commands/s")
        if previous is not None:
            self._wait(previous)
        t1 = time.monotonic()
        cpu1 = harness.cpu_snapshot(self.sampler.processes.cluster.pid, extra=[os.getpid()])
        if self.errors:
            raise Failure(f"{self.name}: wrong responses:\n  " + "\n  ".join(self.errors))
        if self.checked != self.count:
            raise Failure(f"{self.name}: {self.checked} responses checked, {self.count} sent")
        time.sleep(1)
        self.sampler.mark("end")
        self.sampler.processes.check()
        if tw is None:
            tw = (t0, 0)
        return {
            "seconds": t1 - t0,
            "rate": self.count / (t1 - t0),
            "rate_after_warm_up": (self.count - tw[1]) / (t1 - tw[0]) if t1 > tw[0] else 0.0,
            "cpu": harness.cpu_seconds(cpu0, cpu1),
        }


class Tiny(Phase):
    """Even chunks: one untargeted submission per command (the first free
    server takes it, rule 12). Odd chunks: one submission per four
    commands, `target=[1, 2, 3, 4]` (one request per rank, rule 13; the
    four share `i`), which spreads the load evenly: untargeted, the lowest
    ranks take most of it, as the driver submits one at a time."""

    def submit(self, i):
        return self.client.submit("i+1", parameters={"i": i})

    def submit_chunk(self, start, n, k):
        if k % 2 == 0:
            return super().submit_chunk(start, n, k)
        out = []
        ranks = list(range(1, SERVERS + 1))
        end = start + n - n % SERVERS
        for i in range(start, end, SERVERS):
            futures = self.client.submit("i+1", target=ranks, parameters={"i": i})
            out += [(i, rank, f) for rank, f in zip(ranks, futures)]
        out += [(i, None, self.submit(i)) for i in range(end, start + n)]
        return out

    def verify(self, i, response):
        if response["ret"] != i + 1 or type(response["ret"]) is not int:
            return f"ret {response['ret']!r}, expected {i + 1}"
        return None


class Large(Phase):
    def __init__(self, *args):
        super().__init__(*args)
        rng = np.random.default_rng(20261126)
        self.bases = [rng.standard_normal(ARRAY_BYTES // 8) for _ in range(BASES)]
        self.crcs = [zlib.crc32(a) for a in self.bases]

    def submit(self, i):
        x = self.bases[i % BASES]
        if i % SAMPLE_EVERY == 0:
            command = "x"
        else:
            command = "(i, __import__('zlib').crc32(x), x.dtype.str, x.shape)"
        return self.client.submit(command, parameters={"x": x, "i": i})

    def verify(self, i, response):
        x = self.bases[i % BASES]
        ret = response["ret"]
        if i % SAMPLE_EVERY == 0:
            if not isinstance(ret, np.ndarray) or ret.dtype != x.dtype or ret.shape != x.shape:
                return f"ret {type(ret).__name__} {getattr(ret, 'dtype', '')} {getattr(ret, 'shape', '')}, " \
                       f"expected the float64 array of {x.shape}"
            if not np.array_equal(ret, x):
                return "the returned array differs from the one sent"
            return None
        expected = (i, self.crcs[i % BASES], x.dtype.str, x.shape)
        if ret != expected:
            return f"ret {ret!r}, expected {expected!r}"
        return None


# ------------------------------------------------------------------ report


def mib(kib):
    return f"{kib / KIB:,.1f}" if kib is not None else "—"


def judge(name, warm, end):
    """A problem when `end` is over `warm` by more than both bounds."""
    if warm is None or end is None:
        return None
    if end > warm * (1 + GROWTH_PERCENT / 100) and end - warm > GROWTH_MIB * KIB:
        return (f"{name}: RSS {mib(end)} MiB at the end, {mib(warm)} MiB after warm-up "
                f"(+{mib(end - warm)} MiB, +{100 * (end - warm) / warm:.0f}%)")
    return None


def report(phase, figures, sampler):
    marks = dict(sampler.marks)
    start, end = marks["start"], marks["end"]
    warm = marks.get("warm", start)  # a phase no longer than its warm-up has none
    names = list(sampler.processes.table)
    print(f"\n### Phase {phase.name}: {phase.count:,} commands\n")
    print(f"{figures['seconds']:.1f} s, {figures['rate']:,.0f} commands/s "
          f"({figures['rate_after_warm_up']:,.0f} commands/s after the warm-up of {phase.warm_up:,}); "
          "per server: " + ", ".join(f"{r}: {n:,}" for r, n in sorted(phase.per_server.items())))
    cpu = figures["cpu"]
    print("CPU seconds: " + ", ".join(f"{role} {s:.1f}" for role, s in sorted(cpu.items())) + "\n")
    print("| process | pid | RSS start (MiB) | after warm-up | end | max | end − warm-up | |")
    print("|---|--:|--:|--:|--:|--:|--:|---|")
    problems = []
    for name in names:
        pid = sampler.processes.table[name][0]
        w, e = warm.get(name), end.get(name)
        problem = judge(name, w, e)
        if problem:
            problems.append(f"phase {phase.name}: {problem}")
        growth = f"{(e - w) / KIB:+,.1f}" if w is not None and e is not None else "—"
        print(f"| {name} | {pid} | {mib(start.get(name))} | {mib(w)} | {mib(e)} | "
              f"{mib(sampler.maxima.get(name))} | {growth} | {'GREW' if problem else 'ok'} |")
    # The trajectory: RSS at every mark, one column per process.
    print("\nRSS (MiB) along the phase:\n")
    print("| at | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    for label, sample in sampler.marks:
        print(f"| {label} | " + " | ".join(mib(sample.get(n)) for n in names) + " |")
    sys.stdout.flush()
    return problems


# ------------------------------------------------------------------ main


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 000 tiny and 200 large commands")
    parser.add_argument("--tiny", type=int, help="tiny commands (default 1 000 000, quick 20 000)")
    parser.add_argument("--large", type=int, help="1 MiB commands (default 10 000, quick 200)")
    args = parser.parse_args()
    tiny = args.tiny if args.tiny is not None else (20_000 if args.quick else 1_000_000)
    large = args.large if args.large is not None else (200 if args.quick else 10_000)

    # SIGTERM unwinds like Ctrl-C, so the cluster is stopped on the way out;
    # SIGINT too when started in the background (where it comes ignored).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)

    started = time.monotonic()
    log(f"starting casa-node up --servers {SERVERS} (ZeroMQ) with {harness.CASA_NODE}")
    problems = []
    cluster = harness.Cluster("zmq", SERVERS)
    try:
        cluster.wait_online(workers=True)
        log(f"cluster up: front door {cluster.endpoint}")
        with casanode.connect(cluster.endpoint) as client:
            processes = Processes(cluster, client)
            sampler = Sampler(processes)
            sampler.start()
            try:
                for phase in (Tiny("A (tiny)", client, sampler, tiny, CHUNK_A, 1000),
                              Large("B (1 MiB)", client, sampler, large, CHUNK_B, 48)):
                    if phase.count <= 0:
                        continue
                    log(f"phase {phase.name}: {phase.count:,} commands, warm-up {phase.warm_up:,}")
                    figures = phase.run()
                    problems += report(phase, figures, sampler)
            finally:
                sampler.stop()
            known = len(client._known)
        log_size = os.path.getsize(os.path.join(cluster.directory, "log"))
        print(f"\nThe cluster's log: {log_size / (1 << 20):,.1f} MiB; "
              f"request ids the client still remembers: {known:,}.")
    except harness.Failed as e:
        problems.append(str(e))
    except Failure as e:
        problems.append(str(e))
        problems.append("the cluster's log ends with:\n" + cluster.log_tail())
    except KeyboardInterrupt:
        log("interrupted: stopping the cluster")
        return 130
    finally:
        if not cluster.stop():
            problems.append("the cluster did not stop cleanly (a process had to be killed)")
    elapsed = time.monotonic() - started
    if problems:
        print("\nsoak: FAILED\n" + "\n".join(f"- {p}" for p in problems), flush=True)
        return 1
    print(f"\nsoak: ok ({tiny:,} tiny and {large:,} 1 MiB commands, every response checked; "
          f"no process grew past +{GROWTH_PERCENT}% and +{GROWTH_MIB} MiB after warm-up; {elapsed:.0f} s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
