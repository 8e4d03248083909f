#!/usr/bin/env bash
# Installs what clusterman needs to build and test with MPI (Debian/Ubuntu packages), if missing.
# As root it installs them; otherwise it prints the exact command to run and exits 1.
# Usage: install-deps.sh [extra packages...]   (the tests add MPICH, iproute2 for network
# namespaces, python3 for the fake scheduler CLIs)
set -euo pipefail
packages=(libclang-dev pkg-config openmpi-bin libopenmpi-dev "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "clusterman needs these packages: ${missing[*]}" >&2
  echo "install them with:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get -y -q --no-install-recommends install "${missing[@]}" >/dev/null
