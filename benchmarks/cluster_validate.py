"""The cluster simulator against the executed cluster (`tieremu cluster validate`): SPEC's executed cluster run K
times (`--repeats`, else the spec's), each run simulated from the model fitted to it, the check the median of the
runs' errors. Prints every executed run's TTFT p50 / p99 and throughput with the machine's load and steal over it (a
noisy run is flagged, kept) and its errors, the median of each figure with its distribution-free confidence interval
(min..max below 6 runs), the run-to-run spread, the pooled fit's simulated figure and whether it lies inside the
interval, and the check's errors against the targets: |TTFT p50 error| < 10%, |p99 error| < 20% (the issue's
must-show). `--rounds R` does the whole validation R times,
to show how stable the verdict is on this machine.

    .venv/bin/python benchmarks/cluster_validate.py [configs/cluster/validate-3.yaml] [--repeats 3] [--rounds 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tieremu.cluster.validate import (
    P50_LIMIT,
    P99_LIMIT,
    ValidationReport,
    load_validate_spec,
    run_validation,
    with_repeats,
)

REPO = Path(__file__).resolve().parents[1]
FIGURES = (("TTFT p50 ms", "ttft_p50_ms", P50_LIMIT), ("TTFT p99 ms", "ttft_p99_ms", P99_LIMIT),
           ("throughput tok/s", "throughput_tokens_per_s", None))


def show(round_: int, r: ValidationReport) -> None:
    print(f"round {round_}: {r.repeats} executed runs of {r.spec} ({r.requests} requests, {r.instances} instances)")
    print(f"{'run':>5}{'p50 ms':>10}{'p99 ms':>10}{'tok/s':>10}{'wall s':>8}{'load':>7}{'steal':>7}"
          f"{'p50 error':>11}{'p99 error':>11}")
    for run in r.executed_runs:
        f, load, own = run.figures, run.load, run.own_fit_errors or {}
        print(f"{run.run:>5}{f['ttft_p50_ms']:>10.1f}{f['ttft_p99_ms']:>10.1f}"
              f"{f.get('throughput_tokens_per_s', float('nan')):>10.0f}{run.wall_s:>8.1f}{load.loadavg_1m:>7.1f}"
              f"{load.steal_fraction:>7.1%}{own.get('ttft_p50_ms', float('nan')):>+11.1%}"
              f"{own.get('ttft_p99_ms', float('nan')):>+11.1%}{'  noisy' if run.noisy else ''}")
    refs, v = r.executed_reference or {}, r.validation
    errors = {"ttft_p50_ms": v.ttft_p50_error, "ttft_p99_ms": v.ttft_p99_error,
              "throughput_tokens_per_s": v.throughput_error}
    print(f"{'figure':>17}{'median':>10}{'CI of the median':>26}{'min..max':>22}{'CV':>7}{'pooled sim':>11}"
          f"{'in CI':>7}{'error':>8}{'target':>8}")
    for name, key, limit in FIGURES:
        ref, error = refs.get(key), errors[key]
        if ref is None or error is None:
            continue
        ci = f"{ref.ci.low:.1f}..{ref.ci.high:.1f} ({ref.ci.coverage:.0%})"
        print(f"{name:>17}{ref.median:>10.1f}{ci:>26}{f'{ref.min:.1f}..{ref.max:.1f}':>22}{ref.cv:>7.1%}"
              f"{ref.simulated:>11.1f}{'yes' if ref.simulated_inside else 'no':>7}{error:>+8.1%}"
              f"{'-' if limit is None else f'<{limit:.0%}':>8}")
    print(f"pooled-fit contention {r.contention:.2f}; {'PASS' if v.passed else 'FAIL'} (the median of the runs' "
          f"errors: |p50| < {P50_LIMIT:.0%}, |p99| < {P99_LIMIT:.0%})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(REPO / "configs" / "cluster" / "validate-3.yaml"))
    parser.add_argument("--repeats", type=int, default=None, help="executed runs per validation (else the spec's)")
    parser.add_argument("--rounds", type=int, default=1, help="whole validations, one after another")
    args = parser.parse_args()
    spec = with_repeats(load_validate_spec(args.spec), args.repeats)
    passed = 0
    for k in range(max(1, args.rounds)):
        report = run_validation(spec)
        show(k, report)
        passed += report.validation.passed
    print(f"{passed}/{max(1, args.rounds)} validations within both targets")
    return 0 if passed == max(1, args.rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
