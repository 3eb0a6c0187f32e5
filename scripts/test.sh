#!/usr/bin/env bash
# The README's test command: all set-up, then the test suite. Exits non-zero when a test fails or none ran
# (pytest's own exit code 5 for "no tests collected" is kept as a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

echo "== lint (ruff)"
.venv/bin/ruff check .

echo "== host test suite"
.venv/bin/python -m pytest "$@"
