#!/usr/bin/env bash
# Installs the system packages the MPI build and tests need, when missing:
# Open MPI (mpirun and the headers and library the `mpi` crate links to),
# libclang (the `mpi` crate generates its bindings with bindgen), and
# Chromium with its WebDriver (the dashboard's tests open the page in it).
# Debian and Ubuntu package names; as root, or with sudo.
set -euo pipefail

packages=(openmpi-bin libopenmpi-dev libclang-dev chromium chromium-driver)
missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install ${missing[*]} (or your system's Open MPI and libclang packages) and run again" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo -n)
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
