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

echo "== VM stage: numa_vm tests inside one boot of the multi-node QEMU guest (configs/vm/cxl-3node.yaml)"
vm_unavailable() {
    if [ "${CI:-}" = "true" ]; then
        echo "VM stage FAILED: QEMU cannot start here: $1" >&2
        exit 1
    fi
    echo "VM stage skipped: $1"
    exit 0
}
set +e
prep_out=$(.venv/bin/tieremu vm prepare 2>&1)
rc=$?
set -e
printf '%s\n' "$prep_out"
# 69 is "cannot start here" (no QEMU, no kernel to be had); any other failure is a bug to report, not skip.
if [ "$rc" -eq 69 ]; then
    vm_unavailable "$(printf '%s\n' "$prep_out" | sed -n 's/^tieremu vm: QEMU cannot start here: //p' | tail -n 1)"
elif [ "$rc" -ne 0 ]; then
    echo "VM stage FAILED: tieremu vm prepare exited $rc" >&2
    exit 1
fi
# Only the files that use the marker: collecting the others would import torch and numpy inside the guest,
# where imports run 10-45x slower, for tests that -m numa_vm deselects anyway.
mapfile -t vm_files < <(grep -rl --include='test_*.py' 'numa_vm' tests | sort)
[ "${#vm_files[@]}" -gt 0 ] || { echo "VM stage FAILED: no test file under tests/ uses the numa_vm marker" >&2; exit 1; }
mkdir -p .cache
vm_jobdir=$(mktemp -d "$PWD/.cache/vm-stage.XXXXXX")
trap 'rm -rf "$vm_jobdir"' EXIT
set +e
# The host tree is read-only inside: no cache provider, no bytecode (the runner sets that); junit goes to the
# job folder, the one place the guest can write.
.venv/bin/tieremu vm run --topology configs/vm/cxl-3node.yaml --timeout 540 --jobdir "$vm_jobdir" -- \
    .venv/bin/python -m pytest -p no:cacheprovider -m numa_vm -rs --junitxml="$vm_jobdir/junit.xml" "${vm_files[@]}"
rc=$?
set -e
[ "$rc" -ne 69 ] || vm_unavailable "QEMU could not start the guest (its message is above)"
if [ ! -f "$vm_jobdir/junit.xml" ]; then
    echo "VM stage FAILED: the guest run ended with exit $rc and no test report" >&2
    exit 1
fi
counts=$(.venv/bin/python - "$vm_jobdir/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
print(passed, total["failures"] + total["errors"], total["skipped"])
PY
)
read -r vm_passed vm_failed vm_skipped <<< "$counts"
echo "vm-stage: $vm_passed passed, $vm_failed failed, $vm_skipped skipped"
if [ "$rc" -ne 0 ] || [ "$vm_failed" -ne 0 ] || [ "$vm_passed" -eq 0 ]; then
    echo "VM stage FAILED: exit $rc, $vm_passed passed, $vm_failed failed" >&2
    exit 1
fi
