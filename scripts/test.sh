#!/usr/bin/env bash
# The project's one test command: installs Open MPI, libclang and Chromium when
# missing, then formatting, lints, every test of the workspace (unit,
# property, simulated cluster, conformance vectors, the transport checks over
# ZeroMQ and under mpirun, end-to-end and fault injection with real
# processes and Python workers over both transports, bad input, security,
# the quick runs of the benchmarks and the soak test), then the Python
# client's tests over both transports, in a virtual environment that
# python/run-tests.sh creates and fills from PyPI, then real CASA's parallel
# tasks and casampi's own tests through `casa-node run --casa`
# (tests/casa/run.sh, CASA's wheels in another virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "system packages: Open MPI, libclang, Chromium and chromedriver (scripts/install-deps.sh)"
scripts/install-deps.sh

if cargo fmt --version >/dev/null 2>&1; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
else
    echo "rustfmt is not installed: formatting not checked"
fi

if cargo clippy --version >/dev/null 2>&1; then
    step "cargo clippy"
    cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
    step "cargo clippy, the default build (without MPI)"
    cargo clippy -p casa-node --all-targets --locked -- -D warnings
else
    echo "clippy is not installed: lints not checked"
fi

step "cargo test (end-to-end over ZeroMQ)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-features --locked 2>&1 | tee "$log"

step "cargo test: end-to-end and driver backpressure over MPI (under mpirun)"
CASA_NODE_TEST_TRANSPORT=mpi cargo test -p casa-node --features mpi --locked --test e2e --test backpressure 2>&1 | tee -a "$log"

step "cargo test: fault injection over MPI (under mpirun; over ZeroMQ it ran with the workspace)"
CASA_NODE_TEST_TRANSPORT=mpi cargo test -p casa-node --features mpi --locked --test faults 2>&1 | tee -a "$log"

step "python tests over ZeroMQ and MPI (python/run-tests.sh: a virtual environment with protobuf and pytest)"
CASA_NODE_TEST_TRANSPORTS=zmq,mpi python/run-tests.sh 2>&1 | tee -a "$log"

step "real CASA through casa-node run --casa over ZeroMQ and MPI (tests/casa/run.sh: CASA 6.7's wheels in a virtual environment, made once)"
CASA_NODE_TEST_TRANSPORTS=zmq,mpi tests/casa/run.sh 2>&1 | tee -a "$log"

step "bench: casa-node against its peers, quick (bench/compare.sh --quick; the full run is by hand)"
bench/compare.sh --quick

step "bench: load and soak, quick (bench/soak/soak.sh --quick; the full run is by hand)"
CASA_NODE_BIN="${CARGO_TARGET_DIR:-target}/release/casa-node" bench/soak/soak.sh --quick

# One closing line for the whole run: cargo's and pytest's own last lines
# each cover only part of it.
awk '/^test result:/ { passed += $4; failed += $6 }
     /^[0-9]+ (passed|failed).* in [0-9.]+s/ {
         for (i = 1; i < NF; i++) {
             if ($(i + 1) ~ /^passed/) passed += $i
             if ($(i + 1) ~ /^failed/) failed += $i
         }
     }
     END { printf "\ntests: %d passed, %d failed\n", passed, failed }' "$log"
