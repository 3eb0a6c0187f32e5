"""Link shaping: measured pull time of one block vs the link's latency + bytes / bandwidth.

For each latency (10, 100 us) and bandwidth (1, 10 Gb/s) and block size, a block server (tieremu.cluster.wire)
runs in one network namespace and a client in another, joined by a veth pair whose rate tbf shapes (root), or
both on loopback with the transport pacing the rate (not root). The client pulls the block `--repeats` times;
the median pull time is printed with its ratio to the model (target: within 20%, 0.8-1.2), beside the machine's
load (a noisy run is flagged, not hidden). Namespaces and qdiscs are removed at the end, also on Ctrl-C.

    .venv/bin/python benchmarks/link_shaping.py [--repeats 30] [--sizes-kib 64,1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tieremu.cluster.link import LinkSpec
from tieremu.cluster.netns import Mesh, cleanup_stale, have_root
from tieremu.cluster.wire import BlockClient, BlockServer, LinkState
from tieremu.record.stats import LoadMeter

LATENCIES_US = (10.0, 100.0)
GBPS = (1.0, 10.0)
PORT = 47100
TARGET = 0.2


def serve(host: str, port: int, link: LinkSpec, pace: bool, size: int) -> None:
    """A block server holding one block of `size` bytes under key 1, until stdin closes."""
    state = LinkState(link, pace=pace)
    server = BlockServer(host, port, {1: bytes(size)}.get, lambda _h: state)
    print("ready", flush=True)
    sys.stdin.read()
    server.close()


def pull(host: str, port: int, repeats: int) -> list[float]:
    client = BlockClient(host, port)
    for _ in range(50):  # the server's namespace may still be starting
        try:
            client.pull(1, 2.0)
            break
        except Exception:
            time.sleep(0.1)
    times = []
    for _ in range(repeats):
        times.append(client.pull(1, 5.0).seconds)
        time.sleep(0.002)  # tbf's bucket refills between pulls, as between a request's blocks
    client.close()
    return times


def one(link: LinkSpec, size: int, repeats: int, root: bool) -> float:
    here = str(Path(__file__).resolve())
    if not root:
        state = LinkState(link, pace=True)
        server = BlockServer("127.0.0.1", 0, {1: bytes(size)}.get, lambda _h: state)
        try:
            return statistics.median(pull("127.0.0.1", server.sock.getsockname()[1], repeats))
        finally:
            server.close()
    mesh = Mesh(2, link)
    try:
        mesh.create()
        args = [json.dumps(link.to_json()), str(size)]
        server = subprocess.Popen(["ip", "netns", "exec", mesh.namespaces[0], sys.executable, here, "--serve",
                                   mesh.address(0, 1), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            out = subprocess.run(["ip", "netns", "exec", mesh.namespaces[1], sys.executable, here, "--pull",
                                  mesh.address(0, 1), str(repeats)], capture_output=True, text=True, check=True)
            return statistics.median(json.loads(out.stdout))
        finally:
            server.communicate(timeout=10)
    finally:
        mesh.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes-kib", default="64,1024,4096")
    parser.add_argument("--serve", nargs=3, metavar=("HOST", "LINK", "SIZE"))
    parser.add_argument("--pull", nargs=2, metavar=("HOST", "REPEATS"))
    args = parser.parse_args()
    if args.serve:
        host, link, size = args.serve
        serve(host, PORT, LinkSpec(**json.loads(link)), pace=False, size=int(size))
        return 0
    if args.pull:
        print(json.dumps(pull(args.pull[0], PORT, int(args.pull[1]))))
        return 0
    root = have_root()
    if root:
        cleanup_stale()
    where = "rate by tbf on veth pairs between namespaces" if root else "loopback, rate paced by the transport"
    print(f"shaping: {where}; delay by the transport")
    print(f"{'latency us':>10} {'Gb/s':>6} {'block KiB':>9} {'model ms':>9} {'measured ms':>11} {'ratio':>6}  "
          "within 20%")
    meter = LoadMeter()
    misses = 0
    for latency in LATENCIES_US:
        for gbps in GBPS:
            for kib in (int(s) for s in args.sizes_kib.split(",")):
                link = LinkSpec(latency, gbps)
                size = kib * 1024
                model = link.seconds(size)
                measured = one(link, size, args.repeats, root)
                ratio = measured / model
                ok = abs(ratio - 1) <= TARGET
                misses += not ok
                print(f"{latency:>10g} {gbps:>6g} {kib:>9} {model * 1e3:>9.3f} {measured * 1e3:>11.3f} "
                      f"{ratio:>6.2f}  {'yes' if ok else 'NO'}")
    load = meter.stop()
    print(f"load: {load.loadavg_1m:.1f} (1 min) on {load.cpus} CPUs, busy {load.busy_fraction:.0%}, steal "
          f"{load.steal_fraction:.0%}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
