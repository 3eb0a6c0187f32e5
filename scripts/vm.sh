#!/usr/bin/env bash
# The multi-node QEMU guest from the shell: set-up (quietly), then `tieremu vm` with these arguments, e.g.
#   scripts/vm.sh run -- .venv/bin/tieremu topo
#   scripts/vm.sh run --topology configs/vm/two-socket.yaml -- numactl -H
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
if ! bash scripts/bootstrap.sh > "$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
exec .venv/bin/tieremu vm "$@"
