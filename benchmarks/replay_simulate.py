"""Simulate-mode replay speed: block references a second of lru, lfu and belady on the shared Mooncake trace and on
a trace ten times its size, and the wall time of the whole `tieremu replay` command (start-up included).

The 10x trace is ten tenants replaying the shared trace side by side: each request followed by its nine copies
(same arrival, each copy with its own block ids), and the fast tier ten times as large (the same share of the
distinct blocks). Each tenant then sees what the shared trace alone sees, so every policy does ten times the work:
the table prints the moves of each 10x replay over ten times the shared trace's, which should read 1.00. (Ten copies
one after another do not: LFU keeps the counts of earlier copies, whose blocks crowd a fast tier the later copies
cannot win back, and does 1.3x the moves per copy; that arrangement is printed too, for information.) Each replay
runs `--repeats` times (medians, with min-max); references/s is references over the result's wall_s (the replay
itself: trace parsing and flattening excluded, as `tieremu replay --json` reports it). The machine's load is
recorded so that a noisy run is flagged, not hidden. Targets: at least 10 M references/s on the shared trace, the
10x trace within 12x the time, the command within 1.5 s.

    .venv/bin/python benchmarks/replay_simulate.py [--share 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tieremu.policy.registry import get_policy
from tieremu.record.stats import LoadMeter, Summary
from tieremu.workloads.replay_core import NATIVE
from tieremu.workloads.simulate import ReplayResult, SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, read_trace, reference_count

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACE = REPO / "traces" / "mooncake_synthetic_trace.jsonl"
TIER_MAP = REPO / "configs" / "tiers" / "cxl-expander.yaml"
TARGET_REFS_PER_S = 10e6
TARGET_SCALING = 12.0  # the 10x trace's time over the 1x trace's
TARGET_COMMAND_S = 1.5


def tenants(requests: list[Request], copies: int) -> list[Request]:
    """`copies` tenants side by side: each request followed by its copies, each with block ids of its own."""
    id_span = 1 + max(b for r in requests for b in r.hash_ids)
    return [Request(r.timestamp_ms, r.input_length, r.output_length, tuple(b + c * id_span for b in r.hash_ids))
            for r in requests for c in range(copies)]


def in_sequence(requests: list[Request], copies: int) -> list[Request]:
    """The trace `copies` times over, one copy after another: block ids shifted past the last copy's."""
    id_span = 1 + max(b for r in requests for b in r.hash_ids)
    time_span = 1 + requests[-1].timestamp_ms
    return [Request(r.timestamp_ms + c * time_span, r.input_length, r.output_length,
                    tuple(b + c * id_span for b in r.hash_ids))
            for c in range(copies) for r in requests]


def replays(arms: list[tuple[list[Request], int]], policy: str, repeats: int) -> list[tuple[list[float], ReplayResult]]:
    """Each arm's replay wall_s per run (its fast tier of so many blocks, the slow one unlimited) and its result; the
    arms take turns, run by run, so that the machine's load falls on all of them alike."""
    contexts = [policy_context(requests) for requests, _ in arms]
    times: list[list[float]] = [[] for _ in arms]
    results: list[ReplayResult] = []
    for _ in range(repeats):
        results = [simulate(requests, [SimTier("dram", fast), SimTier("cxl")], get_policy(policy, {}, context))
                   for (requests, fast), context in zip(arms, contexts, strict=True)]
        for spent, result in zip(times, results, strict=True):
            spent.append(result.wall_s)
    return list(zip(times, results, strict=True))


def command_seconds(args: list[str], repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
    return times


def row(label: str, refs: int, times: list[float], note: str = "") -> Summary:
    s = Summary.of(times)
    print(f"{label:<34}{refs:>11,}{s.median * 1e3:>10.1f}{s.min * 1e3:>8.1f}{s.max * 1e3:>8.1f}"
          f"{refs / s.median / 1e6:>11.1f}{note:>8}{'  noisy' if s.noisy else ''}")
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--share", type=float, default=10.0, help="fast tier, %% of the trace's distinct blocks")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    meter = LoadMeter()
    one = read_trace(SHARED_TRACE)
    copies = 10
    side_by_side, one_after_another = tenants(one, copies), in_sequence(one, copies)
    fast = math.floor(args.share / 100 * len({b for r in one for b in r.hash_ids}))
    print(f"fast tier {fast:,} blocks ({args.share:g}% of the shared trace's distinct blocks; x{copies} for the 10x "
          f"trace of {copies} tenants), slow tier unlimited; medians of {args.repeats}; moves: the 10x replay's over "
          f"{copies}x the shared trace's")
    print(f"{'replay':<34}{'references':>11}{'median ms':>10}{'min':>8}{'max':>8}{'M refs/s':>11}{'moves':>8}")
    ok = True
    for policy in NATIVE:
        (times, base), (big_times, tenants_result), (sequence_times, sequence_result) = replays(
            [(one, fast), (side_by_side, copies * fast), (one_after_another, fast)], policy, args.repeats)
        small = row(f"{policy}, shared trace", reference_count(one), times)
        large = row(f"{policy}, 10x ({copies} tenants)", reference_count(side_by_side), big_times,
                    f"{tenants_result.moves / (copies * base.moves):.2f}x")
        sequence = row(f"{policy}, 10x (copies in sequence)", reference_count(one_after_another), sequence_times,
                       f"{sequence_result.moves / (copies * base.moves):.2f}x")
        rate, ratio = reference_count(one) / small.median, large.median / small.median
        passed = rate >= TARGET_REFS_PER_S and ratio <= TARGET_SCALING
        ok &= passed
        print(f"  {policy}: {rate / 1e6:.1f} M refs/s (target {TARGET_REFS_PER_S / 1e6:g} M), 10x takes {ratio:.1f}x "
              f"the time (target <= {TARGET_SCALING:g}x): {'pass' if passed else 'FAIL'}; copies in sequence "
              f"{sequence.median / small.median:.1f}x (information)")
    replay_args = ["replay", str(SHARED_TRACE), "--tiers", str(TIER_MAP), "--policy", "lru", "--capacity",
                   f"dram={args.share:g}%", "--capacity", "cxl=100%", "--json"]
    for label, command in (("tieremu replay (the CLI)", [str(Path(sys.executable).with_name("tieremu"))]),
                           ("python -m tieremu replay", [sys.executable, "-m", "tieremu"])):
        s = row(label, reference_count(one), command_seconds([*command, *replay_args], args.repeats))
        print(f"  {label}: {s.median:.2f} s wall, start-up and parsing included (target <= {TARGET_COMMAND_S:g} s): "
              f"{'pass' if s.median <= TARGET_COMMAND_S else 'FAIL'}")
    load = meter.stop()
    print(f"machine: 1-min load {load.loadavg_1m:.2f} on {load.cpus} CPUs, busy {load.busy_fraction:.0%}, steal "
          f"{load.steal_fraction:.1%}{' (noisy: other work competed for the CPUs)' if load.noisy else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
