#!/usr/bin/env bash
# Runs casanode's tests: makes a virtual environment under target/ (once),
# installs python/ with its test extra into it, builds the casa-node binary
# the end-to-end tests start, and runs pytest. Exits non-zero on failure.
#
#   python/run-tests.sh [PYTEST ARGS...]
#
# PYTHON picks the interpreter (default python3); CASANODE_VENV the
# environment's directory (default target/python-venv);
# CASA_NODE_TEST_TRANSPORTS the transports the cluster tests run over
# (comma-separated: zmq, mpi; default zmq).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=${CASANODE_VENV:-$repo/target/python-venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    echo "creating a virtual environment in $venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here[test]"

# With MPI among the transports under test, casa-node needs its MPI build.
features=()
case ",${CASA_NODE_TEST_TRANSPORTS:-zmq}," in
    *,mpi,*) features=(--features mpi) ;;
esac
(cd "$repo" && cargo build --quiet -p casa-node "${features[@]}")
target_dir=${CARGO_TARGET_DIR:-$repo/target}
export CASA_NODE_BIN="$target_dir/debug/casa-node"

cd "$here"
export CASA_NODE_REQUIRE_E2E=1  # the binary was just built: never skip
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
