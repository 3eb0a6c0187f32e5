"""TTFT with and without peer sharing: 3 instances on the shared trace's first 300 requests, round-robin.

What can move TTFT here: under round-robin over 3 instances only a handful of the first 300 requests (9 on the
shipped trace, 268 of 7,721 block references) have a block that another instance already holds, so sharing can only
lower the other requests' TTFT through less queueing behind those few. This script measures that honestly:

- three arms, `--sharing none`, `p2p --pull estimate` and `p2p --pull always` (broadcast index), interleaved over
  `--repeats` rounds with the arm order rotated each round, so the machine's changing load falls on each alike;
- at the default time scale, then at a time scale where the instances are backlogged: each instance's busy time is
  recovered from the `none` runs (a FIFO server: a request starts at the later of its due time and the previous
  request's finish), the offered utilisation is busy time / arrival span, and the second scale is chosen so that it
  becomes `--target-util` (printed);
- per arm and scale: the median over rounds of TTFT p50 and p99, each with a bootstrap 95% CI (runs resampled), the
  machine's load and steal time per run; the difference p2p - none of the median p50 with its bootstrap CI and
  whether that CI excludes 0;
- the requests that have peer-held blocks, their TTFT per arm paired by request index (median over rounds).

First, and the comparison the issue asks for: `--concurrent` rounds in which `none` and `p2p --pull always` run
at the same time, each with its own 3 instances and namespaces, as tests/test_cluster.py runs them. Both arms then
share whatever else loads the machine, second by second, which sequential rounds cannot give on a machine whose
speed moves 20% in minutes; the price is that the arms also share the 2 vCPUs with each other (symmetrically: the
same processes and threads each side). Printed per round: both arms' TTFT p50/p99 and the paired difference; then
the median paired difference of p50 with a bootstrap 95% CI (rounds resampled), and how many rounds p2p was lower
with the exact sign-test p-value.

Timings are noisy on a shared machine: read the load line and the CIs, not one figure.

    .venv/bin/python benchmarks/cluster_ttft.py [--concurrent 8] [--repeats 5] [--requests 300] [--block-kib 16]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tieremu.cluster.replay import ClusterSpec, cluster_replay, route_round_robin
from tieremu.cluster.result import ClusterResult
from tieremu.record.stats import LoadMeter, MachineLoad
from tieremu.workloads.trace import Request, read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "mooncake_synthetic_trace.jsonl"
TIERS = ROOT / "configs" / "tiers" / "cluster-peer.yaml"
INSTANCES = 3
ARMS = (("none", "estimate"), ("p2p", "estimate"), ("p2p", "always"))  # (sharing, pull)
RESAMPLES = 4000


@dataclass
class Run:
    result: ClusterResult
    load: MachineLoad


def arm_name(arm: tuple[str, str]) -> str:
    return "none" if arm[0] == "none" else f"p2p-{arm[1]}"


def peer_held_requests(requests: Sequence[Request]) -> list[int]:
    """Requests with a block that another instance computed before and this one has not (round-robin routing,
    no eviction: the capacity holds every block of 300 requests)."""
    seen: list[set[int]] = [set() for _ in range(INSTANCES)]
    found = []
    for k, r in enumerate(requests):
        me = route_round_robin(k, range(INSTANCES))
        others = set().union(*(seen[j] for j in range(INSTANCES) if j != me))
        if any(b in others and b not in seen[me] for b in r.hash_ids):
            found.append(k)
        seen[me].update(r.hash_ids)
    return found


def utilisation(result: ClusterResult, requests: Sequence[Request], scale: float) -> float:
    """Offered utilisation, mean over instances: busy time / arrival span, busy time recovered from TTFTs (each
    instance serves its requests one at a time in arrival order: service = finish - max(due, previous finish))."""
    ttft = result.ttft_samples_ms
    t0 = requests[0].arrival_s
    shares = []
    for j in range(INSTANCES):
        mine = [k for k in range(len(requests)) if route_round_robin(k, range(INSTANCES)) == j]
        busy, prev = 0.0, float("-inf")
        for k in mine:
            due = (requests[k].arrival_s - t0) * scale * 1e3
            finish = due + ttft[k]
            busy += finish - max(due, prev)
            prev = finish
        span = (requests[mine[-1]].arrival_s - requests[mine[0]].arrival_s) * scale * 1e3
        shares.append(busy / span if span > 0 else float("inf"))
    return statistics.mean(shares)


def bootstrap(values: Sequence[float], stat: Callable[[Sequence[float]], float], rng: random.Random
              ) -> tuple[float, float]:
    draws = sorted(stat(rng.choices(values, k=len(values))) for _ in range(RESAMPLES))
    return draws[int(0.025 * RESAMPLES)], draws[int(0.975 * RESAMPLES) - 1]


def diff_ci(a: Sequence[float], b: Sequence[float], rng: random.Random) -> tuple[float, float]:
    """Bootstrap 95% CI of median(a) - median(b), each arm's runs resampled on their own."""
    draws = sorted(statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(RESAMPLES))
    return draws[int(0.025 * RESAMPLES)], draws[int(0.975 * RESAMPLES) - 1]


