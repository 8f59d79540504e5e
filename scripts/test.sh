#!/usr/bin/env bash
# The project's one test command: formatting, lints, then every test of the
# workspace (unit, property, simulated cluster, conformance vectors, and the
# quick run of the benchmarks). Installs nothing beyond Rust crates today;
# the steps that need MPI or Python install what they need themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

if cargo fmt --version >/dev/null 2>&1; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
else
    echo "rustfmt is not installed: formatting not checked"
fi

if cargo clippy --version >/dev/null 2>&1; then
    step "cargo clippy"
    cargo clippy --workspace --all-targets --locked -- -D warnings
else
    echo "clippy is not installed: lints not checked"
fi

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

# One closing line for the whole run: cargo's own last line belongs to
# whichever target ran last (often doc tests, with nothing to run).
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "\ntests: %d passed, %d failed\n", passed, failed }' "$log"
