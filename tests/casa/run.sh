#!/usr/bin/env bash
# The real-CASA tests: CASA's Multi-MS parallel tasks (flagdata, setjy,
# applycal, uvcontsub, partition), tclean(parallel=True) and casampi's own
# client and server tests, run through `casa-node run --casa` and compared
# with CASA run serially. Exits non-zero on failure.
#
#   tests/casa/run.sh [PYTEST ARGS...]
#
# Makes the CASA environment once (env.sh: target/casa-venv, a one-off of
# a few minutes), prepares the data in a temporary directory (removed at the
# end, also on failure), and runs pytest over tests/casa/ for the
# transports in CASA_NODE_TEST_TRANSPORTS (comma-separated: zmq, mpi;
# default zmq). It uses the casa-node binary the build left in the target
# directory (CASA_NODE_BIN names another); with mpi among the transports it
# must be the MPI build (cargo build -p casa-node --features mpi), as
# scripts/test.sh's earlier steps leave it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}

python=$("$here/env.sh" | tail -n 1)
export HOME=$target_dir/casa-home          # CASA's config.py: no downloads
export CASA_NODE_CASA_HOME=$HOME
export CASA_NODE_BIN=${CASA_NODE_BIN:-$target_dir/debug/casa-node}
if [ ! -x "$CASA_NODE_BIN" ]; then
    echo "$CASA_NODE_BIN is missing: build casa-node first (cargo build -p casa-node --features mpi)" >&2
    exit 1
fi

data=$(mktemp -d "${TMPDIR:-/tmp}/casa-node-casa-data.XXXXXX")
trap 'rm -rf "$data"' EXIT
echo "preparing the data (NGC 5921: an MS, a Multi-MS of 4 sub-MSs, a gain table) in $data"
(cd "$data" && "$python" "$here/prepare_data.py" "$data" >prepare.log 2>&1) || {
    tail -n 40 "$data/prepare.log" >&2
    exit 1
}
export CASA_NODE_CASA_DATA=$data

# From the data directory: what CASA writes in the working directory of
# the tests' own process (its log, the serial runs' files) goes with it, as
# do pytest's temporary directories.
cd "$data"
"$python" -m pytest -q -p no:cacheprovider --rootdir="$here" --basetemp="$data/pytest" "$@" "$here"
