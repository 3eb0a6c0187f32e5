#!/usr/bin/env bash
# `scripts/lab.sh apply|teardown PROFILE [options]`, as root: set-up, then `tieremu lab`. PROFILE is a shipped
# name (configs/lab/*.yaml, e.g. cxl-cpuless-node1) or a path; the journal of old values is in /var/lib/tieremu/lab
# ($TIEREMU_LAB_STATE), so teardown restores them, also after a crash.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 apply|teardown PROFILE [--dry-run] [--sysfs-root DIR]" >&2; exit 2; }
verb=$1 profile=$2
shift 2
# A relative path means the caller's folder, not the repository's.
[ -e "$profile" ] && profile=$(realpath -- "$profile")
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
exec .venv/bin/tieremu lab "$verb" "$profile" "$@"
