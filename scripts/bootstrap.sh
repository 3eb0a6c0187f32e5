#!/usr/bin/env bash
# One idempotent set-up: system packages when missing, .venv, torch==2.13.0 (CPU), then tieremu with its
# test, ray and cluster extras (Ray: the sweep backend for several hosts, tested with a real local cluster;
# pyzmq: the peer index of `tieremu cluster`). A second run
# checks and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(numactl fio qemu-system-x86 busybox-static libcap2-bin gcc libc6-dev chromium iproute2)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: missing system packages: ${missing[*]}; run this script as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "bootstrap: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || { echo "bootstrap: creating .venv"; python3 -m venv .venv; }
PY=.venv/bin/python

# torch first and pinned: the package's own range is then already satisfied.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    echo "bootstrap: installing torch==2.13.0 (CPU build)"
    "$PY" -m pip install -q torch==2.13.0
fi

stamp=.venv/.tieremu-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import tieremu, importlib.util as u, sys; sys.exit(u.find_spec('ray') is None or u.find_spec('zmq') is None)" 2>/dev/null; then
    echo "bootstrap: installing tieremu and its test, ray and cluster extras"
    "$PY" -m pip install -q -e '.[test,ray,cluster]'
    echo "$want" > "$stamp"
fi
