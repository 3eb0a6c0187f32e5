#!/usr/bin/env bash
# Turn this server into a lab testbed: `scripts/setup-lab.sh PROFILE [options of tieremu lab apply]`, as root.
# PROFILE is a shipped name (configs/lab/*.yaml, e.g. cxl-cpuless-node1) or a path. Undo with
# scripts/teardown-lab.sh PROFILE; the journal of old values is in /var/lib/tieremu/lab ($TIEREMU_LAB_STATE).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PROFILE [--dry-run] [--sysfs-root DIR]" >&2; exit 2; }
profile=$1
shift
# A relative path means the caller's folder, not the repository's.
[ -e "$profile" ] && profile=$(realpath -- "$profile")
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
exec .venv/bin/tieremu lab apply "$profile" "$@"
