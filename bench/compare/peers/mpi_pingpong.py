"""The mpi4py peers of L1/L2 and B1, run under `mpirun -n 2`:

    mpi_pingpong.py latency REQUESTS WARMUP
        rank 0 `comm.send`s a small request dict ({"command": "1+1", ...}),
        rank 1 `eval`s its command and sends a small response dict back;
        the median round trip of REQUESTS after WARMUP.
    mpi_pingpong.py bandwidth MIB
        a MIB MiB float64 numpy buffer `Send` to rank 1, which `Recv`s it
        into a buffer of its own and `Send`s it back; after one 1 MiB
        exchange of warm-up, the time of one exchange there and back.

    mpi_pingpong.py broadcast MIB     (any number of ranks)
        rank 0 `Bcast`s a MIB MiB float64 buffer to every other rank, each
        into a buffer of its own, and `gather`s each rank's last item back;
        after one 1 MiB broadcast of warm-up, the time of the whole.

Rank 0 prints one JSON line."""

import json
import sys
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()


def latency(requests, warmup):
    if rank == 1:
        while True:
            request = comm.recv(source=0, tag=1)
            if request is None:
                return None
            ret = eval(request["command"])
            comm.send({"id": request["id"], "ret": ret, "successful": True,
                       "status": "response received", "server": 1}, dest=0, tag=2)
    times = []
    for i in range(warmup + requests):
        began = time.perf_counter()
        comm.send({"id": i, "command": "1+1", "parameters": None, "target": 1}, dest=1, tag=1)
        response = comm.recv(source=1, tag=2)
        elapsed = time.perf_counter() - began
        if response["ret"] != 2 or response["id"] != i:
            raise SystemExit(f"unexpected response {response!r}")
        if i >= warmup:
            times.append(elapsed)
    comm.send(None, dest=1, tag=1)
    times.sort()
    return {
        "median_us": times[len(times) // 2] * 1e6,
        "min_us": times[0] * 1e6,
        "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6,
        "requests": requests,
    }


def exchange(mib):
    """One exchange there and back of a MIB MiB buffer; seconds (rank 0)."""
    n = mib * (1 << 17)
    if rank == 1:
        buffer = np.empty(n, dtype=np.float64)
        comm.Recv(buffer, source=0, tag=3)
        comm.Send(buffer, dest=0, tag=4)
        return None
    array = np.arange(n, dtype=np.float64)
    back = np.empty(n, dtype=np.float64)
    began = time.perf_counter()
    comm.Send(array, dest=1, tag=3)
    comm.Recv(back, source=1, tag=4)
    elapsed = time.perf_counter() - began
    if not np.array_equal(array, back):
        raise SystemExit(f"the {mib} MiB buffer came back wrong")
    return elapsed


def bandwidth(mib):
    exchange(1)
    comm.Barrier()
    elapsed = exchange(mib)
    if rank == 1:
        return None
    return {"mib_per_s": 2 * mib / elapsed, "seconds": elapsed, "mib": mib}


def broadcast_once(mib):
    """One broadcast of a MIB MiB buffer and the gather of every rank's last
    item; seconds (rank 0)."""
    n = mib * (1 << 17)
    buffer = np.arange(n, dtype=np.float64) if rank == 0 else np.empty(n, dtype=np.float64)
    comm.Barrier()
    began = time.perf_counter()
    comm.Bcast(buffer, root=0)
    last = comm.gather(float(buffer[-1]), root=0)
    elapsed = time.perf_counter() - began
    if rank == 0 and last != [float(n - 1)] * comm.Get_size():
        raise SystemExit(f"the {mib} MiB broadcast arrived wrong: {last}")
    return elapsed


def broadcast(mib):
    broadcast_once(1)
    elapsed = broadcast_once(mib)
    if rank != 0:
        return None
    return {"seconds": elapsed, "mib": mib, "ranks": comm.Get_size()}


def main():
    what, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    result = {"latency": latency, "bandwidth": bandwidth, "broadcast": broadcast}[what](*args)
    if rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

