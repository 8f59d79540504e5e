#!/usr/bin/env bash
# Builds casa-node, makes a virtual environment with the Python client's
# one dependency (protobuf), and runs examples/quickstart.py on a local
# cluster of two servers.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p casa-node
venv=target/quickstart-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'protobuf>=6.31.1,<7'
target=${CARGO_TARGET_DIR:-target}
exec "$target/release/casa-node" run --servers 2 --python "$venv/bin/python" \
    --log-file target/quickstart.log examples/quickstart.py
