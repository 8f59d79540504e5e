"""The Dask peer of T2: a LocalCluster of 2 worker processes with one
thread each, on the loopback, without a dashboard; WARMUP no-ops mapped
first, then `client.map` of TASKS no-ops timed, until every result is
gathered. Start-up is not timed. Prints one JSON line.

    dask_map.py TASKS WARMUP"""

import json
import logging
import sys
import time


def noop(_):
    return None


def main(tasks, warmup):
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
        client.gather(client.map(noop, range(warmup), pure=False))
        began = time.perf_counter()
        futures = client.map(noop, range(tasks), pure=False)
        submitted = time.perf_counter()
        results = client.gather(futures)
        done = time.perf_counter()
        if len(results) != tasks:
            raise SystemExit(f"{len(results)} results for {tasks} tasks")
        workers = len(client.scheduler_info()["workers"])
    print(json.dumps({"tasks_per_s": tasks / (done - began), "push_s": submitted - began,
                      "total_s": done - began, "workers": workers}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
