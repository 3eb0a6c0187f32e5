"""`tieremu daemon --pid`: tracking another process, the epoch loop against a scripted kernel, the kernel baseline's
counters, and every refusal. Real migration of a child's pages between nodes is in tests/vm/test_attach_vm.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixture_paths import fixture_root

from tieremu.cli import daemon as attach_cli
from tieremu.configfile import Section
from tieremu.daemon.attach import (
    AttachConfig,
    AttachedDaemon,
    AttachTier,
    KernelPages,
    TargetExitedError,
    attach,
    default_tiers,
    tiers_from_map,
)
from tieremu.daemon.kernel import KernelTiering, parse_vmstat
from tieremu.daemon.proctrack import (
    AttachError,
    ChunkActivity,
    ProcessTracker,
    Region,
    RegionPages,
    Sample,
    TargetGoneError,
    Vma,
    chunk_activity,
    parse_smaps,
    select_regions,
)
from tieremu.errors import NodeFullError, PolicyError
from tieremu.numa.pages import PAGE_SIZE
from tieremu.numa.topology import discover
from tieremu.policy.base import BlockView, Move, Plan, Policy, first_unpinned
from tieremu.policy.engine import DEFAULT_PING_PONG_EPOCHS
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import parse_tier_map

MIB = 1 << 20
CHUNK = 2 * MIB
PAGES_PER_CHUNK = CHUNK // PAGE_SIZE
REPO = Path(__file__).resolve().parents[1]

# A process with a cold and a hot region (cold at the lower address, so admission in address order does not put the
# hot one first) in separate VMAs (a PROT_NONE guard chunk splits the mapping), both chunk-aligned and without huge
# pages, filled with a pattern whose checksum it keeps. Standard library only: it also runs inside the QEMU guest,
# where importing numpy takes seconds. It answers one line per command: "read hot|cold", "write hot|cold" -> "ok";
# "spin hot|cold SECONDS" (read it over and over) -> "ok"; "crc" -> the checksum of both regions now; "exit".
CHILD_SOURCE = r"""
import ctypes, json, sys, time, zlib
MIB, CHUNK, PAGE = 1 << 20, 2 << 20, 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
sizes = {"hot": int(sys.argv[1]) * MIB, "cold": int(sys.argv[2]) * MIB}
total = sizes["cold"] + CHUNK + sizes["hot"]
base = libc.mmap(None, total + CHUNK, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
if base is None or base == ctypes.c_void_p(-1).value:
    sys.exit("mmap failed")
start = (base + CHUNK - 1) // CHUNK * CHUNK
if libc.madvise(start, total, 15) or libc.mprotect(start + sizes["cold"], CHUNK, 0):  # MADV_NOHUGEPAGE, PROT_NONE
    sys.exit("madvise/mprotect failed")
addr = {"cold": start, "hot": start + sizes["cold"] + CHUNK}
for name in ("hot", "cold"):
    for off in range(0, sizes[name], PAGE):
        ctypes.memset(addr[name] + off, (addr[name] + off) // PAGE % 251 + 1, PAGE)
def crc():
    return zlib.crc32(ctypes.string_at(addr["hot"], sizes["hot"]) + ctypes.string_at(addr["cold"], sizes["cold"]))
print(json.dumps({"hot": [addr["hot"], sizes["hot"]], "cold": [addr["cold"], sizes["cold"]], "crc": crc()}),
      flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "exit":
        break
    if cmd[0] == "crc":
        print(crc(), flush=True)
        continue
    buf = (ctypes.c_ubyte * sizes[cmd[1]]).from_address(addr[cmd[1]])
    until = time.monotonic() + (float(cmd[2]) if cmd[0] == "spin" else 0.0)
    while True:
        for off in range(0, sizes[cmd[1]], PAGE):
            if cmd[0] == "write":
                buf[off] = buf[off]  # same value: the checksum holds, the page is written
            else:
                buf[off] + 0
        if time.monotonic() >= until:
            break
    print("ok", flush=True)
"""


@dataclass
class Child:
    """A running CHILD_SOURCE process; `ask` sends a command and returns its answer."""

    proc: subprocess.Popen[str]
    regions: dict[str, tuple[int, int]]
    crc: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def chunks(self, name: str) -> set[int]:
        start, size = self.regions[name]
        return set(range(start // CHUNK, (start + size) // CHUNK))

    def pages(self, name: str) -> np.ndarray:
        start, size = self.regions[name]
        return np.arange(start, start + size, PAGE_SIZE, dtype=np.uint64)


def spawn_child(hot_mib: int, cold_mib: int, *, before_alloc: Callable[[int], None] | None = None) -> Child:
    """Start a child; before_alloc(pid) runs before it allocates (e.g. to put it in a cgroup)."""
    code = CHILD_SOURCE if before_alloc is None else "import sys; sys.stdin.readline()\n" + CHILD_SOURCE
    proc = subprocess.Popen([sys.executable, "-c", code, str(hot_mib), str(cold_mib)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if before_alloc is not None:
        before_alloc(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=60)
        raise RuntimeError(f"child exited with {proc.returncode} before it was ready")
    info = json.loads(line)
    return Child(proc, {"hot": tuple(info["hot"]), "cold": tuple(info["cold"])}, info["crc"])


def stop_child(child: Child) -> None:
    if child.proc.poll() is None:
        child.ask("exit")
    child.proc.wait(timeout=60)


@pytest.fixture
def child() -> Iterator[Child]:
    c = spawn_child(8, 8)
    try:
        yield c
    finally:
        stop_child(c)


# -- smaps and the chunk rule --------------------------------------------------------------------------------

SMAPS = """\
55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0                          [heap]
Size:               4096 kB
Rss:                4096 kB
Referenced:         1024 kB
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                2048 kB
Referenced:            0 kB
Anonymous:          2048 kB
7f0000400000-7f0000500000 rw-p 00000000 00:00 0
Rss:                1024 kB
Referenced:         1024 kB
7f0000500000-7f0000900000 ---p 00000000 00:00 0
Rss:                   0 kB
7f0000900000-7f0000d00000 rw-p 00000000 00:00 0                          [anon:kv cache]
Rss:                4096 kB
Referenced:         4096 kB
7f1000000000-7f1000400000 r--p 00000000 08:01 1234                       /usr/lib/libtorch.so
Rss:                4096 kB
Referenced:         4096 kB
7ffd00000000-7ffd00400000 rw-p 00000000 00:00 0                          [stack]
Rss:                  64 kB
Referenced:           64 kB
"""


def test_smaps_regions_keep_anonymous_read_write_mappings_above_the_minimum() -> None:
    regions = parse_smaps(SMAPS)
    assert [(r.vma.start, r.vma.size, r.rss_bytes, r.referenced_bytes) for r in regions[:2]] == [
        (0x55D0C0000000, 4 * MIB, 4 * MIB, MIB), (0x7F0000000000, 4 * MIB, 2 * MIB, 0)]
    kept = select_regions(regions, 2 * MIB)
    # the 1 MiB region is below the minimum; PROT_NONE, the library and the stack are not data
    assert [r.vma.path for r in kept] == ["[heap]", "", "[anon:kv cache]"]
    assert [r.vma.path for r in select_regions(regions, MIB)] == ["[heap]", "", "", "[anon:kv cache]"]


def _region_pages(start: int, chunks: int, *, present: Iterable[int], referenced_pages: int,
                  dirty: Iterable[int] | None = None) -> RegionPages:
    n = chunks * PAGES_PER_CHUNK
    addrs = np.arange(start, start + n * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
    present_mask = np.zeros(n, dtype=bool)
    present_mask[list(present)] = True
    dirty_mask = None
    if dirty is not None:
        dirty_mask = np.zeros(n, dtype=bool)
        dirty_mask[list(dirty)] = True
    vma = Vma(start, start + n * PAGE_SIZE, "rw-p", 0, "")
    return RegionPages(Region(vma, int(present_mask.sum()) * PAGE_SIZE, referenced_pages * PAGE_SIZE), addrs,
                       present_mask, dirty_mask)


def test_new_pages_mark_their_chunk_and_unexplained_references_mark_the_whole_region() -> None:
    a, b, c = 100 * CHUNK, 200 * CHUNK, 300 * CHUNK
    everything = range(2 * PAGES_PER_CHUNK)
    before = np.concatenate([np.arange(x, x + 2 * CHUNK, PAGE_SIZE, dtype=np.uint64) for x in (a, b, c)])
    # a: 3 new pages in its second chunk and exactly 3 pages referenced: only that chunk was touched.
    # b: nothing new but 10 pages referenced: read somewhere in b, so both of b's chunks count.
    # c: nothing new, nothing referenced.
    grown = [*everything, 2 * PAGES_PER_CHUNK, 2 * PAGES_PER_CHUNK + 1, 2 * PAGES_PER_CHUNK + 2]
    regions = [_region_pages(a, 3, present=grown, referenced_pages=3),
               _region_pages(b, 2, present=everything, referenced_pages=10),
               _region_pages(c, 2, present=everything, referenced_pages=0)]
    chunks, smeared, present = chunk_activity(regions, np.sort(before), CHUNK)
    assert {k: v.referenced for k, v in chunks.items()} == {
        100: False, 101: False, 102: True, 200: True, 201: True, 300: False, 301: False}
    assert chunks[102].new_pages == 3 and chunks[102].present_pages == 3 and chunks[101].present_pages == 512
    assert all(v.written_pages is None for v in chunks.values())
    assert smeared == 1 and present.size == before.size + 3


def test_soft_dirty_pages_mark_their_chunk_exactly() -> None:
    start = 50 * CHUNK
    everything = list(range(4 * PAGES_PER_CHUNK))
    previous = np.arange(start, start + 4 * CHUNK, PAGE_SIZE, dtype=np.uint64)
    written = [5, 2 * PAGES_PER_CHUNK + 7, 2 * PAGES_PER_CHUNK + 8]
    chunks, smeared, _ = chunk_activity(
        [_region_pages(start, 4, present=everything, referenced_pages=3, dirty=written)], previous, CHUNK)
    assert {k: (v.referenced, v.written_pages) for k, v in chunks.items()} == {
        50: (True, 1), 51: (False, 0), 52: (True, 2), 53: (False, 0)}
    assert smeared == 0
    # More references than written pages: something was read where pagemap cannot see, so every chunk counts.
    chunks, smeared, _ = chunk_activity(
        [_region_pages(start, 4, present=everything, referenced_pages=4, dirty=written)], previous, CHUNK)
    assert all(v.referenced for v in chunks.values()) and smeared == 1


# -- a real child process on this machine --------------------------------------------------------------------


def test_tracker_sees_which_region_of_a_child_was_read_or_written(child: Child) -> None:
    tracker = ProcessTracker(child.pid)
    tracker.check_access()
    tracker.start()
    ours = child.chunks("hot") | child.chunks("cold")

    assert child.ask("read hot") == "ok"
    sample = tracker.sample()
    assert ours <= set(sample.chunks)
    assert {c for c in ours if sample.chunks[c].referenced} == child.chunks("hot")
    assert all(sample.chunks[c].present_pages == PAGES_PER_CHUNK and sample.chunks[c].new_pages == 0 for c in ours)

    sample = tracker.sample()  # nothing touched since
    assert not any(sample.chunks[c].referenced for c in ours)

    assert child.ask("write cold") == "ok"
    sample = tracker.sample()
    assert {c for c in ours if sample.chunks[c].referenced} == child.chunks("cold")
    if tracker.soft_dirty:
        assert all(sample.chunks[c].written_pages == PAGES_PER_CHUNK for c in child.chunks("cold"))
    assert child.ask("crc") == str(child.crc)


def test_placement_of_a_childs_pages_is_asked_of_the_kernel_by_pid(child: Child, memory_nodes: tuple[int, ...]) -> None:
    status = KernelPages().query(child.pid, child.pages("hot"))
    assert status.size == 8 * MIB // PAGE_SIZE
    assert set(np.unique(status).tolist()) <= set(memory_nodes)
    if len(memory_nodes) == 1:
        assert set(np.unique(status).tolist()) == {memory_nodes[0]}


def test_a_child_that_exits_is_named_while_tracked_and_before() -> None:
    c = spawn_child(2, 2)
    tracker = ProcessTracker(c.pid)
    tracker.start()
    assert c.proc.stdin is not None and c.proc.stdout is not None
    c.proc.stdin.write("exit\n")
    c.proc.stdin.flush()
    os.waitid(os.P_PID, c.pid, os.WEXITED | os.WNOWAIT)  # returns once it is a zombie, without reaping it
    with pytest.raises(TargetGoneError, match=rf"process {c.pid} exited while it was tracked"):
        tracker.sample()
    with pytest.raises(TargetGoneError, match=rf"process {c.pid} has exited \(it is a zombie"):
        ProcessTracker(c.pid).check_access()
    c.proc.wait(timeout=60)
    with pytest.raises(TargetGoneError, match=rf"process {c.pid} does not exist; give the pid of a running"):
        ProcessTracker(c.pid).check_access()


def unused_pid() -> int:
    """pid_max itself is never handed out (pids run below it)."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def test_attach_to_a_pid_that_does_not_exist_names_it() -> None:
    pid = unused_pid()
    with pytest.raises(AttachError, match=rf"process {pid} does not exist"):
        attach(AttachConfig(pid=pid, policy="lru"))


def test_attach_on_one_node_says_there_is_nowhere_to_move(child: Child, memory_nodes: tuple[int, ...]) -> None:
    if len(memory_nodes) > 1:
        pytest.skip(f"checks the one-node refusal; this machine has memory nodes {memory_nodes}")
    with pytest.raises(AttachError, match=rf"process {child.pid} can be tracked, but this machine has one memory "
                                          r"node \(node 0\): there is no other tier"):
        attach(AttachConfig(pid=child.pid, policy="hotcold"), has_cap_sys_nice=lambda: True)
    with pytest.raises(AttachError, match=r"tier cxl of cxl-expander: node 1 does not exist or has no memory on this "
                                          r"machine \(memory nodes: 0\)"):
        attach(AttachConfig(pid=child.pid, policy="hotcold", tier_file=REPO / "configs/tiers/cxl-expander.yaml"),
               has_cap_sys_nice=lambda: True)
    # tracking still works: the refusal is about moving, not about the process
    assert child.ask("read hot") == "ok"


CAPSH = shutil.which("capsh")


@pytest.mark.skipif(CAPSH is None, reason="capsh (libcap2-bin) missing; scripts/bootstrap.sh installs it")
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping a capability with capsh needs root")
def test_without_cap_sys_nice_attach_is_refused_naming_pid_and_capability(child: Child) -> None:
    code = ("from tieremu.daemon.attach import attach, AttachConfig\n"
            "from tieremu.errors import TieremuError\n"
            "import os\n"
            "try:\n"
            f"    attach(AttachConfig(pid={child.pid}, policy='lru'))\n"
            "except TieremuError as e:\n"
            "    print('refused:', e)\n")
    env = {"PATH": "/usr/bin:/bin", "TIEREMU_TEST_CODE": code, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([str(CAPSH), "--drop=cap_sys_nice", "--", "-c", f"{sys.executable} -c \"$TIEREMU_TEST_CODE\""],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"refused: process {child.pid}: moving its pages needs CAP_SYS_NICE" in out.stdout, out.stdout


# -- the loop against a scripted kernel ----------------------------------------------------------------------


class FakeNuma:
    """A kernel that knows where every page is; pages it has not seen are on `default`."""

    def __init__(self, default: int = 0) -> None:
        self.node: dict[int, int] = {}
        self.default = default
        self.full: set[int] = set()  # nodes whose move_pages call fails with ENOMEM
        self.busy_reported: set[int] = set()  # pages reported EBUSY although they moved (THP subpages)
        self.busy: set[int] = set()  # pages that stay put with EBUSY
        self.moves: list[tuple[int, int]] = []  # (pages, node) per move call

    def query(self, pid: int, pages: np.ndarray) -> np.ndarray:
        return np.array([self.node.get(int(p), self.default) for p in pages], dtype=np.int32)

    def move(self, pid: int, pages: np.ndarray, node: int) -> np.ndarray:
        self.moves.append((len(pages), node))
        if node in self.full:
            raise NodeFullError(f"move_pages(to node {node}) failed: not enough free memory", call="move_pages",
                                errno=errno.ENOMEM, nodes=(node,))
        out = []
        for p in (int(p) for p in pages):
            if p in self.busy:
                out.append(-errno.EBUSY)
                continue
            self.node[p] = node
            out.append(-errno.EBUSY if p in self.busy_reported else node)
        return np.array(out, dtype=np.int32)

    def put(self, chunk: int, node: int) -> None:
        for p in chunk_pages(chunk):
            self.node[int(p)] = node

    def nodes_of(self, chunk: int) -> set[int]:
        return set(self.query(0, chunk_pages(chunk)).tolist())


def chunk_pages(chunk: int) -> np.ndarray:
    return np.arange(chunk * CHUNK, (chunk + 1) * CHUNK, PAGE_SIZE, dtype=np.uint64)


class ScriptedTracker:
    """Chunks fully present; `hot` are referenced every epoch; the process is gone from epoch `gone_at`."""

    pid = 4242
    chunk_bytes = CHUNK
    method = "scripted"

    def __init__(self, chunks: Iterable[int], hot: Iterable[int] = (), gone_at: int | None = None) -> None:
        self.chunks = list(chunks)
        self.hot = set(hot)
        self.gone_at = gone_at
        self.started = 0
        self.forgotten = 0
        self.epochs = 0

    def start(self) -> None:
        self.started += 1

    def forget_writes(self) -> None:
        self.forgotten += 1

    def sample(self) -> Sample:
        self.epochs += 1
        if self.gone_at is not None and self.epochs >= self.gone_at:
            raise TargetGoneError(f"process {self.pid} exited while it was tracked", pid=self.pid)
        chunks = {c: ChunkActivity(c, chunk_pages(c), 0, None, c in self.hot) for c in self.chunks}
        return Sample(float(self.epochs), (), chunks, 0, np.empty(0, dtype=np.uint64))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def kernel_root(tmp_path: Path, *, vmstat: dict[str, int] | None = None, numa_balancing: int = 2,
                demotion: bool = True, tiers: dict[int, str] | None = None, has_memory: str = "0-2") -> Path:
    """A tree with what KernelTiering reads."""
    root = tmp_path / "root"
    files = {
        "proc/vmstat": "".join(f"{k} {v}\n" for k, v in (vmstat or {"pgpromote_success": 0}).items()),
        "proc/sys/kernel/numa_balancing": f"{numa_balancing}\n",
        "sys/kernel/mm/numa/demotion_enabled": "true\n" if demotion else "false\n",
        "sys/devices/system/node/has_memory": has_memory + "\n",
    }
    for tier, nodes in (tiers if tiers is not None else {4: "0", 28: "1", 67: "2"}).items():
        files[f"sys/devices/virtual/memory_tiering/memory_tier{tier}/nodelist"] = nodes + "\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


TWO_TIERS = (AttachTier("fast", 0, (0,), 2), AttachTier("slow", 1, (1,), None))


def daemon_for(tmp_path: Path, policy: Policy | None, tracker: ScriptedTracker, numa: FakeNuma, *,
               tiers: tuple[AttachTier, ...] = TWO_TIERS, budget_gbps: float | None = None,
               epoch_s: float = 0.5, clock: FakeClock | None = None) -> AttachedDaemon:
    clock = clock or FakeClock()
    config = AttachConfig(pid=tracker.pid, policy=getattr(policy, "name", "kernel"), epoch_s=epoch_s,
                          budget_gbps=budget_gbps, sample_pages=0)
    return AttachedDaemon(config, tiers, policy, tracker, numa, KernelTiering(kernel_root(tmp_path)), clock=clock,
                          sleep=clock.sleep)


def test_hotcold_moves_hot_chunks_up_and_cold_down_and_records_each_migration(tmp_path: Path) -> None:
    numa = FakeNuma()
    tracker = ScriptedTracker(range(100, 106), hot={104, 105})
    daemon = daemon_for(tmp_path, get_policy("hotcold", {"target_util": 1.0, "quota": 8}), tracker, numa)
    daemon.start()
    first = daemon.epoch()
    later = [daemon.epoch() for _ in range(3)]

    assert {c: numa.nodes_of(c) for c in range(100, 106)} == {
        100: {1}, 101: {1}, 102: {1}, 103: {1}, 104: {0}, 105: {0}}
    result = daemon.finish("stopped")
    # admission puts 100-101 in fast (2 chunks) and moves 102-105 down; the plan then swaps 100, 101 for 104, 105
    assert first.migrations == 8 and first.chunks_by_tier == {"fast": 2, "slow": 4}
    assert [e.migrations for e in later] == [0, 0, 0]
    assert result.count("promote") == 2 and result.count("demote") == 6
    assert all(m.pages == m.moved == PAGES_PER_CHUNK and m.bytes == CHUNK and m.outcome == "moved"
               for m in result.migrations)
    promoted = sorted((m.chunk, m.source_node, m.target_node) for m in result.migrations if m.reason == "promote")
    assert promoted == [(104, 1, 0), (105, 1, 0)]
    assert result.moved_bytes == 8 * CHUNK and result.failed_pages == {} and result.moved_by_others == 0
    assert result.chunks_tracked == 6 and result.summary()["chunks_by_tier_at_end"] == {"fast": 2, "slow": 4}
    assert tracker.forgotten == 1  # soft-dirty is cleared again after the one epoch that moved pages


def test_budget_spreads_migrations_over_epochs_and_counts_what_waited(tmp_path: Path) -> None:
    numa = FakeNuma()
    tracker = ScriptedTracker(range(10, 14))
    tiers = (AttachTier("fast", 0, (0,)), AttachTier("slow", 1, (1,)))
    # 1.5 chunks per epoch: the bucket holds at most that, so exactly one chunk moves per epoch
    daemon = daemon_for(tmp_path, get_policy("all-slowest"), tracker, numa, tiers=tiers,
                        budget_gbps=1.5 * CHUNK / 0.5 / 1e9)
    daemon.start()
    epochs = [daemon.epoch() for _ in range(5)]
    assert [e.moved_bytes for e in epochs] == [CHUNK, CHUNK, CHUNK, CHUNK, 0]
    assert all(numa.nodes_of(c) == {1} for c in range(10, 14))
    result = daemon.finish("stopped")
    assert result.skipped["budget"] == 3 + 2 + 1
    assert [e.chunks_by_tier for e in epochs][-1] == {"fast": 0, "slow": 4}


def test_ebusy_is_asked_again_and_pages_that_stay_busy_are_counted(tmp_path: Path) -> None:
    numa = FakeNuma()
    first, second = chunk_pages(20), chunk_pages(21)
    numa.busy_reported = {int(first[0])}  # moved, but reported busy
    numa.busy = {int(p) for p in second[:10]}  # really stuck
    tiers = (AttachTier("fast", 0, (0,)), AttachTier("slow", 1, (1,)))
    daemon = daemon_for(tmp_path, get_policy("all-slowest"), ScriptedTracker([20, 21]), numa, tiers=tiers)
    daemon.start()
    daemon.epoch()
    daemon.epoch()
    result = daemon.finish("stopped")
    by_chunk = {m.chunk: m for m in result.migrations}
    assert set(by_chunk) == {20, 21} and len(result.migrations) == 2  # the stuck pages do not bring the chunk back
    assert (by_chunk[20].outcome, by_chunk[20].moved, by_chunk[20].failed, by_chunk[20].busy_rechecked) == (
        "moved", PAGES_PER_CHUNK, {}, 1)
    assert (by_chunk[21].outcome, by_chunk[21].moved, by_chunk[21].failed) == (
        "partial", PAGES_PER_CHUNK - 10, {"EBUSY": 10})
    assert numa.nodes_of(21) == {0, 1} and result.failed_pages == {"EBUSY": 10}
    assert result.epochs[-1].chunks_by_tier == {"fast": 0, "slow": 2}


def test_a_full_node_fails_the_move_with_enomem_and_it_is_retried_next_epoch(tmp_path: Path) -> None:
    numa = FakeNuma()
    numa.full = {1}
    tiers = (AttachTier("fast", 0, (0,)), AttachTier("slow", 1, (1,)))
    daemon = daemon_for(tmp_path, get_policy("all-slowest"), ScriptedTracker([30]), numa, tiers=tiers)
    daemon.start()
    daemon.epoch()
    daemon.epoch()
    numa.full.clear()
    daemon.epoch()
    result = daemon.finish("stopped")
    assert [(m.epoch, m.outcome, m.moved, m.failed) for m in result.migrations] == [
        (1, "failed", 0, {"ENOMEM": PAGES_PER_CHUNK}), (2, "failed", 0, {"ENOMEM": PAGES_PER_CHUNK}),
        (3, "moved", PAGES_PER_CHUNK, {})]
    assert numa.nodes_of(30) == {1} and result.failed_pages == {"ENOMEM": 2 * PAGES_PER_CHUNK}


def test_chunks_moved_by_the_kernel_are_counted_and_planned_moves_of_them_skipped(tmp_path: Path) -> None:
    numa = FakeNuma()
    tiers = (AttachTier("fast", 0, (0,)), AttachTier("slow", 1, (1,)))
    daemon = daemon_for(tmp_path, None, ScriptedTracker(range(40, 44)), numa, tiers=tiers)
    daemon.start()
    assert daemon.epoch().chunks_by_tier == {"fast": 4, "slow": 0}
    numa.put(41, 1)  # the kernel demoted one chunk
    numa.put(42, 1)
    second = daemon.epoch()
    assert (second.moved_by_others, second.chunks_by_tier, second.migrations) == (2, {"fast": 2, "slow": 2}, 0)
    numa.put(42, 0)  # and promoted one back
    assert daemon.epoch().moved_by_others == 1
    result = daemon.finish("stopped")
    assert result.moved_by_others == 3 and result.migrations == [] and result.policy == "kernel"


class Careless(Policy):
    """Admits to a tier that does not exist."""

    name = "careless"

    def admit(self, block: int, view: BlockView) -> str:
        return "nowhere"

    def victim(self, tier: str, view: BlockView) -> int:
        return next(iter(view.blocks_in(tier)))


class Evicting(Careless):
    """Admits where the chunk is, then asks to evict everything: the daemon cannot drop another process's memory."""

    name = "evicting"

    def admit(self, block: int, view: BlockView) -> str:
        return view.tiers[0].name

    def plan(self, view: BlockView, now: float) -> Plan:
        return Plan(evictions=list(view.blocks_in(view.tiers[0].name)))


def test_a_policy_naming_an_unknown_tier_or_evicting_is_handled(tmp_path: Path) -> None:
    daemon = daemon_for(tmp_path, Careless(), ScriptedTracker([1]), FakeNuma())
    daemon.start()
    with pytest.raises(PolicyError, match=r"policy careless: admit named tier 'nowhere'; tiers: fast, slow"):
        daemon.epoch()
    daemon = daemon_for(tmp_path, Evicting(), ScriptedTracker([1, 2]), FakeNuma())
    daemon.start()
    daemon.epoch()
    daemon.epoch()
    result = daemon.finish("stopped")
    assert result.skipped == {"eviction": 4} and result.migrations == []


class Scripted(Policy):
    """Admits each chunk to the tier given, pushes out the oldest chunk of a tier, plans the moves given for each
    epoch, and records the victims it was asked for and the moves it was told of."""

    name = "scripted"

    def __init__(self, admits: dict[int, str], plans: dict[int, list[Move]]) -> None:
        super().__init__()
        self.admits, self.plans, self.epochs = admits, plans, 0
        self.asked: list[str] = []
        self.told: list[tuple[int, str, str | None]] = []

    def admit(self, block: int, view: BlockView) -> str:
        return self.admits[block]

    def victim(self, tier: str, view: BlockView) -> int:
        self.asked.append(tier)
        return first_unpinned(view, tier)

    def plan(self, view: BlockView, now: float) -> Plan:
        self.epochs += 1
        return Plan(moves=self.plans.get(self.epochs, []))

    def moved(self, block: int, source: str, target: str | None) -> None:
        self.told.append((block, source, target))


THREE_TIERS = (AttachTier("fast", 0, (0,), 1), AttachTier("mid", 1, (1,), 1), AttachTier("slow", 2, (2,), None))


def test_a_full_fast_tier_pushes_the_policys_victims_down_deepest_first_and_a_move_back_is_a_ping_pong(
        tmp_path: Path) -> None:
    numa = FakeNuma()
    for chunk, node in ((1, 0), (2, 1), (3, 2)):
        numa.put(chunk, node)
    back = 3 + DEFAULT_PING_PONG_EPOCHS + 1  # one epoch past the window after chunk 3's move down
    policy = Scripted({1: "fast", 2: "mid", 3: "slow"}, {
        2: [Move(3, "slow", "fast", "promote")], 3: [Move(3, "fast", "slow", "demote")],
        back: [Move(3, "slow", "fast", "promote")]})
    daemon = daemon_for(tmp_path, policy, ScriptedTracker([1, 2, 3]), numa, tiers=THREE_TIERS)
    daemon.start()
    assert daemon.epoch().migrations == 0  # each admitted where it is: fast and mid exactly full
    second = daemon.epoch()
    result = daemon.result
    # fast is full: its victim (1) must go to mid, which is full too: mid's victim (2) goes to slow first
    assert policy.asked == ["fast", "mid"]
    assert [(m.chunk, m.reason, m.source_tier, m.target_tier, m.source_node, m.target_node)
            for m in result.migrations] == [(2, "demote", "mid", "slow", 1, 2), (1, "demote", "fast", "mid", 0, 1),
                                            (3, "promote", "slow", "fast", 2, 0)]
    assert policy.told == [(2, "mid", "slow"), (1, "fast", "mid"), (3, "slow", "fast")]
    assert second.chunks_by_tier == {"fast": 1, "mid": 1, "slow": 1} and result.ping_pongs == 0
    assert {c: numa.nodes_of(c) for c in (1, 2, 3)} == {1: {1}, 2: {2}, 3: {0}}

    daemon.epoch()  # 3 goes back down one epoch after it came up: a ping-pong
    assert result.ping_pongs == 1 and numa.nodes_of(3) == {2}
    while daemon.epoch().epoch < back:  # up again, but past the window: not one
        pass
    summary = daemon.finish("stopped").summary()
    assert [m.chunk for m in result.migrations] == [2, 1, 3, 3, 3] and numa.nodes_of(3) == {0}
    assert (summary["ping_pongs"], summary["ping_pong_epochs"], summary["migrations"]) == \
        (1, DEFAULT_PING_PONG_EPOCHS, 5)
    assert result.to_dict()["ping_pongs"] == 1 and "ping-pongs 1" in attach_cli.summary_text(result)


def test_a_push_the_kernel_refuses_stops_the_chain_and_the_view_says_where_chunks_are(tmp_path: Path) -> None:
    numa = FakeNuma()
    for chunk, node in ((1, 0), (2, 1), (3, 2)):
        numa.put(chunk, node)
    promote = [Move(3, "slow", "fast", "promote")]
    policy = Scripted({1: "fast", 2: "mid", 3: "slow"}, {2: promote, 3: promote})
    daemon = daemon_for(tmp_path, policy, ScriptedTracker([1, 2, 3]), numa, tiers=THREE_TIERS)
    daemon.start()
    daemon.epoch()
    numa.full = {1}  # 2 goes down to slow, then 1 cannot go to mid: 3 has no room in fast
    second = daemon.epoch()
    result = daemon.result
    assert [(m.chunk, m.target_tier, m.outcome) for m in result.migrations] == [(2, "slow", "moved"),
                                                                                 (1, "mid", "failed")]
    assert second.chunks_by_tier == {"fast": 1, "mid": 0, "slow": 2} and policy.told == [(2, "mid", "slow")]
    assert daemon.view.tier_of(1) == "fast" and daemon.view.tier_of(3) == "slow"
    numa.full.clear()
    assert daemon.epoch().chunks_by_tier == {"fast": 1, "mid": 1, "slow": 1}  # planned again: mid has room now
    assert policy.asked == ["fast", "mid", "fast"] and policy.told[1:] == [(1, "fast", "mid"), (3, "slow", "fast")]
    assert {c: numa.nodes_of(c) for c in (1, 2, 3)} == {1: {1}, 2: {2}, 3: {0}}


class Bouncer(Policy):
    """Admits every chunk to the fastest tier, then plans to move every chunk to the other tier each epoch."""

    name = "bouncer"

    def admit(self, block: int, view: BlockView) -> str:
        return view.tiers[0].name

    def victim(self, tier: str, view: BlockView) -> int:
        return first_unpinned(view, tier)

    def plan(self, view: BlockView, now: float) -> Plan:
        fast, slow = (t.name for t in view.tiers)
        return Plan(moves=[Move(b, fast, slow, "demote") for b in view.blocks_in(fast)]
                    + [Move(b, slow, fast, "promote") for b in view.blocks_in(slow)])


@pytest.mark.parametrize("chunks_per_epoch", [0.4, 1.5, 2.5])
def test_the_budget_is_never_exceeded(tmp_path: Path, chunks_per_epoch: float) -> None:
    tiers = (AttachTier("fast", 0, (0,)), AttachTier("slow", 1, (1,)))
    epoch_s, epochs = 0.5, 12
    daemon = daemon_for(tmp_path, Bouncer(), ScriptedTracker(range(50, 56)), FakeNuma(), tiers=tiers,
                        budget_gbps=chunks_per_epoch * CHUNK / epoch_s / 1e9, epoch_s=epoch_s)
    daemon.start()
    moved = [daemon.epoch().moved_bytes // CHUNK for _ in range(epochs)]

    # the textbook bucket, in chunks: full at the start, refilled by the budget each epoch, holding an epoch's
    # worth or one chunk, whichever is more; a chunk moves only when the bucket holds it
    cap, tokens, expected = max(chunks_per_epoch, 1.0), max(chunks_per_epoch, 1.0), []
    for epoch in range(epochs):
        if epoch:
            tokens = min(cap, tokens + chunks_per_epoch)
        n = 0
        while tokens >= 1 and n < 6:
            tokens, n = tokens - 1, n + 1
        expected.append(n)
    assert moved == expected
    for k in range(1, epochs + 1):
        assert sum(moved[:k]) <= cap + (k - 1) * chunks_per_epoch
    result = daemon.finish("stopped")
    assert result.moved_bytes == sum(expected) * CHUNK and result.skipped["budget"] > 0
    # every move after a chunk's first brings it back where it was, within the window
    assert result.ping_pongs == len(result.migrations) - len({m.chunk for m in result.migrations})


def test_run_paces_epochs_and_a_target_that_exits_ends_it_with_what_was_done(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = ScriptedTracker([5, 6], hot={6})
    daemon = daemon_for(tmp_path, get_policy("lru"), tracker, FakeNuma(), clock=clock)
    result = daemon.run(duration_s=2.0)
    assert (len(result.epochs), result.ended, result.duration_s) == (4, "duration", 2.0)
    assert [e.time_s for e in result.epochs] == [0.5, 1.0, 1.5, 2.0]

    tracker = ScriptedTracker([5, 6], gone_at=3)
    daemon = daemon_for(tmp_path, get_policy("lru"), tracker, FakeNuma(), clock=FakeClock())
    with pytest.raises(TargetExitedError, match=r"process 4242 exited while it was tracked; after 2 epochs") as info:
        daemon.run(duration_s=10.0)
    assert info.value.result.ended == "target exited" and len(info.value.result.epochs) == 2


def test_attach_checks_capability_tiers_and_knobs_before_touching_the_process(tmp_path: Path) -> None:
    three = discover(fixture_root("cxl-expander"))
    one = discover(fixture_root("one-node-vm"))
    tracker = ScriptedTracker([1])
    ready = KernelTiering(kernel_root(tmp_path / "ready"))
    with pytest.raises(AttachError, match=r"process 4242: moving its pages needs CAP_SYS_NICE, which this process "
                                          r"lacks .* --policy kernel only watches"):
        attach(AttachConfig(pid=4242, policy="lru"), topology=three, has_cap_sys_nice=lambda: False,
               tracker=tracker, pages=FakeNuma(), kernel=ready)
    with pytest.raises(AttachError, match=r"this machine has one memory node \(node 0\)"):
        attach(AttachConfig(pid=4242, policy="lru"), topology=one, has_cap_sys_nice=lambda: True,
               tracker=tracker, pages=FakeNuma(), kernel=ready)
    off = KernelTiering(kernel_root(tmp_path / "off", numa_balancing=0, demotion=False))
    with pytest.raises(AttachError, match=r"needs its knobs set: /proc/sys/kernel/numa_balancing must be 2 .*, it "
                                          r"is 0; /sys/kernel/mm/numa/demotion_enabled must be true, it is false; "
                                          r"the lab profile kernel-tiering sets both"):
        attach(AttachConfig(pid=4242, policy="kernel"), topology=three, has_cap_sys_nice=lambda: False,
               tracker=tracker, pages=FakeNuma(), kernel=off)
    flat = KernelTiering(kernel_root(tmp_path / "flat", tiers={4: "0-2"}))
    with pytest.raises(AttachError, match=r"memory nodes 0-2 are all in one memory tier"):
        attach(AttachConfig(pid=4242, policy="kernel"), topology=three, has_cap_sys_nice=lambda: False,
               tracker=tracker, pages=FakeNuma(), kernel=flat)
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        attach(AttachConfig(pid=4242, policy="nope"), topology=three, has_cap_sys_nice=lambda: True,
               tracker=tracker, pages=FakeNuma(), kernel=ready)
    assert tracker.started == 0  # every refusal came before the first clear_refs
    watching = attach(AttachConfig(pid=4242, policy="kernel"), topology=three, has_cap_sys_nice=lambda: False,
                      tracker=tracker, pages=FakeNuma(), kernel=ready)
    assert watching.policy is None and [t.nodes for t in watching.tiers] == [(0,), (1,), (2,), (3,)]


def test_tiers_come_from_the_memory_tiers_or_a_map_with_capacities_in_chunks() -> None:
    three = discover(fixture_root("cxl-expander"))
    assert [(t.name, t.nodes) for t in default_tiers(three)] == [
        ("node0", (0,)), ("node1", (1,)), ("node2", (2,)), ("node3", (3,))]
    doc = Section({"name": "m", "tiers": [{"name": "dram", "nodes": [0], "capacity_mib": 9},
                                          {"name": "cxl", "nodes": [2, 3], "policy": "interleave"}]}, "", "test.yaml")
    tiers = tiers_from_map(parse_tier_map(doc), three, CHUNK)
    assert [(t.name, t.nodes, t.capacity_chunks, t.target_node) for t in tiers] == [
        ("dram", (0,), 4, 0), ("cxl", (2, 3), None, 2)]
    shared = Section({"name": "m", "tiers": [{"name": "a", "nodes": [0]}, {"name": "b", "nodes": [0, 1]}]}, "",
                     "test.yaml")
    with pytest.raises(AttachError, match="tiers a and b of m both use node 0"):
        tiers_from_map(parse_tier_map(shared), three, CHUNK)


# -- the kernel baseline's counters --------------------------------------------------------------------------


def test_vmstat_deltas_count_promotions_demotions_and_hint_faults(tmp_path: Path) -> None:
    root = kernel_root(tmp_path, vmstat={"nr_free_pages": 100, "pgpromote_success": 10, "pgpromote_candidate": 50,
                                         "pgdemote_kswapd": 7, "pgdemote_direct": 1, "numa_hint_faults": 1000,
                                         "pgmigrate_success": 30})
    kernel = KernelTiering(root)
    before = kernel.snapshot()
    assert "nr_free_pages" not in before.counters and before.knobs.ready
    (root / "proc/vmstat").write_text("nr_free_pages 5\npgpromote_success 25\npgpromote_candidate 80\n"
                                      "pgdemote_kswapd 7\npgdemote_direct 41\npgdemote_proactive 9\n"
                                      "numa_hint_faults 1600\npgmigrate_success 100\n")
    delta = kernel.delta(before, kernel.snapshot())
    assert (delta.promoted, delta.promote_candidates, delta.demoted, delta.hint_faults) == (15, 30, 40, 600)
    assert delta.demoted_by_kind == {"direct": 40, "kswapd": 0}  # pgdemote_proactive is new: no delta
    assert delta.promoted_bytes == 15 * PAGE_SIZE and delta.to_dict()["counters"]["pgmigrate_success"] == 70


def test_knobs_and_tiers_say_whether_the_baseline_can_run_and_which_profile_sets_it(tmp_path: Path) -> None:
    knobs = KernelTiering(kernel_root(tmp_path / "a", numa_balancing=1, demotion=False)).knobs()
    assert not knobs.ready and not knobs.promotion
    assert "numa_balancing must be 2 (memory tiering promotion), it is 1" in knobs.describe()
    assert "sudo scripts/setup-lab.sh kernel-tiering" in knobs.describe()
    assert KernelTiering(kernel_root(tmp_path / "b", numa_balancing=3)).knobs().ready  # both modes at once
    assert KernelTiering(kernel_root(tmp_path / "c")).applicability().applicable
    single = KernelTiering(kernel_root(tmp_path / "d", tiers={4: "0"}, has_memory="0")).applicability()
    assert not single.applicable and "one memory node (node 0)" in single.reason
    # the shipped profile sets exactly what the check asks for
    profile = (REPO / "configs/lab/kernel-tiering.yaml").read_text()
    assert "kind: numa_balancing\n    value: 2" in profile and "kind: demotion\n    enabled: true" in profile


def test_vmstat_on_this_machine_parses_and_a_bad_line_is_an_error() -> None:
    counters = KernelTiering("/").snapshot().counters
    assert all(k.startswith(("pgpromote_", "pgdemote_", "numa_", "pgmigrate_")) for k in counters)
    assert "numa_hint_faults" in counters or "pgmigrate_success" in counters
    with pytest.raises(ValueError, match="unexpected line"):
        parse_vmstat("pgpromote_success 1 2\n")


# -- the command -----------------------------------------------------------------------------------------------


def test_command_prints_json_with_every_migration_and_the_summary_when_the_target_exits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiers = (AttachTier("fast", 0, (0,)), AttachTier("slow", 1, (1,)))

    def fake_attach(config: AttachConfig) -> AttachedDaemon:
        assert (config.pid, config.epoch_s, config.budget_gbps, config.params) == (4242, 0.25, 3.0, {"quota": 2})
        return daemon_for(tmp_path, get_policy("all-slowest"), ScriptedTracker([7, 8], gone_at=3), FakeNuma(),
                          tiers=tiers, epoch_s=config.epoch_s)

    monkeypatch.setattr(attach_cli, "attach", fake_attach)
    out = CliRunner().invoke(attach_cli.daemon, ["--pid", "4242", "--policy", "all-slowest", "--epoch-ms", "250",
                                                 "--budget-gbps", "3", "--param", "quota=2", "--json"])
    assert isinstance(out.exception, TargetExitedError), out.output
    data = json.loads(out.stdout)
    assert (data["pid"], data["epochs"], data["migrations"], data["ended"]) == (4242, 2, 2, "target exited")
    assert [(m["chunk"], m["source_node"], m["target_node"], m["bytes"]) for m in data["migration_records"]] == [
        (7, 0, 1, CHUNK), (8, 0, 1, CHUNK)]
    assert data["kernel"]["knobs"]["ready"] is True and data["origin"] == "measured" and data["ping_pongs"] == 0


def test_command_refuses_a_pid_that_does_not_exist() -> None:
    pid = unused_pid()
    out = CliRunner().invoke(attach_cli.daemon, ["--pid", str(pid), "--policy", "lru", "--duration", "1"])
    assert isinstance(out.exception, AttachError) and f"process {pid} does not exist" in str(out.exception)
