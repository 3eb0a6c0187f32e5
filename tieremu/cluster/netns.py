"""Network namespaces joined by veth pairs, one namespace per instance, a veth pair per pair of instances (a full
mesh: each link shaped on its own), rate shaped with tbf on both ends; created and always removed by tieremu.

Before anything is created the names are written to a record file in the state directory (with this process's
id), so that a run that died (SIGKILL, power loss) is cleaned up by the next run (`cleanup_stale`). Removal
deletes the namespaces, which takes their veth ends and qdiscs with them. Commands are `ip` and `tc` with
argument lists, never a shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tieremu.cluster.link import LinkSpec
from tieremu.errors import ConfigError, WorkloadError
from tieremu.processes import alive

STATE_ENV = "TIEREMU_CLUSTER_STATE"
DEFAULT_STATE = "/run/tieremu/cluster"
PREFIX = "tmu"
SUBNET = 213  # 10.213.<pair>.1/30 and .2/30
MAX_INSTANCES = 8
TBF_LATENCY = "200ms"  # how long a packet may wait in tbf's queue before it is dropped


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV, DEFAULT_STATE))


def have_root() -> bool:
    return os.geteuid() == 0


def require_root() -> None:
    if not have_root():
        raise ConfigError("instances in network namespaces need root (ip netns, veth, tc); run as root, or use "
                          "the loopback transport: --no-namespaces (TCP on 127.0.0.1, rate paced by the transport)")


def run(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    except FileNotFoundError:
        raise WorkloadError(f"{args[0]} is not installed (iproute2 provides ip and tc)") from None
    if done.returncode:
        raise WorkloadError(f"{' '.join(args)} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


GSO_PACKET = 64 * 1024  # the largest packet the veth hands tbf (GSO/TSO on)
FRAME = 1514
BUCKET_S = 160e-6  # tbf's bucket holds this long of the rate (measured, see burst_bytes)


def burst_bytes(gbps: float) -> int:
    """tbf's bucket: 160 us of the rate, and at least two 64 KiB GSO packets and two frames.

    Why so deep: tbf refills the bucket from a timer (the qdisc watchdog). When the bucket holds one GSO packet, the
    link idles from the moment it empties until the timer fires, the softirq runs and TCP has queued the next packet;
    on this 2-vCPU VM that gap is tens of microseconds each time, and the sender's CPU per 4 MiB block rose from
    2.0 ms (unshaped) to 4.5 ms. Measured with benchmarks/link_shaping.py (4 MiB blocks, 10 us, 10 Gb/s, MTU 1500):
    a 68 KiB bucket gave +46..51% over latency + bytes / rate, 135 KB +17%, 200 KB (160 us) +10%; at 1 Gb/s the
    error stayed within +1..+7% for all of them. The price: a message that fits in the bucket after an idle moment
    passes at line rate (at 10 Gb/s a 4 MiB block then arrives at most 160 us, 5%, before the model says), so
    blocks well above the bucket are what the rate shapes; the link's record says `kernel-tbf` with this bucket."""
    return max(int(gbps * 1e9 / 8 * BUCKET_S), 2 * GSO_PACKET + 2 * FRAME)


@dataclass
class Mesh:
    instances: int
    link: LinkSpec
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    created: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.instances <= MAX_INSTANCES:
            raise ConfigError(f"instances={self.instances}: namespaces are made for 1..{MAX_INSTANCES} instances")

    @property
    def namespaces(self) -> list[str]:
        return [f"{PREFIX}{self.tag}n{i}" for i in range(self.instances)]

    def pairs(self) -> list[tuple[int, int, int]]:
        """(pair number, i, j) for i < j."""
        out, p = [], 0
        for i in range(self.instances):
            for j in range(i + 1, self.instances):
                out.append((p, i, j))
                p += 1
        return out

    def dev(self, i: int, j: int) -> str:
        """Instance i's end of the i-j veth pair (at most 15 characters)."""
        return f"{PREFIX}{self.tag}{i}{j}"

    def address(self, i: int, j: int) -> str:
        """Instance i's address on its link to j."""
        lo, hi = min(i, j), max(i, j)
        pair = next(p for p, a, b in self.pairs() if (a, b) == (lo, hi))
        return f"10.{SUBNET}.{pair}.{1 if i == lo else 2}"

    def record(self) -> Path:
        return state_dir() / f"{self.tag}.json"

    def create(self) -> None:
        """Record, then create: namespaces, loopback up, one veth pair per link with addresses, tbf on both ends."""
        require_root()
        path = self.record()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "namespaces": self.namespaces}))
        os.replace(tmp, path)
        self.created = True
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # Per namespace (gone with it): a pull after an idle moment must not restart TCP's slow start, or each
            # block pays round trips the link model does not have.
            run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"])
        rate = f"{int(self.link.gbps * 1e9)}bit"
        for _, i, j in self.pairs():
            a, b = self.dev(i, j), self.dev(j, i)
            run(["ip", "link", "add", a, "netns", self.namespaces[i], "type", "veth", "peer", "name", b, "netns",
                 self.namespaces[j]])
            for me, other, dev in ((i, j, a), (j, i, b)):
                ns = self.namespaces[me]
                run(["ip", "-n", ns, "addr", "add", f"{self.address(me, other)}/30", "dev", dev])
                run(["ip", "-n", ns, "link", "set", dev, "up"])
                run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                     str(burst_bytes(self.link.gbps)), "latency", TBF_LATENCY])

    def cut(self, i: int, j: int) -> None:
        """A partition of the i-j link: both ends down (100% loss, for every socket on it)."""
        run(["ip", "-n", self.namespaces[i], "link", "set", self.dev(i, j), "down"])
        run(["ip", "-n", self.namespaces[j], "link", "set", self.dev(j, i), "down"])

    def qdiscs(self) -> list[str]:
        """What the kernel says is attached to the veths (a check that shaping is in place)."""
        out = []
        for _, i, j in self.pairs():
            out.append(run(["tc", "-n", self.namespaces[i], "qdisc", "show", "dev", self.dev(i, j)]).strip())
        return out

    def destroy(self) -> None:
        if not self.created:
            return
        remove(self.namespaces)
        with contextlib.suppress(FileNotFoundError):
            self.record().unlink()
        self.created = False


def remove(namespaces: list[str]) -> None:
    """Delete the namespaces that exist (their veths and qdiscs go with them)."""
    existing = set(list_namespaces())
    for ns in namespaces:
        if ns in existing:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)


def list_namespaces() -> list[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False, timeout=30).stdout
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Remove what runs that died left behind (their record names a process that is gone); the names removed."""
    removed: list[str] = []
    folder = state_dir()
    if not folder.is_dir():
        return removed
    for path in folder.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = int(doc.get("pid", 0))
        if pid > 0 and alive(pid):
            continue
        remove(list(doc.get("namespaces", [])))
        removed += list(doc.get("namespaces", []))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed


