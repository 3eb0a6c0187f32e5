#!/usr/bin/env bash
# The `mooncake` extra (Mooncake's Transfer Engine, non-CUDA build) into .venv, idempotently: a second run checks
# and changes nothing. `tieremu cluster replay --transport mooncake` needs it (tieremu/cluster/mooncake.py).
#
# Its declared dependencies (aiohttp, requests, msgpack) are small and pure; pip resolves them. The wheel is a
# manylinux_2_28 build for CPython 3.10-3.13 (~46 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh
PY=.venv/bin/python

# The pin lives in pyproject.toml's `mooncake` extra: one place to change it.
spec=$(sed -n 's/^mooncake = \["\(mooncake-transfer-engine-non-cuda==[0-9a-z.]*\)"\]$/\1/p' pyproject.toml)
[ -n "$spec" ] || {
    echo "setup-mooncake: no 'mooncake = [\"mooncake-transfer-engine-non-cuda==X.Y.Z\"]' extra in pyproject.toml" >&2
    exit 1
}
version=${spec#mooncake-transfer-engine-non-cuda==}

installed_ok() {
    "$PY" - "$version" <<'PY'
import importlib.metadata as md
import sys

try:
    if md.version("mooncake-transfer-engine-non-cuda") != sys.argv[1]:
        sys.exit(1)
except md.PackageNotFoundError:
    sys.exit(1)
from mooncake.engine import TransferEngine  # noqa: F401  (fails if the shared libraries do not load here)
PY
}

if installed_ok 2>/dev/null; then
    echo "setup-mooncake: $spec already installed"
    exit 0
fi

echo "setup-mooncake: installing $spec"
start=$(date +%s)
"$PY" -m pip install -q "$spec"
installed_ok || { echo "setup-mooncake: $spec installed but 'from mooncake.engine import TransferEngine' fails (above)" >&2; exit 1; }
echo "setup-mooncake: $spec installed in $(( $(date +%s) - start )) s"
