"""The casa-node side of the comparison: a driver script, run as its own
process against a cluster that compare.py started, with the cluster's
front door in $CASA_NODE_ENDPOINT, as a user's script would be. It uses the
seed's face (`from casanode import MPICommandClient`; `map` uses the modern
face, `casanode.connect()`), checks every answer, and prints one JSON
line.

Around the timed part it prints `ready` before and the result after, and
each time waits for a line on stdin (none when stdin is not a pipe), so
that compare.py can read the cluster's CPU use for exactly that part while
the cluster is still up: the seed's face stops services when its driver
exits.

    casa_side.py latency    REQUESTS WARMUP     blocking 1+1 to server 1
    casa_side.py throughput TASKS WARMUP        non-blocking untargeted 1+1, then wait for all
    casa_side.py map        TASKS WARMUP        the same through the modern face's Client.map
    casa_side.py bandwidth  MIB                 a MIB MiB array there and back
    casa_side.py broadcast  MIB SERVERS         a MIB MiB array to every server, each answers its last item
    casa_side.py failure    SLEEP               SIGSTOP server 1 during a command; time to 'timeout'
"""

import json
import os
import signal
import sys
import time

from casanode import MPICommandClient


def sync(line):
    """Prints `line`, then waits for compare.py to say go on."""
    print(line, flush=True)
    sys.stdin.readline()


def check(response, server=None, ret=2):
    if not (response["successful"] and response["status"] == "response received"
            and response["ret"] == ret and (server is None or response["server"] == server)):
        raise SystemExit(f"unexpected response: {response!r}")


def latency(client, requests, warmup):
    for _ in range(warmup):
        [r] = client.push_command_request("1+1", True, [1])
        check(r, 1)
    sync("ready")
    times = []
    for _ in range(requests):
        began = time.perf_counter()
        [r] = client.push_command_request("1+1", True, [1])
        times.append(time.perf_counter() - began)
        check(r, 1)
    times.sort()
    return {
        "median_us": times[len(times) // 2] * 1e6,
        "min_us": times[0] * 1e6,
        "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6,
        "requests": requests,
    }


def throughput(client, tasks, warmup):
    ids = [i for _ in range(warmup) for i in client.push_command_request("1+1", False)]
    for r in client.get_command_response(ids, block=True):
        check(r)
    sync("ready")
    began = time.perf_counter()
    ids = []
    for _ in range(tasks):
        ids.extend(client.push_command_request("1+1", False))
    pushed = time.perf_counter()
    responses = client.get_command_response(ids, block=True)
    done = time.perf_counter()
    if len(responses) != tasks:
        raise SystemExit(f"{len(responses)} responses to {tasks} requests")
    servers = {}
    for r in responses:
        check(r)
        servers[r["server"]] = servers.get(r["server"], 0) + 1
    return {
        "tasks_per_s": tasks / (done - began),
        "push_s": pushed - began,
        "total_s": done - began,
        "per_server": servers,
    }


def map_throughput(client, tasks, warmup):
    for r in client.map("x + 1", [{"x": 1}] * warmup):
        check(r)
    sync("ready")
    began = time.perf_counter()
    results = client.map("x + 1", [{"x": 1}] * tasks)
    pushed = time.perf_counter()
    servers = {}
    count = 0
    for r in results:
        check(r)
        servers[r["server"]] = servers.get(r["server"], 0) + 1
        count += 1
    done = time.perf_counter()
    if count != tasks:
        raise SystemExit(f"{count} responses to {tasks} requests")
    return {
        "tasks_per_s": tasks / (done - began),
        "push_s": pushed - began,
        "total_s": done - began,
        "per_server": servers,
    }


def broadcast(client, mib, servers):
    import numpy as np

    ranks = list(range(1, servers + 1))
    small = np.arange(1 << 17, dtype=np.float64)  # warm-up: imports numpy on every server
    for r in client.push_command_request("float(x[-1])", True, ranks, {"x": small}):
        check(r, ret=float(small[-1]))
    array = np.arange(mib * (1 << 17), dtype=np.float64)
    sync("ready")
    began = time.perf_counter()
    responses = client.push_command_request("float(x[-1])", True, ranks, {"x": array})
    elapsed = time.perf_counter() - began
    if sorted(r["server"] for r in responses) != ranks:
        raise SystemExit(f"answers from {[r['server'] for r in responses]}, not {ranks}")
    for r in responses:
        check(r, ret=float(array[-1]))
    return {"seconds": elapsed, "mib": mib, "servers": servers}


def bandwidth(client, mib):
    import numpy as np

    small = np.arange(1 << 17, dtype=np.float64)  # 1 MiB: warm-up, imports numpy on the server
    [r] = client.push_command_request("x", True, [1], {"x": small})
    if not r["successful"] or not np.array_equal(r["ret"], small):
        raise SystemExit(f"warm-up array came back wrong: {r!r}")
    array = np.arange(mib * (1 << 17), dtype=np.float64)
    sync("ready")
    began = time.perf_counter()
    [r] = client.push_command_request("x", True, [1], {"x": array})
    elapsed = time.perf_counter() - began
    back = r["ret"]
    if not r["successful"] or not isinstance(back, np.ndarray) or not np.array_equal(back, array):
        raise SystemExit(f"the {mib} MiB array came back wrong: "
                         f"successful={r['successful']} traceback={r['traceback']} type={type(back)}")
    return {"mib_per_s": 2 * mib / elapsed, "seconds": elapsed, "mib": mib}


def failure(client, sleep):
    [server] = [s for rank, s in client.get_server_status().items() if rank == 1]
    ids = client.push_command_request(f"time.sleep({sleep})", False, [1])
    end = time.monotonic() + 30
    while not client.get_server_status(1)[1]["busy"]:
        if time.monotonic() > end:
            raise SystemExit("server 1 never started the command")
        time.sleep(0.005)
    pid = server["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped = time.perf_counter()
    try:
        [r] = client.get_command_response(ids, block=True)
        answered = time.perf_counter()
    finally:
        os.kill(pid, signal.SIGCONT)
    if r["status"] != "timeout":
        raise SystemExit(f"expected a timeout, got {r!r}")
    return {"seconds": answered - stopped, "server_pid": pid}


def main():
    what, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    if what == "map":
        import casanode

        with casanode.connect() as client:
            result = map_throughput(client, *args)
        sync(json.dumps(result))
        return
    client = MPICommandClient()
    client.start_services()
    result = {
        "latency": latency,
        "throughput": throughput,
        "bandwidth": bandwidth,
        "broadcast": broadcast,
        "failure": failure,
    }[what](client, *args)
    sync(json.dumps(result))


if __name__ == "__main__":
    main()
