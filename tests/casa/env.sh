#!/usr/bin/env bash
# The environment the real-CASA tests run in, made once and cached under
# the target directory (CARGO_TARGET_DIR, else target/):
#
#   casa-venv/   a virtual environment with CASA's pinned wheels, protobuf
#                (for casanode), pytest and numpy; a stamp file names what
#                was installed, so a second run does nothing
#   casampi-0.6.0/  casampi's wheel (pip download, once) and its own test
#                file, tests/test_casampi.py, taken out of it; the wheel is
#                also installed (--no-deps) in casa-venv, so the tests show
#                that casa-node's face is found ahead of an installed casampi
#   casa-home/   a private HOME for CASA: .casa/config.py points measurespath
#                and datapath at casadata's __data__ and turns every
#                automatic update off, so CASA never touches the network
#                at run time
#
# Prints the interpreter's path on its last line of standard output.
# PYTHON picks the interpreter the environment is made from (python3).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
venv=$target_dir/casa-venv
home=$target_dir/casa-home
python=${PYTHON:-python3}

# casatasks 6.7.0.31 imports six without declaring it.
requirements=(
    casatools==6.7.0.31
    casatasks==6.7.0.31
    casadata==2025.9.22
    six
    'protobuf>=6.31.1,<7'
    pytest
    numpy
)
casampi=casampi==0.6.0
casampi_dir=$target_dir/casampi-0.6.0
stamp=$venv/.casa-node-stamp
wanted=$(printf '%s\n' "${requirements[@]}" "$casampi")

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ] \
    || [ ! -f "$casampi_dir/tests/test_casampi.py" ]; then
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating the CASA virtual environment in $venv (a one-off of a few minutes)" >&2
        "$python" -m venv "$venv"
    fi
    pip=("$venv/bin/python" -m pip --disable-pip-version-check)
    "${pip[@]}" install --quiet "${requirements[@]}" >&2
    # casampi's own dependency (mpi4py) is not wanted: casa-node is the MPI.
    rm -rf "$casampi_dir"
    "${pip[@]}" download --quiet --no-deps --dest "$casampi_dir" "$casampi" >&2
    "${pip[@]}" install --quiet --no-deps "$casampi_dir"/casampi-*.whl >&2
    "$venv/bin/python" - "$casampi_dir" <<'PY'
import glob, os, sys, zipfile
directory = sys.argv[1]
wheel, = glob.glob(os.path.join(directory, "casampi-*.whl"))
os.makedirs(os.path.join(directory, "tests"), exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    with open(os.path.join(directory, "tests", "test_casampi.py"), "wb") as f:
        f.write(z.read("casampi/tests/test_casampi.py"))
PY
    printf '%s\n' "$wanted" >"$stamp"
fi

# CASA reads ~/.casa/config.py at import: the data shipped in casadata,
# and no downloads.
data=$("$venv/bin/python" -c 'import casadata, os; print(os.path.join(os.path.dirname(casadata.__file__), "__data__"))')
config=$home/.casa/config.py
want_config="# Written by tests/casa/env.sh: casadata's data, never the network.
measurespath = '$data'
datapath = ['$data']
measures_auto_update = False
data_auto_update = False
"
if [ ! -f "$config" ] || [ "$(cat "$config")" != "${want_config%$'\n'}" ]; then
    mkdir -p "$home/.casa"
    printf '%s' "$want_config" >"$config"
fi

echo "$venv/bin/python"
