"""CLI start-up time: `tieremu --help` and `tieremu topo` as a user runs them (a fresh interpreter each time).

Each command runs `--repeats` times; the median wall time is printed with its ratio to the 0.5 s budget, and the
machine's load is recorded so that a noisy run is flagged, not hidden. Exits 1 when a median is over budget.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tieremu.record.stats import LoadMeter, Summary

BUDGET_S = 0.5
COMMANDS = (["--help"], ["topo"], ["topo", "--json"])


def wall_times(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tieremu", *args], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    meter = LoadMeter()
    over = []
    for args in COMMANDS:
        summary = Summary.of(wall_times(args, repeats))
        ratio = summary.median / BUDGET_S
        print(f"tieremu {' '.join(args):<12} median {summary.median:.3f} s (min {summary.min:.3f}, max "
              f"{summary.max:.3f}) = {ratio:.2f}x of the {BUDGET_S} s budget")
        if ratio > 1:
            over.append(" ".join(args))
    load = meter.stop()
    print(f"load {load.loadavg_1m:.2f} on {load.cpus} CPUs, steal {load.steal_fraction:.1%}"
          + (" — NOISY run" if load.noisy else ""))
    if over:
        print(f"over budget: {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
