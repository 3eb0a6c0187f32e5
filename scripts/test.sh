#!/usr/bin/env bash
# The README's test command: all set-up, then the test suite. Exits non-zero when a test fails or none ran
# (pytest's own exit code 5 for "no tests collected" is kept as a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The vllm extra (vLLM's CPU build): tests/test_engine_vllm.py needs it and fails under CI=true without it.
bash scripts/setup-vllm.sh
# The mooncake extra (Mooncake's Transfer Engine, ~46 MB): tests/test_cluster_mooncake.py fails under CI=true without it.
bash scripts/setup-mooncake.sh

echo "== lint (ruff)"
.venv/bin/ruff check .

mkdir -p .cache
reports=$(mktemp -d "$PWD/.cache/test-reports.XXXXXX")
scratch=("$reports")
trap 'rm -rf "${scratch[@]}"' EXIT

# junit_counts FILE...: "passed failed skipped" summed over pytest junit reports.
junit_counts() {
    .venv/bin/python - "$@" <<'PY'
import sys
import xml.etree.ElementTree as ET

total = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
for path in sys.argv[1:]:
    root = ET.parse(path).getroot()
    for suite in [root] if root.tag == "testsuite" else list(root.iter("testsuite")):
        for key in total:
            total[key] += int(suite.get(key, 0))
print(total["tests"] - total["failures"] - total["errors"] - total["skipped"],
      total["failures"] + total["errors"], total["skipped"])
PY
}

echo "== host test suite"
.venv/bin/python -m pytest --junitxml="$reports/host.xml" "$@"

echo "== VM stages: tests that need several NUMA nodes, inside the multi-node QEMU guest"
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
# vm_stage TOPOLOGY MARKER: run the tests marked MARKER in one boot of the guest laid out as TOPOLOGY.
vm_stage() {
    local topology=$1 marker=$2 jobdir rc counts
    echo "== VM stage: $marker tests inside one boot of the QEMU guest ($topology)"
    # Only the files that use the marker: collecting the others would import torch and numpy inside the guest,
    # where imports run 10-45x slower, for tests the marker deselects anyway.
    local files=()
    mapfile -t files < <(grep -rlw --include='test_*.py' "$marker" tests | sort)
    [ "${#files[@]}" -gt 0 ] || { echo "VM stage FAILED: no test file under tests/ uses the $marker marker" >&2; exit 1; }
    jobdir=$(mktemp -d "$PWD/.cache/vm-stage.XXXXXX")
    scratch+=("$jobdir")
    set +e
    # The host tree is read-only inside: no cache provider, no bytecode (the runner sets that); junit goes to the
    # job folder, the one place the guest can write.
    .venv/bin/tieremu vm run --topology "$topology" --timeout 540 --jobdir "$jobdir" -- \
        .venv/bin/python -m pytest -p no:cacheprovider -m "$marker" -rs --junitxml="$jobdir/junit.xml" "${files[@]}"
    rc=$?
    set -e
    [ "$rc" -ne 69 ] || vm_unavailable "QEMU could not start the guest (its message is above)"
    if [ ! -f "$jobdir/junit.xml" ]; then
        echo "VM stage FAILED: the guest run ended with exit $rc and no test report" >&2
        exit 1
    fi
    counts=$(junit_counts "$jobdir/junit.xml")
    read -r vm_passed vm_failed vm_skipped <<< "$counts"
    echo "vm-stage: $vm_passed passed, $vm_failed failed, $vm_skipped skipped"
    if [ "$rc" -ne 0 ] || [ "$vm_failed" -ne 0 ] || [ "$vm_passed" -eq 0 ]; then
        echo "VM stage FAILED: exit $rc, $vm_passed passed, $vm_failed failed" >&2
        exit 1
    fi
    cp "$jobdir/junit.xml" "$reports/$marker.xml"
}

# NUMA placement, migration, tiers and the topology the guest was given: CPU-less nodes 1 and 2.
vm_stage configs/vm/cxl-3node.yaml numa_vm
# The lab profile that offlines node 1's CPU, and its teardown: two nodes with a CPU each.
vm_stage configs/vm/two-socket.yaml numa_vm_lab

read -r all_passed all_failed all_skipped <<< "$(junit_counts "$reports"/*.xml)"
echo "all: $all_passed passed, $all_failed failed, $all_skipped skipped"
