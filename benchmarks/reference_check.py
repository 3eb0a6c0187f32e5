"""Fidelity check of tieremu's probes against independent C programs compiled on the spot.

Runs, alternating A/B in one process tree on the same pinned CPU, (a) a standalone C pointer chase against
`tieremu probe`'s chase at 1 GiB, for 4 KiB and huge pages, and (b) a standalone C memcpy against the probe's
copy kernel. Prints both medians and the ratio; passes when latency is within 5% and copy bandwidth within 10%.

    .venv/bin/python benchmarks/reference_check.py [--rounds 5] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tieremu.probe.bandwidth import measure as measure_bandwidth
from tieremu.probe.latency import ChaseBuffer
from tieremu.probe.latency import measure as measure_latency
from tieremu.record.stats import LoadMeter

HERE = Path(__file__).resolve().parent
LATENCY_TOLERANCE = 0.05
COPY_TOLERANCE = 0.10


def build(name: str, out: Path) -> Path:
    exe = out / name
    subprocess.run(["cc", "-O2", "-o", str(exe), str(HERE / "reference" / f"{name}.c")], check=True)
    return exe


def run_pinned(cmd: list[str], cpu: int) -> list[float]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    return [float(v) for v in out.stdout.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds; each side reports its median")
    parser.add_argument("--size-mib", type=int, default=1024, help="chase working set (MiB)")
    parser.add_argument("--copy-mib", type=int, default=256, help="copy buffer size (MiB)")
    args = parser.parse_args()
    cpu = min(os.sched_getaffinity(0))
    size = args.size_mib << 20
    meter = LoadMeter()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        chase_exe, copy_exe = build("chase", Path(tmp)), build("copy", Path(tmp))
        print(f"pinned to CPU {cpu}; {args.rounds} alternating rounds; medians of rounds")
        print(f"{'measure':<34}{'reference C':>14}{'tieremu probe':>15}{'probe/ref':>11}  verdict")
        for huge in (False, True):
            ref, ours = [], []
            buffer = ChaseBuffer(size, 0, hugepages=huge)
            try:
                for _ in range(args.rounds):
                    ref.append(statistics.median(run_pinned([str(chase_exe), str(size), str(int(huge)), "0.2", "3"],
                                                            cpu)))
                    ours.append(measure_latency(buffer, cpu, repeats=3, seconds=0.2).ns.median)
            finally:
                buffer.close()
            failed |= report(f"latency {args.size_mib} MiB {'THP' if huge else '4 KiB'} (ns)", ref, ours,
                             LATENCY_TOLERANCE)
        ref, ours = [], []
        for _ in range(args.rounds):
            ref.append(statistics.median(run_pinned([str(copy_exe), str(args.copy_mib << 20), "5"], cpu)))
            point = measure_bandwidth("copy", (cpu,), 0, working_set=2 * (args.copy_mib << 20), repeats=3)
            ours.append(point.gb_per_s.median / 2)  # the probe counts copy STREAM-style (2x); the reference 1x
        failed |= report(f"copy {args.copy_mib} MiB, 1 thread (GB/s)", ref, ours, COPY_TOLERANCE)
    load = meter.stop()
    print(f"load {load.loadavg_1m:.2f} on {load.cpus} CPUs, steal {load.steal_fraction:.1%}"
          + (" — NOISY: rerun on a quiet machine" if load.noisy else ""))
    return 1 if failed else 0


def report(label: str, ref: list[float], ours: list[float], tolerance: float) -> bool:
    r, o = statistics.median(ref), statistics.median(ours)
    ratio = o / r
    ok = abs(ratio - 1) <= tolerance
    print(f"{label:<34}{r:>14.2f}{o:>15.2f}{ratio:>11.3f}  {'PASS' if ok else 'FAIL'} (±{tolerance:.0%})")
    return not ok


if __name__ == "__main__":
    sys.exit(main())
