"""Link shaping: measured pull time of one block vs the link's model, latency + bytes / bandwidth.

For each latency (10, 100 us) and bandwidth (1, 10 Gb/s) a block server (tieremu.cluster.wire) runs in one process
and a client in another, the way two instances of `tieremu cluster replay` do, under each shaping mechanism this
machine allows:

- kernel-tbf (root only): server and client in two network namespaces joined by a veth pair whose rate tbf
  shapes; the latency is paid by the transport (transport-delay: this kernel has no netem).
- transport-pacing: both on loopback, the server pacing the payload at the link's rate in ~50 us slices; the
  latency again by the transport (transport-delay).
- shm-pool: the shared-memory transport (tieremu.cluster.shm): the payload crosses a pool in /dev/shm bound to node
  0 (emulated CXL on this machine), paced by the transport; the request and the reply's checksum on loopback.

The client pulls the block `--repeats` times (2 ms apart, as between a request's blocks after tbf's bucket has
refilled). Printed per cell: the model, the median pull time with a distribution-free 95% confidence interval
(order statistics), the error of the median against the model, and whether it is within 20% (the issue's
target), beside the machine's load: a noisy run is flagged, not hidden. Pull time is what the instance measures:
request sent to last byte received and its CRC-32C checked. Namespaces and qdiscs are removed at the end, also on
Ctrl-C.

The default block is 4 MiB: a real KV block is bigger still (a 512-token block of a 7B model in fp16 is 256 MiB),
and at 10 Gb/s a smaller one is dominated by the fixed per-message cost of Python and the scheduler.

    .venv/bin/python benchmarks/link_shaping.py [--repeats 30] [--sizes-kib 4096] [--mechanisms tbf,pacing,shm]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tieremu.cluster.link import LinkSpec
from tieremu.cluster.netns import Mesh, cleanup_stale, have_root
from tieremu.cluster.shm import PoolSpec, ShmPool
from tieremu.cluster.shm import remove as remove_pool
from tieremu.cluster.wire import BlockClient, BlockServer, LinkState
from tieremu.record.stats import LoadMeter, percentile

LATENCIES_US = (10.0, 100.0)
GBPS = (1.0, 10.0)
TARGET = 0.2
HERE = str(Path(__file__).resolve())
MECHANISMS = {"tbf": "kernel-tbf", "pacing": "transport-pacing", "shm": "shm-pool"}
POOL_NODE = 0


def serve(host: str, link: LinkSpec, pace: bool, size: int, pool: ShmPool | None) -> None:
    """A block server holding one block of `size` bytes under key 1, until stdin closes; prints its port."""
    state = LinkState(link, pace=pace)
    block = bytes(range(256)) * (size // 256) + bytes(size % 256)
    server = BlockServer(host, 0, {1: block}.get, lambda _h: state, pool=pool, me=0)
    print(server.sock.getsockname()[1], flush=True)
    sys.stdin.readline()  # the client finished warming up: count this process's CPU from here
    cpu = time.process_time()
    sys.stdin.read()
    print(json.dumps({"cpu_s": time.process_time() - cpu, "served": server.served}), flush=True)
    server.close()


def pull(host: str, port: int, repeats: int, pool: ShmPool | None) -> dict[str, object]:
    client = BlockClient(host, port, pool, me=1, holder=0)
    for _ in range(50):  # the server's namespace may still be starting
        try:
            client.pull(1, 2.0)
            break
        except Exception:
            time.sleep(0.1)
    for _ in range(3):  # warm: buffers sized, windows open
        client.pull(1, 5.0)
    print("warm", flush=True)
    sys.stdin.readline()  # the server has started counting its CPU
    times, cpu = [], 0.0
    for _ in range(repeats):
        before = time.process_time()
        reply = client.pull(1, 5.0)
        cpu += time.process_time() - before
        assert reply.payload is not None
        times.append(reply.seconds)
        time.sleep(0.002)
    client.close()
    return {"times": times, "cpu_s": cpu}


def median_ci(values: list[float]) -> tuple[float, float]:
    """95% confidence interval of the median from order statistics (binomial, no distribution assumed)."""
    xs = sorted(values)
    n = len(xs)
    half = 1.96 * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return xs[lo], xs[hi]


@dataclass(frozen=True)
class Cell:
    mechanism: str
    link: LinkSpec
    size: int
    times: list[float]
    client_cpu_s: float  # per pull: this process's CPU (user + system), the kernel's work on its behalf included
    server_cpu_s: float

    @property
    def model(self) -> float:
        return self.link.seconds(self.size)

    @property
    def median(self) -> float:
        return percentile(self.times, 50)

    @property
    def error(self) -> float:
        return self.median / self.model - 1


def _run(prefix: list[str], serve_host: str, pull_host: str, client_prefix: list[str], link: LinkSpec, size: int,
         repeats: int, pace: bool, pool: ShmPool | None = None) -> tuple[list[float], float, float]:
    """(pull times, client CPU per pull, server CPU per pull)."""
    shared = json.dumps(pool.spec.to_json() if pool is not None else None)
    server = subprocess.Popen([*prefix, sys.executable, HERE, "--serve", serve_host, json.dumps(link.to_json()),
                               str(size), "1" if pace else "0", "--pool", shared], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        port = server.stdout.readline().strip()
        client = subprocess.Popen([*client_prefix, sys.executable, HERE, "--pull", pull_host, port, str(repeats),
                                   "--pool", shared], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdin is not None
        if client.stdout.readline().strip() != "warm":
            raise RuntimeError("the client did not start")
        server.stdin.write("go\n")
        server.stdin.flush()
        time.sleep(0.05)
        out, _ = client.communicate("go\n", timeout=600)
        if client.returncode:
            raise RuntimeError(f"the client failed ({client.returncode})")
        pulled = json.loads(out)
        served = json.loads(server.communicate("", timeout=30)[0])
        return pulled["times"], pulled["cpu_s"] / repeats, served["cpu_s"] / repeats
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def measure(mechanism: str, link: LinkSpec, size: int, repeats: int) -> Cell:
    if mechanism == "shm-pool":
        pool = ShmPool.create(2, size, POOL_NODE)
        try:
            return Cell(mechanism, link, size, *_run([], "127.0.0.1", "127.0.0.1", [], link, size, repeats,
                                                     pace=True, pool=pool))
        finally:
            pool.close()
            remove_pool(pool.spec.path)
    if mechanism == "transport-pacing":
        return Cell(mechanism, link, size, *_run([], "127.0.0.1", "127.0.0.1", [], link, size, repeats, pace=True))
    mesh = Mesh(2, link)
    try:
        mesh.create()
        ns = mesh.namespaces
        return Cell(mechanism, link, size, *_run(["ip", "netns", "exec", ns[0]], mesh.address(0, 1),
                                                 mesh.address(0, 1), ["ip", "netns", "exec", ns[1]], link, size,
                                                 repeats, pace=False))
    finally:
        mesh.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes-kib", default="4096", help="block sizes in KiB, comma separated (default 4096)")
    parser.add_argument("--mechanisms", default="tbf,pacing,shm",
                        help="tbf (root: namespaces), pacing (loopback), shm (shared-memory pool, paced)")
    parser.add_argument("--serve", nargs=4, metavar=("HOST", "LINK", "SIZE", "PACE"), help=argparse.SUPPRESS)
    parser.add_argument("--pull", nargs=3, metavar=("HOST", "PORT", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--pool", default="null", help=argparse.SUPPRESS)
    args = parser.parse_args()
    given = json.loads(args.pool)
    pool = None if given is None else ShmPool.attach(PoolSpec(**given))
    if args.serve:
        host, link, size, pace = args.serve
        serve(host, LinkSpec(**json.loads(link)), pace=pace == "1", size=int(size), pool=pool)
        return 0
    if args.pull:
        print(json.dumps(pull(args.pull[0], int(args.pull[1]), int(args.pull[2]), pool)))
        return 0
    wanted = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in MECHANISMS]
    if unknown:
        parser.error(f"--mechanisms {','.join(unknown)}: valid: {', '.join(MECHANISMS)}")
    mechanisms = [MECHANISMS[m] for m in wanted]
    if "kernel-tbf" in mechanisms and not have_root():
        print("not root: kernel-tbf (network namespaces) skipped")
        mechanisms.remove("kernel-tbf")
    if "kernel-tbf" in mechanisms:
        cleanup_stale()
    sizes = [int(s) * 1024 for s in args.sizes_kib.split(",")]
    print("pull time of one block vs latency + bytes / bandwidth; latency always by the transport (transport-delay)")
    print(f"{'rate shaped by':<17}{'lat us':>6}{'Gb/s':>6}{'KiB':>6}{'expected ms':>12}{'median ms':>10}"
          f"{'95% CI ms':>16}{'error':>8}  within 20%  CPU ms/pull client+server")
    meter = LoadMeter()
    misses = 0
    for mechanism in mechanisms:
        for latency in LATENCIES_US:
            for gbps in GBPS:
                for size in sizes:
                    cell = measure(mechanism, LinkSpec(latency, gbps), size, args.repeats)
                    lo, hi = median_ci(cell.times)
                    ok = abs(cell.error) <= TARGET
                    misses += not ok
                    print(f"{mechanism:<17}{latency:>6g}{gbps:>6g}{size // 1024:>6}{cell.model * 1e3:>12.3f}"
                          f"{cell.median * 1e3:>10.3f}{f'{lo * 1e3:.3f}-{hi * 1e3:.3f}':>16}{cell.error:>+8.0%}  "
                          f"{'yes' if ok else 'NO ':<10}  {cell.client_cpu_s * 1e3:.2f}+{cell.server_cpu_s * 1e3:.2f}",
                          flush=True)
    load = meter.stop()
    noisy = load.loadavg_1m > load.cpus * 0.5 or load.steal_fraction > 0.05
    print(f"load: {load.loadavg_1m:.1f} (1 min) on {load.cpus} CPUs, busy {load.busy_fraction:.0%}, steal "
          f"{load.steal_fraction:.0%}{'  (noisy: other work shared the CPUs)' if noisy else ''}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