def concurrent_phase(args: argparse.Namespace) -> int:
    """`none` and `p2p --pull always` at the same time, `args.concurrent` rounds; returns the runs that failed."""
    arms = (("none", "always"), ("p2p", "always"))
    print(f"\n== concurrent pairs: {arm_name(arms[0])} and {arm_name(arms[1])} at once, time scale "
          f"{args.time_scale} ==", flush=True)
    diffs50, diffs99, ratios50, bad = [], [], [], 0
    for round_ in range(args.concurrent):
        out: dict[str, ClusterResult] = {}
        errors: list[BaseException] = []

        def one(arm: tuple[str, str], out: dict[str, ClusterResult] = out, errors: list[BaseException] = errors
                ) -> None:
            try:
                out[arm[0]] = cluster_replay(ClusterSpec(
                    trace=TRACE, tiers=TIERS, instances=INSTANCES, sharing=arm[0], pull=arm[1], index="broadcast",
                    max_requests=args.requests, block_kib=args.block_kib, time_scale=args.time_scale))
            except BaseException as exc:  # reported below, after both arms ended
                errors.append(exc)

        meter = LoadMeter()
        threads = [threading.Thread(target=one, args=(arm,)) for arm in arms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load = meter.stop()
        if errors:
            raise errors[0]
        none, p2p = out["none"], out["p2p"]
        bad += sum(1 for r in (none, p2p) if r.completed != r.requests or r.corrupted_blocks)
        diffs50.append(p2p.ttft_ms.p50 - none.ttft_ms.p50)
        diffs99.append(p2p.ttft_ms.p99 - none.ttft_ms.p99)
        ratios50.append(p2p.ttft_ms.p50 / none.ttft_ms.p50 - 1)
        print(f"  round {round_}: TTFT p50 none {none.ttft_ms.p50:8.1f} p2p {p2p.ttft_ms.p50:8.1f} ms "
              f"({p2p.ttft_ms.p50 / none.ttft_ms.p50 - 1:+6.1%})  p99 none {none.ttft_ms.p99:8.1f} p2p "
              f"{p2p.ttft_ms.p99:8.1f} ms  peer hits {p2p.hit_ratio.peer:.4f}  wall {none.wall_s:.1f}/"
              f"{p2p.wall_s:.1f} s  load {load.loadavg_1m:.1f} busy {load.busy_fraction:.0%} steal "
              f"{load.steal_fraction:.1%}{'  NOISY' if load.noisy else ''}", flush=True)
    rng = random.Random(0)
    for label, diffs in (("p50", diffs50), ("p99", diffs99)):
        lo, hi = bootstrap(diffs, statistics.median, rng)
        lower = sum(1 for d in diffs if d < 0)
        verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0 (no difference shown)"
        print(f"p2p - none, TTFT {label}: median paired difference {statistics.median(diffs):+.1f} ms, 95% CI "
              f"[{lo:+.1f}, {hi:+.1f}]: {verdict}; p2p lower in {lower} of {len(diffs)} rounds (sign test, "
              f"one-sided p = {sign_test(lower, len(diffs)):.4f})")
    lo, hi = bootstrap(ratios50, statistics.median, rng)
    print(f"p2p / none - 1, TTFT p50: median {statistics.median(ratios50):+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}]")
    return bad


def sign_test(successes: int, n: int) -> float:
    """P(at least `successes` of n fair coin flips): how likely this many lower rounds are if p2p changed nothing."""
    return math.fsum(math.comb(n, k) for k in range(successes, n + 1)) / 2 ** n


def phase(label: str, scale: float, args: argparse.Namespace, requests: Sequence[Request],
          chosen: list[int]) -> dict[tuple[str, str], list[Run]]:
    print(f"\n== {label}: time scale {scale:.4f} wall s per trace s ==", flush=True)
    runs: dict[tuple[str, str], list[Run]] = {arm: [] for arm in ARMS}
    for round_ in range(args.repeats):
        order = ARMS[round_ % len(ARMS):] + ARMS[: round_ % len(ARMS)]
        for arm in order:
            meter = LoadMeter()
            r = cluster_replay(ClusterSpec(trace=TRACE, tiers=TIERS, instances=INSTANCES, sharing=arm[0], pull=arm[1],
                                           index="broadcast", max_requests=args.requests, block_kib=args.block_kib,
                                           time_scale=scale))
            load = meter.stop()
            runs[arm].append(Run(r, load))
            if r.completed != r.requests or r.corrupted_blocks:
                print(f"  ERROR: {r.completed}/{r.requests} completed, {r.corrupted_blocks} corrupted", flush=True)
            print(f"  round {round_} {arm_name(arm):>12}: TTFT p50 {r.ttft_ms.p50:8.1f} ms p99 {r.ttft_ms.p99:8.1f} "
                  f"ms  peer hits {r.hit_ratio.peer:.4f}  pulls {r.decisions['pull']} recomputes "
                  f"{r.decisions['recompute']}  util {utilisation(r, requests, scale):.2f}  load "
                  f"{load.loadavg_1m:.1f} busy {load.busy_fraction:.0%} steal {load.steal_fraction:.1%}"
                  f"{'  NOISY' if load.noisy else ''}", flush=True)
    report(runs, requests, scale, chosen)
    return runs


def report(runs: dict[tuple[str, str], list[Run]], requests: Sequence[Request], scale: float,
           chosen: list[int]) -> None:
    rng = random.Random(0)
    med = statistics.median
    p50 = {arm: [x.result.ttft_ms.p50 for x in rs] for arm, rs in runs.items()}
    p99 = {arm: [x.result.ttft_ms.p99 for x in rs] for arm, rs in runs.items()}
    for arm, rs in runs.items():
        lo50, hi50 = bootstrap(p50[arm], med, rng)
        lo99, hi99 = bootstrap(p99[arm], med, rng)
        util = med([utilisation(x.result, requests, scale) for x in rs])
        steal = max(x.load.steal_fraction for x in rs)
        print(f"{arm_name(arm):>12}: TTFT p50 {med(p50[arm]):8.1f} ms [{lo50:.1f}, {hi50:.1f}]  p99 "
              f"{med(p99[arm]):8.1f} ms [{lo99:.1f}, {hi99:.1f}]  peer hit ratio "
              f"{med([x.result.hit_ratio.peer for x in rs]):.4f}  utilisation {util:.2f}  load "
              f"{med([x.load.loadavg_1m for x in rs]):.1f} max steal {steal:.1%}  n={len(rs)}")
    base = ARMS[0]
    for arm in ARMS[1:]:
        d = med(p50[arm]) - med(p50[base])
        lo, hi = diff_ci(p50[arm], p50[base], rng)
        verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0 (no difference shown)"
        print(f"{arm_name(arm)} - none: TTFT p50 {d:+.1f} ms, 95% CI [{lo:+.1f}, {hi:+.1f}]: {verdict}")
        d99 = med(p99[arm]) - med(p99[base])
        lo, hi = diff_ci(p99[arm], p99[base], rng)
        print(f"{'':>{len(arm_name(arm))}}        TTFT p99 {d99:+.1f} ms, 95% CI [{lo:+.1f}, {hi:+.1f}]")
    print(f"requests with a peer-held block ({len(chosen)}): TTFT ms, median over rounds, paired by request index")
    print(f"{'request':>8} {'blocks':>6} " + " ".join(f"{arm_name(a):>12}" for a in ARMS))
    for k in chosen:
        cells = []
        for arm in ARMS:
            values = [x.result.ttft_samples_ms[k] for x in runs[arm] if len(x.result.ttft_samples_ms) > k]
            cells.append(f"{med(values):12.1f}" if values else f"{'-':>12}")
        print(f"{k:>8} {len(requests[k].hash_ids):>6} " + " ".join(cells))
    for arm in ARMS[1:]:
        diffs = [med([x.result.ttft_samples_ms[k] for x in runs[arm]])
                 - med([x.result.ttft_samples_ms[k] for x in runs[base]]) for k in chosen]
        print(f"  {arm_name(arm)} - none over these requests: median paired difference {med(diffs):+.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=8,
                        help="rounds of none and p2p run at the same time (0: skip)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the sequential phases (0: skip them)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--block-kib", type=int, default=16)
    parser.add_argument("--time-scale", type=float, default=ClusterSpec.time_scale,
                        help="the first phase's time scale (default: cluster replay's)")
    parser.add_argument("--target-util", type=float, default=1.2,
                        help="the backlogged phase's offered utilisation per instance")
    parser.add_argument("--backlog-scale", type=float, default=None,
                        help="the backlogged phase's time scale (default: chosen from measured utilisation)")
    parser.add_argument("--skip-default", action="store_true",
                        help="run only the backlogged phase, at --backlog-scale (the machine's load moves utilisation "
                             "more than the time scale does: rerun it at a scale measured under today's load)")
    args = parser.parse_args()
    if args.skip_default and args.backlog_scale is None:
        parser.error("--skip-default needs --backlog-scale")
    requests = read_trace(TRACE)[: args.requests]
    chosen = peer_held_requests(requests)
    refs = sum(len(r.hash_ids) for r in requests)
    print(f"{len(requests)} requests, {refs} block references; {len(chosen)} requests have a block a peer holds "
          f"(round-robin over {INSTANCES}): {chosen}")
    bad = concurrent_phase(args) if args.concurrent > 0 else 0
    if args.repeats <= 0:
        return 1 if bad else 0
    phases = []
    scale = args.backlog_scale
    if not args.skip_default:
        phases.append(phase("default time scale", args.time_scale, args, requests, chosen))
        util = statistics.median(utilisation(x.result, requests, args.time_scale) for x in phases[0][ARMS[0]])
        scale = args.backlog_scale or args.time_scale * util / args.target_util
        print(f"\nmeasured offered utilisation at time scale {args.time_scale}: {util:.2f} (median of the none "
              f"runs); backlogged phase at time scale {scale:.4f} (target utilisation {args.target_util})")
    assert scale is not None
    phases.append(phase("backlogged", scale, args, requests, chosen))
    bad += sum(1 for runs in phases for rs in runs.values() for x in rs
              if x.result.completed != x.result.requests or x.result.corrupted_blocks)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
