#!/usr/bin/env bash
# Load and soak (issue 7, part 4): builds casa-node in release mode, uses
# (or makes) the virtual environment target/bench-venv with casanode and
# numpy, then runs bench/soak/soak.py: a `casa-node up --servers 4` over
# ZeroMQ in a private temporary directory, 1 000 000 tiny commands and
# 10 000 commands with 1 MiB parameters, every response checked, the
# resident memory of every process followed; the cluster is stopped by PID.
#
#   bench/soak/soak.sh            # the full run, by hand (see bench/README.md for how long)
#   bench/soak/soak.sh --quick    # 20 000 and 200 commands: the test command's variant
#
# Other arguments go to soak.py (--tiny N, --large N). Exits non-zero when a
# response is wrong or missing, a process restarted, or a process's RSS grew
# past the bound (bench/README.md, "Load and soak"). PYTHON picks the
# interpreter the venv is made from (default python3); BENCH_VENV the venv's
# directory; CASA_NODE_BIN a casa-node binary to use instead of building one
# (e.g. the MPI-enabled one bench/compare.sh just built, which serves over
# ZeroMQ as well: the test command does that, so that casa-node is not
# compiled in release mode a second time with other features).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
venv=${BENCH_VENV:-$target_dir/bench-venv}
python=${PYTHON:-python3}

if [ -n "${CASA_NODE_BIN:-}" ]; then
    echo "soak: using $CASA_NODE_BIN (CASA_NODE_BIN), not building" >&2
    [ -x "$CASA_NODE_BIN" ] || { echo "soak: $CASA_NODE_BIN is not an executable" >&2; exit 1; }
    CASA_NODE_BIN=$(cd "$(dirname "$CASA_NODE_BIN")" && pwd)/$(basename "$CASA_NODE_BIN")
else
    echo "soak: building casa-node in release mode" >&2
    (cd "$repo" && cargo build --release --quiet -p casa-node)
    CASA_NODE_BIN="$target_dir/release/casa-node"
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "soak: creating a virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.soak-installed"
if [ ! -f "$stamp" ] || [ "$repo/python/pyproject.toml" -nt "$stamp" ] || [ "$0" -nt "$stamp" ] \
    || ! "$venv/bin/python" -c "import casanode, numpy" 2>/dev/null; then
    echo "soak: installing casanode and numpy into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo/python" numpy
    touch "$stamp"
fi

export CASA_NODE_BIN
exec "$venv/bin/python" "$here/soak.py" "$@"
