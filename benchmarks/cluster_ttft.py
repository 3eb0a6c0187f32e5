"""TTFT with and without peer sharing: 3 instances on the shared trace's first 300 requests, round-robin.

Arms `--sharing none` and `--sharing p2p` (broadcast index, then hash) alternate over `--repeats` rounds, so the
machine's changing load falls on each alike; the median over rounds of each arm's TTFT p50 is printed with the
ratio p2p / none (target: below 1), the peer hit ratio and the machine's load (a noisy run is flagged).

    .venv/bin/python benchmarks/cluster_ttft.py [--repeats 3] [--requests 300] [--block-kib 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from tieremu.cluster.replay import ClusterSpec, cluster_replay
from tieremu.record.stats import LoadMeter

ROOT = Path(__file__).resolve().parents[1]
ARMS = (("none", "broadcast"), ("p2p", "broadcast"), ("p2p", "hash"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--block-kib", type=int, default=16)
    parser.add_argument("--time-scale", type=float, default=0.05)
    args = parser.parse_args()
    p50: dict[tuple[str, str], list[float]] = {arm: [] for arm in ARMS}
    peer: dict[tuple[str, str], list[float]] = {arm: [] for arm in ARMS}
    meter = LoadMeter()
    for round_ in range(args.repeats):
        for sharing, index in ARMS:
            r = cluster_replay(ClusterSpec(trace=ROOT / "traces" / "mooncake_synthetic_trace.jsonl",
                                           tiers=ROOT / "configs" / "tiers" / "cluster-peer.yaml", instances=3,
                                           sharing=sharing, index=index, max_requests=args.requests,
                                           block_kib=args.block_kib, time_scale=args.time_scale))
            p50[(sharing, index)].append(r.ttft_ms.p50)
            peer[(sharing, index)].append(r.hit_ratio.peer)
            print(f"round {round_}: {sharing:>4} {index:>9}: TTFT p50 {r.ttft_ms.p50:9.1f} ms  p99 "
                  f"{r.ttft_ms.p99:9.1f} ms  peer hits {r.hit_ratio.peer:.4f}  pull p50 {r.pull_ms.p50:.2f} ms  "
                  f"estimator error {r.estimator_error}  corrupted {r.corrupted_blocks}", flush=True)
    load = meter.stop()
    base = statistics.median(p50[ARMS[0]])
    worse = 0
    for arm in ARMS:
        median = statistics.median(p50[arm])
        ratio = median / base
        worse += arm[0] == "p2p" and ratio >= 1
        print(f"{arm[0]:>4} {arm[1]:>9}: median TTFT p50 {median:9.1f} ms  ratio to none {ratio:.3f}  peer hit "
              f"ratio {statistics.median(peer[arm]):.4f}")
    print(f"load: {load.loadavg_1m:.1f} (1 min) on {load.cpus} CPUs, busy {load.busy_fraction:.0%}, steal "
          f"{load.steal_fraction:.0%}{'  NOISY' if load.noisy else ''}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
