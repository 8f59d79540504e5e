"""The mpi4py.futures peer of T1, run as
`mpirun -n 3 python -m mpi4py.futures mpi_pool.py TASKS WARMUP`: rank 0
runs this script with an MPIPoolExecutor whose 2 workers are ranks 1 and 2.
WARMUP no-op submits first, then TASKS timed: submit all, then wait for
every result. Prints one JSON line."""

import json
import sys
import time

from mpi4py.futures import MPIPoolExecutor


def noop():
    return None


def main(tasks, warmup):
    with MPIPoolExecutor() as executor:
        workers = executor.num_workers
        if workers != 2:
            raise SystemExit(f"the pool has {workers} workers, not 2: run it under mpirun -n 3")
        for f in [executor.submit(noop) for _ in range(warmup)]:
            f.result()
        began = time.perf_counter()
        futures = [executor.submit(noop) for _ in range(tasks)]
        submitted = time.perf_counter()
        for f in futures:
            f.result()
        done = time.perf_counter()
    print(json.dumps({"tasks_per_s": tasks / (done - began), "push_s": submitted - began,
                      "total_s": done - began, "workers": workers}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
