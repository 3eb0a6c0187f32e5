"""Simulate-mode replay speed: the shared Mooncake trace, and a generated trace and one 10x its size.

Each replay runs `--repeats` times (medians reported, with min-max); the machine's load is recorded so that a noisy
run is flagged, not hidden. Passes when the shared trace replays in under 5 s and the 10x trace takes 10x the
time of the 1x one within +-30% (linear scaling).

    .venv/bin/python benchmarks/replay_simulate.py [--policy lru] [--fast-blocks 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tieremu.policy.registry import get_policy, names
from tieremu.record.stats import LoadMeter, Summary
from tieremu.workloads.generators import mix
from tieremu.workloads.simulate import SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, read_trace, reference_count

SHARED_TRACE = Path(__file__).resolve().parents[1] / "traces" / "mooncake_synthetic_trace.jsonl"
BUDGET_S = 5.0
LINEAR_TOLERANCE = 0.30


def replay_seconds(requests: list[Request], policy: str, fast_blocks: int, repeats: int) -> list[float]:
    """Wall time of whole replays, policy construction included (Belady indexes the trace there)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        chosen = get_policy(policy, {}, policy_context(requests))
        simulate(requests, [SimTier("dram", fast_blocks), SimTier("cxl", None)], chosen)
        times.append(time.perf_counter() - start)
    return times


def show(label: str, requests: list[Request], times: list[float]) -> float:
    summary = Summary.of(times)
    refs = reference_count(requests)
    print(f"{label:<28}{len(requests):>9,}{refs:>12,}{summary.median:>10.2f}{summary.min:>8.2f}{summary.max:>8.2f}"
          f"{refs / summary.median / 1e6:>12.3f}{'  noisy' if summary.noisy else ''}")
    return summary.median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default="lru", choices=names())
    parser.add_argument("--fast-blocks", type=int, default=1000, help="fast tier capacity; the slow one is unlimited")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6300,
                        help="requests in the 1x generated trace (6,300 of the default mix ~ 120k references)")
    args = parser.parse_args()
    meter = LoadMeter()
    print(f"policy {args.policy}, fast tier {args.fast_blocks:,} blocks, slow tier unlimited; "
          f"medians of {args.repeats}")
    print(f"{'trace':<28}{'requests':>9}{'references':>12}{'median s':>10}{'min':>8}{'max':>8}{'M refs/s':>12}")
    ok = True
    if SHARED_TRACE.exists():
        shared = read_trace(SHARED_TRACE)
        median = show("shared Mooncake trace", shared, replay_seconds(shared, args.policy, args.fast_blocks,
                                                                      args.repeats))
        ok = median < BUDGET_S
        print(f"  shared trace under {BUDGET_S:g} s: {'pass' if ok else 'FAIL'}")
    else:
        print(f"shared trace not found at {SHARED_TRACE}: skipped")
    small, large = mix(args.requests, seed=1), mix(10 * args.requests, seed=1)
    one = show("generated mix, 1x", small, replay_seconds(small, args.policy, args.fast_blocks, args.repeats))
    ten = show("generated mix, 10x", large, replay_seconds(large, args.policy, args.fast_blocks, args.repeats))
    ratio = ten / one
    refs_ratio = reference_count(large) / reference_count(small)
    linear = abs(ratio / refs_ratio - 1) <= LINEAR_TOLERANCE
    print(f"  10x / 1x time ratio {ratio:.2f} for {refs_ratio:.2f}x the references: "
          f"{'linear (pass)' if linear else 'NOT linear (FAIL)'}")
    load = meter.stop()
    print(f"machine: 1-min load {load.loadavg_1m:.2f} on {load.cpus} CPUs, busy {load.busy_fraction:.0%}, steal "
          f"{load.steal_fraction:.1%}{' (noisy: other work competed for the CPUs)' if load.noisy else ''}")
    return 0 if ok and linear else 1


if __name__ == "__main__":
    sys.exit(main())
