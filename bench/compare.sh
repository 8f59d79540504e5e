#!/usr/bin/env bash
# casa-node against its peers (issue 6): builds casa-node with MPI support and
# the Rust round-trip client in release mode, makes (or updates) a virtual
# environment in target/bench-venv with casanode and the peers from PyPI
# (numpy, mpi4py, pyzmq, dask[distributed]), then measures every figure for
# casa-node and its peer in the same run and prints one table.
#
#   bench/compare.sh            # the full run, by hand (about 15 min on 2 cores)
#   bench/compare.sh --quick    # tiny counts, to check the harness (under a minute)
#   bench/compare.sh --only C   # CASA's flagdata on a Multi-MS against casampi
#
# Other arguments go to bench/compare/compare.py (--reps N, --only L,Z,T,J,D,B,F,S,M,C).
# Group C (not in --quick unless --only names it) makes its own CASA venv,
# target/bench-casa-venv (CASA_BENCH_VENV), the first time it runs.
# Needs Rust, Python 3 with venv, and Open MPI with its headers
# (scripts/install-deps.sh). Exits non-zero when a measurement fails, not
# when a goal is missed. PYTHON picks the interpreter the venvs are made from
# (default python3); BENCH_VENV the venv's directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
target_dir=${CARGO_TARGET_DIR:-$repo/target}
venv=${BENCH_VENV:-$target_dir/bench-venv}
python=${PYTHON:-python3}

echo "compare: building casa-node (--features mpi) and roundtrip-client in release mode" >&2
(cd "$repo" && cargo build --release --quiet -p casa-node --features mpi --bin casa-node \
    -p casa-node-bench --bin roundtrip-client)

if [ ! -x "$venv/bin/python" ]; then
    echo "compare: creating a virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
# mpi4py builds against the installed MPI (mpicc) when no wheel fits.
stamp="$venv/.compare-installed"
if [ ! -f "$stamp" ] || [ "$repo/python/pyproject.toml" -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
    echo "compare: installing casanode, numpy, mpi4py, pyzmq and dask[distributed] into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e "$repo/python" numpy mpi4py pyzmq "dask[distributed]"
    touch "$stamp"
fi

export CASA_NODE_BIN="$target_dir/release/casa-node"
export ROUNDTRIP_CLIENT="$target_dir/release/roundtrip-client"
exec "$venv/bin/python" "$here/compare/compare.py" "$@"
