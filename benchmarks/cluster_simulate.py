"""Cluster simulator speed: a 12,000-request synthetic trace (tieremu's `mix` generator, 16 requests/s) on 64
simulated instances, per router, and how the time grows with requests (its first 3,000 and 6,000 requests).

Each size runs `--repeats` times, sizes and routers interleaved (the machine is shared: medians, min-max, and the
load recorded so that a noisy run is flagged). Time is the simulation's own wall_s (trace generation excluded).
Targets: 12,000 requests on 64 instances under 30 s; 12,000 within 2.5x the time of 6,000 (about linear).

    .venv/bin/python benchmarks/cluster_simulate.py [--routers round-robin,cost] [--repeats 3] [--sharing p2p]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tieremu.cluster.routers import parse_router
from tieremu.cluster.servtime import reference
from tieremu.cluster.simulate import SimSettings, load_cluster_spec, simulate_cluster
from tieremu.record.stats import LoadMeter, Summary
from tieremu.workloads.generators import mix

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs" / "cluster" / "sim-hbm-dram.yaml"
TARGET_S = 30.0
TARGET_RATIO = 2.5  # time(12,000) / time(6,000)
SIZES = (3000, 6000, 12000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", default="round-robin,cost")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--sharing", default="none", choices=["none", "p2p"])
    args = parser.parse_args()
    requests = mix(SIZES[-1], seed=0, rate=16.0)
    spec = load_cluster_spec(SPEC)
    routers = args.routers.split(",")
    times: dict[tuple[str, int], list[float]] = {(r, n): [] for r in routers for n in SIZES}
    meter = LoadMeter()
    for _ in range(args.repeats):
        for router in routers:
            for n in SIZES:
                settings = SimSettings(args.instances, parse_router(router), sharing=args.sharing)
                times[(router, n)].append(simulate_cluster(requests[:n], spec, settings, reference()).wall_s)
    load = meter.stop()
    ok = True
    print(f"{args.instances} simulated instances, sharing {args.sharing}, {args.repeats} repeats (median, min-max); "
          f"load {load.loadavg_1m:.1f} on {load.cpus} CPUs, steal {load.steal_fraction:.1%}"
          f"{' NOISY' if load.noisy else ''}")
    print(f"{'router':<14}{'requests':>10}{'median s':>10}{'min-max s':>16}{'us/request':>12}")
    for router in routers:
        for n in SIZES:
            s = Summary.of(times[(router, n)])
            print(f"{router:<14}{n:>10}{s.median:>10.2f}{s.min:>8.2f}-{s.max:<7.2f}{s.median / n * 1e6:>12.0f}"
                  f"{'  noisy' if s.noisy else ''}")
        full = Summary.of(times[(router, SIZES[-1])]).median
        ratio = full / Summary.of(times[(router, SIZES[1])]).median
        within = full < TARGET_S and ratio < TARGET_RATIO
        ok &= within
        print(f"{router}: 12,000 requests in {full:.1f} s (target < {TARGET_S:.0f} s); 12,000 / 6,000 time ratio "
              f"{ratio:.2f} (linear: 2.00, target < {TARGET_RATIO}) -> {'ok' if within else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
