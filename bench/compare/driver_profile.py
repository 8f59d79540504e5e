"""The Python driver's own cost (issue 6, figures B1 and L1): blocking
round trips of `1+1` and of a large array, through the seed's face, for one
or more copies of the `casanode` package side by side in one process, so
that their figures come from the same cluster at the same time.

    cargo build --release -p casa-node
    PATH=target/bench-venv/bin:$PATH target/release/casa-node run --servers 1 \\
        bench/compare/driver_profile.py [--driver DIR]... [--latency N] [--rounds R] \\
        [--mib M] [--bandwidth N] [--rust target/release/roundtrip-client] \\
        [--profile latency|bandwidth]

Each --driver is a directory holding a `casanode` package (default: the one
`run` provides). The drivers take turns, round after round, and the table
gives each one's median with its ratio to the first's. --rust adds the Rust
client's blocking 1+1 (bench's roundtrip-client) to the latency rounds.
--profile prints cProfile's view of the first driver's main thread instead.
"""

import argparse
import cProfile
import importlib
import json
import os
import pstats
import statistics
import subprocess
import sys
import time


def load(directory):
    """A fresh import of the casanode package in `directory` (None: the
    one on sys.path)."""
    for name in [n for n in sys.modules if n == "casanode" or n.startswith("casanode.")]:
        del sys.modules[name]
    if directory is None:
        return importlib.import_module("casanode")
    sys.path.insert(0, directory)
    try:
        return importlib.import_module("casanode")
    finally:
        sys.path.remove(directory)


def latency_round(client, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.push_command_request("1+1", True, [1])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rust_round(binary, n):
    out = subprocess.run([binary, os.environ["CASA_NODE_ENDPOINT"], "--requests", str(n), "--warmup", "100"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_us"] / 1e6


def bandwidth_round(client, array, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        [r] = client.push_command_request("x", True, [1], {"x": array})
        times.append(time.perf_counter() - start)
        del r
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver", action="append", help="a directory holding a casanode package")
    parser.add_argument("--latency", type=int, default=1000, help="blocking 1+1 pushes per round (0: none)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=32, help="the array's size in MiB (keep it under 60)")
    parser.add_argument("--bandwidth", type=int, default=3, help="array round trips per round (0: none)")
    parser.add_argument("--rust", help="bench's roundtrip-client, for the latency rounds")
    parser.add_argument("--profile", choices=["latency", "bandwidth"])
    args = parser.parse_args()

    import numpy as np

    array = np.random.default_rng(6).random(args.mib << 17)
    drivers = args.driver or [None]
    clients = {}
    for directory in drivers:
        casanode = load(directory)
        client = casanode.MPICommandClient()
        client.start_services()
        [r] = client.push_command_request("x", True, [1], {"x": array[:1000]})
        assert np.array_equal(r["ret"], array[:1000]) and r["ret"].flags.writeable, r["traceback"]
        for _ in range(200):
            client.push_command_request("1+1", True, [1])
        clients[directory or "(run's casanode)"] = client

    if args.profile:
        client = next(iter(clients.values()))
        profile = cProfile.Profile()
        profile.enable()
        if args.profile == "latency":
            latency_round(client, args.latency or 1000)
        else:
            bandwidth_round(client, array, args.bandwidth or 3)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    else:
        for kind, n, unit, run in [
            ("latency", args.latency, 1e6, lambda c: latency_round(c, args.latency)),
            ("bandwidth", args.bandwidth, 1e3, lambda c: bandwidth_round(c, array, args.bandwidth)),
        ]:
            if not n:
                continue
            results = {name: [] for name in clients}
            if kind == "latency" and args.rust:
                results["Rust client"] = []
            for _ in range(args.rounds):
                for name, client in clients.items():
                    results[name].append(run(client))
                if "Rust client" in results:
                    results["Rust client"].append(rust_round(args.rust, n))
            first = statistics.median(next(iter(results.values())))
            label = "blocking 1+1, us" if kind == "latency" else f"{args.mib} MiB round trip, ms"
            print(f"{label}: median of {args.rounds} round medians ({n} calls each)")
            for name, rounds in results.items():
                median = statistics.median(rounds)
                extra = f"  {args.mib / median:.1f} MiB/s" if kind == "bandwidth" else ""
                print(f"  {name:40s} {median * unit:9.1f}  ratio {median / first:.3f}{extra}"
                      f"  rounds {[round(x * unit) for x in rounds]}")
            sys.stdout.flush()
    # Several copies of the package each stop services at exit; the first
    # is enough, and the others would wait on a stopped cluster.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
