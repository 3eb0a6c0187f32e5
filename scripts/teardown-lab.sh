#!/usr/bin/env bash
# Restore every knob a lab profile changed, from its journal (also one left by a crash):
# `scripts/teardown-lab.sh PROFILE [options of tieremu lab teardown]`, as root.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PROFILE [--dry-run] [--sysfs-root DIR]" >&2; exit 2; }
profile=$1
shift
[ -e "$profile" ] && profile=$(realpath -- "$profile")
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
exec .venv/bin/tieremu lab teardown "$profile" "$@"
