#!/usr/bin/env bash
# The README's first command: all set-up, then the default experiment (or the spec given as first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/tieremu run "${@:-configs/experiments/default.yaml}"
