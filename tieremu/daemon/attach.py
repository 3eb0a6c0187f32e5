"""Attach to another process (a real serving engine) and move its memory between NUMA nodes under a policy.

The process's anonymous regions are cut into chunks (2 MiB by default; see proctrack.py for how their accesses are
tracked). Each chunk is a block to the policy: its id is its chunk index (address // chunk size) and its tier is
the tier whose nodes hold most of its pages, asked of the kernel with move_pages on that pid (a sample of
`sample_pages` pages per chunk; every present page of a chunk when it is moved). Every epoch:

1. sample the process (accessed chunks since the last epoch) and where its chunks are;
2. chunks that vanished leave the view; admitted chunks found in another tier than last seen moved on their own
   (the kernel's tiering, or the process's own mbind) and are counted;
Placement is decided by the placement engine (tieremu.policy.engine) that simulate mode, execute mode and the
in-process daemon drive too, on a Board over the chunks (ChunkView), and carried out here with real page moves:

3. admissions not carried out yet (budget, no room could be made, a failed move) are retried; then new chunks are
   admitted in address order (engine.admit): the policy names a tier; room is made there (the policy's victims
   pushed one tier down, deepest first) and the chunk is moved in if it is elsewhere;
4. the policy observes one access event per referenced chunk, then plans; its moves are checked (engine.check_move)
   and carried out in order, room made in a full target as for an admission. A move whose chunk is not in its
   source any more, or whose room would push a chunk out of the last tier, is skipped and counted; evictions are
   skipped (another process's memory cannot be dropped);
5. a tier above its capacity (chunks that appeared in it, or that others moved there) pushes victims down.

Every move carried out is told to the policy (Policy.moved) and recorded on the engine's move ledger, which counts
ping-pongs (a chunk moved back within the engine's window). Moves run within the migration budget (the engine's token
bucket on the epoch clock: budget x epoch per epoch, holding at least one chunk so a budget below a chunk per epoch
still moves one now and then); a move the budget cannot pay for is skipped until a later epoch, so the bytes moved
over any run of epochs never exceed what the budget allowed. Pages reported EBUSY are asked again (with THP the
kernel reports a subpage busy although its huge page moved). Every migration is recorded (time, chunk, pages,
source and target node, bytes, duration, outcome, failed pages by errno); failures never stop the loop, except
losing the process.

The pseudo-policy `kernel` moves nothing: it watches the process while the kernel's own tiering (numa_balancing=2
with demotion) places its pages, and reports the kernel's counters beside the chunks that moved on their own.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from tieremu.daemon.kernel import KernelTiering, TieringDelta, TieringKnobs, VmstatSnapshot
from tieremu.daemon.proctrack import (
    DEFAULT_CHUNK_BYTES,
    AttachError,
    ChunkActivity,
    ProcessTracker,
    Sample,
    TargetGoneError,
)
from tieremu.errors import CapabilityError, InvalidNodeError, NumaError
from tieremu.numa import syscalls
from tieremu.numa.pages import PAGE_SIZE
from tieremu.numa.sysfs import format_list
from tieremu.numa.topology import Topology, discover
from tieremu.numbers import MAX_SECONDS, Range, number_problem
from tieremu.policy.base import AccessEvent, Move, Plan, Policy, PolicyContext, TierState, checked_victim
from tieremu.policy.engine import (
    DEFAULT_PING_PONG_EPOCHS,
    MoveLedger,
    Step,
    TokenBucket,
    admit,
    check_move,
    make_room,
    rank_in,
)
from tieremu.policy.registry import get_policy
from tieremu.policy.staging import Staging
from tieremu.tiers.config import GBPS, TierMap, load_tier_map
from tieremu.tiers.resolve import in_vm

DEFAULT_EPOCH_S = 0.5
DEFAULT_SAMPLE_PAGES = 64
KERNEL_POLICY = "kernel"


class TargetExitedError(TargetGoneError):
    """The process exited during a run; `result` holds what was done until then."""

    def __init__(self, message: str, *, pid: int, result: AttachResult) -> None:
        super().__init__(message, pid=pid)
        self.result = result


# -- tiers ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttachTier:
    """A tier as the daemon uses it: real nodes, and a capacity in chunks (None = unlimited)."""

    name: str
    rank: int
    nodes: tuple[int, ...]
    capacity_chunks: int | None = None

    @property
    def target_node(self) -> int:
        """Where pages moved into this tier go: its first node."""
        return self.nodes[0]


def default_tiers(topology: Topology) -> tuple[AttachTier, ...]:
    """One tier per memory node, fastest first: by the kernel's memory tier, then SLIT distance from the CPUs."""
    origin = topology.cpu_nodes[0] if topology.cpu_nodes else topology.memory_nodes[0]
    tier_of = {node: tier for tier, nodes in topology.memory_tiers.items() for node in nodes}
    order = sorted(topology.memory_nodes, key=lambda n: (tier_of.get(n, 0), topology.distance(origin, n), n))
    return tuple(AttachTier(f"node{n}", rank, (n,)) for rank, n in enumerate(order))


def tiers_from_map(tier_map: TierMap, topology: Topology, chunk_bytes: int) -> tuple[AttachTier, ...]:
    """The NUMA tiers of a tier map, each on nodes this machine has (emulated and file tiers cannot hold another
    process's pages)."""
    tiers = []
    owner: dict[int, str] = {}
    for rank, spec in enumerate(tier_map.tiers):
        if spec.is_file or spec.is_cuda:
            raise AttachError(f"tier {spec.name} of {tier_map.name} is a {spec.kind} tier: another process's pages "
                              "can only move between NUMA nodes; leave it out of the map given to the daemon")
        missing = [n for n in spec.nodes if n not in topology.memory_nodes]
        if missing:
            raise AttachError(f"tier {spec.name} of {tier_map.name}: node {format_list(missing)} does not exist or has "
                              f"no memory on this machine (memory nodes: {format_list(topology.memory_nodes)}); an "
                              "emulated tier cannot hold another process's pages")
        for n in spec.nodes:
            if n in owner:
                raise AttachError(f"tiers {owner[n]} and {spec.name} of {tier_map.name} both use node {n}: a chunk's "
                                  "tier is the one whose nodes hold most of its pages, so tiers must not share nodes")
            owner[n] = spec.name
        capacity = None
        if spec.capacity_mib is not None:
            capacity = (spec.capacity_mib << 20) // chunk_bytes
            if capacity < 1:
                raise AttachError(f"tier {spec.name}: capacity_mib={spec.capacity_mib} holds no chunk of "
                                  f"{chunk_bytes / 2**20:g} MiB; raise capacity_mib or lower the chunk size")
        tiers.append(AttachTier(spec.name, rank, spec.nodes, capacity))
    return tuple(tiers)


def require_two_nodes(pid: int, tiers: Sequence[AttachTier], topology: Topology) -> None:
    nodes = sorted({n for t in tiers for n in t.nodes})
    if len(tiers) >= 2 and len(nodes) >= 2:
        return
    shown = ", ".join(f"{t.name} on node {format_list(t.nodes)}" for t in tiers)
    if len(topology.memory_nodes) < 2:
        raise AttachError(
            f"process {pid} can be tracked, but this machine has one memory node (node "
            f"{format_list(topology.memory_nodes)}): there is no other tier to move its pages to (tiers: {shown}). "
            "Moving pages between tiers needs two or more NUMA nodes: a multi-node server, or the QEMU guest "
            "(tieremu vm run -- ...)")
    raise AttachError(f"process {pid}: the tiers given ({shown}) span fewer than two nodes; name two or more tiers on "
                      f"different nodes (memory nodes here: {format_list(topology.memory_nodes)})")


# -- the kernel side, injectable for tests -------------------------------------------------------------------


class PageMover(Protocol):
    def query(self, pid: int, pages: np.ndarray) -> np.ndarray:
        """Node of each page, or -errno."""
        ...

    def move(self, pid: int, pages: np.ndarray, node: int) -> np.ndarray:
        """Move pages to node; per-page status (node reached, or -errno). Call-level failures raise NumaError."""
        ...


class KernelPages:
    """move_pages on the process. MPOL_MF_MOVE_ALL, so pages it shares with its workers move too (CAP_SYS_NICE)."""

    def query(self, pid: int, pages: np.ndarray) -> np.ndarray:
        return syscalls.query_pages(pages, pid)

    def move(self, pid: int, pages: np.ndarray, node: int) -> np.ndarray:
        return syscalls.move_pages(pages, node, pid, move_all=True)


class Tracker(Protocol):
    pid: int
    chunk_bytes: int

    @property
    def method(self) -> str: ...

    def start(self) -> None: ...

    def sample(self) -> Sample: ...

    def forget_writes(self) -> None: ...


# -- records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationRecord:
    time_s: float  # since the run started
    epoch: int
    chunk: int
    address: int  # the chunk's first byte
    reason: str  # promote | demote | prefetch (the policy's), for admissions and room-making too
    source_tier: str
    target_tier: str
    source_node: int  # the node that held most of the chunk's pages before (-1: none present)
    target_node: int
    pages: int  # pages asked to move (present and not on the target already)
    moved: int
    bytes: int  # moved pages x page size
    seconds: float  # inside move_pages
    outcome: str  # moved | partial | failed
    failed: dict[str, int]  # pages that did not reach the target, by errno name ("on node N" if elsewhere)
    busy_rechecked: int


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    time_s: float  # since the run started
    chunks: int  # chunks with present pages on a tier's nodes
    referenced: int
    chunks_by_tier: dict[str, int]
    moved_by_others: int  # admitted chunks found in another tier than last seen
    migrations: int
    moved_bytes: int
    track_s: float  # sampling the process and asking where its chunks are
    policy_s: float
    migrate_s: float


@dataclass
class AttachResult:
    pid: int
    policy: str
    params: dict[str, object]
    tiers: tuple[AttachTier, ...]
    tracking: str
    chunk_bytes: int
    epoch_s: float
    budget_gbps: float | None
    ended: str = "running"  # duration | interrupted | target exited | stopped
    duration_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time over the run
    epochs: list[EpochRecord] = field(default_factory=list)
    migrations: list[MigrationRecord] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # moves not attempted, by reason
    moved_by_others: int = 0
    ping_pongs: int = 0  # chunks moved back where they came from within DEFAULT_PING_PONG_EPOCHS of their last move
    chunks_seen: set[int] = field(default_factory=set)
    kernel: TieringDelta | None = None
    knobs_at_start: TieringKnobs | None = None
    vm: bool = field(default_factory=in_vm)  # inside tieremu's QEMU guest: semantics real, speeds artefacts
    page_size: int = PAGE_SIZE

    @property
    def chunks_tracked(self) -> int:
        return len(self.chunks_seen)

    @property
    def moved_pages(self) -> int:
        return sum(m.moved for m in self.migrations)

    @property
    def moved_bytes(self) -> int:
        return sum(m.bytes for m in self.migrations)

    @property
    def migrate_seconds(self) -> float:
        return sum(m.seconds for m in self.migrations)

    @property
    def gbps(self) -> float:
        """Migration speed: bytes moved over the time spent inside move_pages."""
        return self.moved_bytes / self.migrate_seconds / 1e9 if self.migrate_seconds > 0 else 0.0

    @property
    def rate_gbps(self) -> float:
        """Bytes moved over the whole run: what the budget limits."""
        return self.moved_bytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0

    @property
    def failed_pages(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for m in self.migrations:
            total.update(m.failed)
        return total

    def count(self, reason: str) -> int:
        return sum(1 for m in self.migrations if m.reason == reason and m.moved)

    def summary(self) -> dict[str, object]:
        last = self.epochs[-1] if self.epochs else None
        return {
            "pid": self.pid, "policy": self.policy, "params": self.params, "ended": self.ended,
            "tiers": [asdict(t) for t in self.tiers], "tracking": self.tracking,
            "chunk_bytes": self.chunk_bytes, "epoch_s": self.epoch_s, "budget_gbps": self.budget_gbps,
            "epochs": len(self.epochs), "duration_s": self.duration_s, "cpu_s": self.cpu_s,
            "chunks_tracked": self.chunks_tracked, "chunks_at_end": last.chunks if last else 0,
            "chunks_by_tier_at_end": last.chunks_by_tier if last else {},
            "migrations": len(self.migrations), "promotions": self.count("promote"),
            "demotions": self.count("demote"), "moved_pages": self.moved_pages, "moved_bytes": self.moved_bytes,
            "migration_gbps": self.gbps, "rate_gbps": self.rate_gbps,
            "failed_pages": dict(self.failed_pages), "skipped_moves": dict(self.skipped),
            "moved_by_others": self.moved_by_others, "ping_pongs": self.ping_pongs,
            "ping_pong_epochs": DEFAULT_PING_PONG_EPOCHS,
            "kernel": self.kernel.to_dict() if self.kernel else None,
            "origin": "measured", "vm": self.vm,
        }

    def to_dict(self) -> dict[str, object]:
        return {**self.summary(), "epoch_records": [asdict(e) for e in self.epochs],
                "migration_records": [asdict(m) for m in self.migrations]}


# -- what the policy sees ------------------------------------------------------------------------------------


@dataclass
class ChunkState:
    """Where a chunk's pages were found this epoch."""

    activity: ChunkActivity
    by_node: dict[int, int]
    tier: str | None


class ChunkView:
    """The attached process's admitted chunks by tier, insertion-ordered (oldest first): the BlockView the policy
    reads, and the placement engine's Board (tieremu.policy.engine) it decides on. While the engine tries to make
    room (`trial`), chunks are shown where they are headed (`stage`); `place` and `drop` say where they really are.
    Nothing is pinned but the engine's newcomer: nothing is known of which requests the process is serving."""

    def __init__(self, tiers: Sequence[AttachTier]) -> None:
        self._tiers = tuple(tiers)
        self.names: Sequence[str] = [t.name for t in tiers]
        self.rank = {t.name: t.rank for t in tiers}
        self.members: dict[str, dict[int, None]] = {t.name: {} for t in tiers}
        self.where: dict[int, str] = {}
        self._staging = Staging()  # chunks shown where they are headed during a trial (its pins: the newcomer)

    # -- BlockView -----------------------------------------------------------------------------------------------

    @property
    def tiers(self) -> Sequence[TierState]:
        return [TierState(t.name, t.rank, t.capacity_chunks, self.used(t.name)) for t in self._tiers]

    def tier_of(self, block: int) -> str | None:
        return self._staging.tier_of(block, self.where.get)

    def blocks_in(self, tier: str) -> Iterator[int]:
        return iter(self._staging.blocks_in(tier, self.members.get(tier, {})))

    def pinned(self, block: int) -> bool:
        return block in self._staging.pins

    def used(self, tier: str) -> int:
        return len(self.members[tier]) + self._staging.change(tier)

    # -- where chunks really are ---------------------------------------------------------------------------------

    def place(self, block: int, tier: str) -> None:
        old = self.where.get(block)
        if old == tier:
            return
        if old is not None:
            del self.members[old][block]
        self.members[tier][block] = None
        self.where[block] = tier

    def drop(self, block: int) -> None:
        tier = self.where.pop(block, None)
        if tier is not None:
            del self.members[tier][block]

    # -- the engine's Board --------------------------------------------------------------------------------------

    def stage(self, block: int, tier: str | None, *, pinned: bool = False) -> None:
        """Show a chunk in tier (None: in no tier) until the trial ends."""
        self._staging.stage(block, self.tier_of(block), tier, pinned=pinned)

    @contextmanager
    def trial(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._staging.clear()

    def used_in(self, rank: int) -> int:
        return self.used(self.names[rank])

    def capacity_of(self, rank: int) -> int | None:
        return self._tiers[rank].capacity_chunks

    def pinned_count(self, rank: int) -> int:
        return sum(1 for b in self._staging.pins if self.tier_of(b) == self.names[rank])

    def show(self, block: int, rank: int) -> None:
        self.stage(block, self.names[rank], pinned=True)

    def hide(self, block: int) -> None:
        self.stage(block, None)

    def pick_victim(self, policy: Policy, rank: int, newcomer: int) -> int:
        return checked_victim(policy, self.names[rank], self)

    def droppable(self, block: int) -> bool:
        return False  # out of the last tier would mean dropping another process's memory: never


# -- the daemon ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttachConfig:
    pid: int
    policy: str
    params: Mapping[str, object] = field(default_factory=dict)
    epoch_s: float = DEFAULT_EPOCH_S
    budget_gbps: float | None = None
    tier_file: Path | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    min_region_bytes: int | None = None  # None: one chunk
    sample_pages: int = DEFAULT_SAMPLE_PAGES  # pages per chunk asked where they are each epoch; 0 = all


class AttachedDaemon:
    """The epoch loop over one attached process. Build it with `attach`, which checks everything first."""

    def __init__(self, config: AttachConfig, tiers: Sequence[AttachTier], policy: Policy | None, tracker: Tracker,
                 pages: PageMover, kernel: KernelTiering, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.pid = config.pid
        self.tiers = tuple(tiers)
        self._tier = {t.name: t for t in tiers}
        self._node_tier = {n: t.name for t in tiers for n in t.nodes}
        self.policy = policy
        self.tracker = tracker
        self.pages = pages
        self.kernel = kernel
        self.view = ChunkView(tiers)
        # Bytes per epoch, saved up to an epoch's worth or one chunk, whichever is more, so that a budget below a
        # chunk per epoch still moves one now and then (a byte more than a chunk: float rounding must not leave the
        # bucket a byte short of one). Its clock is the epoch count: epoch x epoch_s.
        burst_s = config.epoch_s if config.budget_gbps is None else max(
            config.epoch_s, (tracker.chunk_bytes + 1) / (config.budget_gbps * 1e9))
        self.budget = TokenBucket(config.budget_gbps, burst_s)
        self.ledger = MoveLedger(DEFAULT_PING_PONG_EPOCHS)  # in epochs, as simulate counts them
        self._clock = clock
        self._sleep = sleep
        self._states: dict[int, ChunkState] = {}
        self._admissions: dict[int, str] = {}  # chunk -> the tier the policy admitted it to, until it is there
        self._epoch = 0
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._vmstat0: VmstatSnapshot | None = None
        self._migrate_s = 0.0
        self.result = AttachResult(
            pid=config.pid, policy=config.policy, params=dict(config.params), tiers=self.tiers,
            tracking=tracker.method, chunk_bytes=tracker.chunk_bytes, epoch_s=config.epoch_s,
            budget_gbps=config.budget_gbps)

    # -- the loop --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Snapshot the kernel counters and begin the first epoch (the first write to the process's state)."""
        self._vmstat0 = self.kernel.snapshot()
        self.result.knobs_at_start = self._vmstat0.knobs
        self._t0 = self._clock()
        self._cpu0 = time.process_time()
        self.tracker.start()

    def run(self, duration_s: float | None = None) -> AttachResult:
        """Epochs until duration_s (None: until Ctrl-C). The process exiting raises TargetExitedError."""
        self.start()
        ended = "duration"
        try:
            deadline = None if duration_s is None else self._t0 + duration_s
            next_epoch = self._t0 + self.config.epoch_s
            while deadline is None or next_epoch <= deadline + 1e-9:
                self._sleep(max(0.0, next_epoch - self._clock()))
                self.epoch()
                # An epoch that overran is not made up for: the next one starts a full period later.
                next_epoch = max(next_epoch + self.config.epoch_s, self._clock())
        except KeyboardInterrupt:
            ended = "interrupted"
        except TargetGoneError as exc:
            result = self.finish("target exited")
            raise TargetExitedError(f"{exc}; after {len(result.epochs)} epochs ({result.duration_s:.1f} s), "
                                    f"{len(result.migrations)} migrations", pid=self.pid, result=result) from None
        return self.finish(ended)

    def finish(self, ended: str) -> AttachResult:
        result = self.result
        result.ended = ended
        result.duration_s = self._clock() - self._t0
        result.cpu_s = time.process_time() - self._cpu0
        if self._vmstat0 is not None:
            result.kernel = self.kernel.delta(self._vmstat0, self.kernel.snapshot())
        return result

    def epoch(self) -> EpochRecord:
        """One epoch: sample, reconcile, admit, observe, plan, carry out, enforce capacities."""
        self._epoch += 1
        t_start = self._clock()
        sample = self.tracker.sample()
        self._states = self._place(sample.chunks)
        track_s = self._clock() - t_start
        moved_by_others = self._reconcile()
        migrations_before = len(self.result.migrations)
        self._migrate_s = 0.0
        t_policy = self._clock()
        now = t_policy - self._t0
        if self.policy is None:
            for chunk, state in self._states.items():
                if state.tier is not None and self.view.tier_of(chunk) is None:
                    self.view.place(chunk, state.tier)
        else:
            self._admit_new()
            self._observe(sample, now)
            self._carry_out(self.policy.plan(self.view, now))
            self._enforce_capacity()
        new = self.result.migrations[migrations_before:]
        if any(m.moved for m in new):
            self.tracker.forget_writes()
        spent = self._clock() - t_policy
        record = EpochRecord(
            epoch=self._epoch, time_s=now, chunks=len(self.view.where),
            referenced=sum(1 for c in sample.chunks.values() if c.referenced),
            chunks_by_tier={t.name: self.view.used(t.name) for t in self.tiers},
            moved_by_others=moved_by_others, migrations=len(new), moved_bytes=sum(m.bytes for m in new),
            track_s=track_s, policy_s=spent - self._migrate_s, migrate_s=self._migrate_s)
        self.result.epochs.append(record)
        self.result.moved_by_others += moved_by_others
        self.result.chunks_seen.update(self.view.where)
        return record

    # -- steps -----------------------------------------------------------------------------------------------

    def _place(self, chunks: Mapping[int, ChunkActivity]) -> dict[int, ChunkState]:
        """Where each chunk is, from one query of a sample of its pages."""
        samples = [c.pages[sample_indices(c.present_pages, self.config.sample_pages)] for c in chunks.values()]
        status = self._query(np.concatenate(samples)) if samples else np.empty(0, dtype=np.int32)
        states = {}
        offset = 0
        for activity, sampled in zip(chunks.values(), samples, strict=True):
            part = status[offset:offset + sampled.size]
            offset += sampled.size
            by_node = node_counts(part)
            states[activity.chunk] = ChunkState(activity, by_node, self._majority(by_node))
        return states

    def _reconcile(self) -> int:
        """Drop chunks that are gone; count admitted chunks that changed tier without us."""
        for chunk in list(self.view.where):
            state = self._states.get(chunk)
            if state is None or state.tier is None:
                self.view.drop(chunk)
                self.ledger.forget(chunk)
                self._admissions.pop(chunk, None)
        moved = 0
        for chunk, state in self._states.items():
            seen = self.view.tier_of(chunk)
            if seen is not None and state.tier is not None and state.tier != seen:
                self.view.place(chunk, state.tier)
                moved += 1
        return moved

    def _admit_new(self) -> None:
        """Carry out admissions not done yet (budget, no room, failures: retried every epoch), then admit new chunks
        through the placement engine: where the policy admits it (or the first tier below with room), room made
        there (victims pushed down, deepest first), the chunk moved in."""
        assert self.policy is not None
        for chunk, wanted in list(self._admissions.items()):
            where = self.view.tier_of(chunk)
            if self._admissions.get(chunk) != wanted:
                continue  # pushed down as a victim meanwhile: the policy has moved on
            if where is None or where == wanted or self._relocate(Move(chunk, where, wanted,
                                                                       _reason(self.view, where, wanted))):
                self._admissions.pop(chunk, None)  # gone, moved there by others, or moved there now
        names = self.view.names
        for chunk, state in self._states.items():
            physical = state.tier
            if physical is None or self.view.tier_of(chunk) is not None:
                continue
            wanted = rank_in(self.view.rank, self.policy.admit(chunk, self.view), f"policy {self.policy.name}: admit")
            admission = admit(self.view, self.policy, chunk, wanted)
            target = names[wanted if admission.rank is None else admission.rank]
            if admission.rank is None:
                self.result.skipped["target full"] += 1
            elif self._carry_out_chain(admission.chain) and target != physical:
                self._migrate(Move(chunk, physical, target, _reason(self.view, physical, target)))
            if self.view.tier_of(chunk) is None:  # not moved (budget, a failed push): it is where it was
                self.view.place(chunk, physical)
            if self.view.tier_of(chunk) != target:
                self._admissions[chunk] = target
            if self.view.tier_of(chunk) != names[wanted]:  # told, as the other drivers tell it
                self.policy.moved(chunk, names[wanted], self.view.tier_of(chunk))

    def _observe(self, sample: Sample, now: float) -> None:
        assert self.policy is not None
        events = [AccessEvent(block=c.chunk, tier=self.view.tier_of(c.chunk), time=now, request=self._epoch)
                  for c in sample.chunks.values() if c.referenced and self.view.tier_of(c.chunk) is not None]
        if events:
            self.policy.observe(events)

    def _carry_out(self, plan: Plan) -> None:
        assert self.policy is not None
        for move in plan.moves:
            check_move(move.block, move.source, move.target, move.reason, self.view.rank, f"policy {self.policy.name}")
            self._admissions.pop(move.block, None)  # the policy's newer word on where the chunk belongs
            if self.view.tier_of(move.block) != move.source:
                self.result.skipped["not in source"] += 1
            else:
                self._relocate(move)
        if plan.evictions:
            self.result.skipped["eviction"] += len(plan.evictions)

    def _enforce_capacity(self) -> None:
        """A tier above its capacity (chunks that appeared in it, or that others moved there) pushes the policy's
        victims one tier down, room made below by the engine, until it fits or a push fails."""
        assert self.policy is not None
        for upper, lower in itertools.pairwise(self.tiers):
            while upper.capacity_chunks is not None and self.view.used(upper.name) > upper.capacity_chunks:
                victim = self.view.pick_victim(self.policy, upper.rank, newcomer=-1)
                self._admissions.pop(victim, None)
                if not self._relocate(Move(victim, upper.name, lower.name, "demote")):
                    break

    def _relocate(self, move: Move) -> bool:
        """Move a chunk shown in move.source to move.target, room made there by the engine first (its victims pushed
        down); True when it is there. The chunk leaves its source, so the chain may use that slot (as in simulate
        and the executor); the source is one over its capacity until the chunk has left."""
        assert self.policy is not None
        chain: list[Step] = []
        with self.view.trial():
            self.view.hide(move.block)
            why = make_room(self.view, self.policy, move.block, self.view.rank[move.target], chain)
        if why is not None:
            self.result.skipped["target full"] += 1  # the chain would push a chunk out of the last tier
            return False
        if not (self._carry_out_chain(chain) and self._migrate(move)):
            return False
        self.policy.moved(move.block, move.source, move.target)
        return True

    def _carry_out_chain(self, chain: list[Step]) -> bool:
        """Push the engine's victims down, deepest first, so each has room; every push is told to the policy. A push
        that fails (budget, the kernel) stops the chain: that victim is where the kernel says it is (the view is
        settled from its answer) and the steps above would have no room; the move that needed the room is retried
        (an admission) or planned again."""
        assert self.policy is not None
        names = self.view.names
        for victim, source, target in chain:
            assert target is not None, "droppable() is never true here: the engine pushes no chunk out"
            if not self._migrate(Move(victim, names[source], names[target], "demote")):
                return False
            self._admissions.pop(victim, None)
            self.policy.moved(victim, names[source], names[target])
        return True

    # -- one migration ---------------------------------------------------------------------------------------

    def _migrate(self, move: Move) -> bool:
        """Move a chunk's present pages to the target tier's node; True when the chunk is now in the target."""
        state = self._states.get(move.block)
        if state is None:
            self.result.skipped["gone"] += 1
            return False
        target = self._tier[move.target]
        node = target.target_node
        pages = state.activity.pages
        status = self._query(pages)
        present = status >= 0
        source_node = max(node_counts(status).items(), key=lambda kv: kv[1], default=(-1, 0))[0]
        todo = np.flatnonzero(present & (status != node))
        if todo.size == 0:
            self._settle(move.block, state, status)
            self.result.skipped["already there"] += 1
            return self.view.tier_of(move.block) == move.target
        asked = int(todo.size) * PAGE_SIZE
        allowance = self.budget.allowance(self._epoch * self.config.epoch_s)
        if allowance is not None and asked > allowance:  # never overshoot: it waits for a later epoch's bytes
            self.result.skipped["budget"] += 1
            return False
        self.budget.spend(asked)
        t0 = time.perf_counter()
        result = self._move(pages[todo], node)
        seconds = time.perf_counter() - t0
        busy = result == -errno_mod.EBUSY
        rechecked = int(np.count_nonzero(busy))
        if rechecked:
            # Still elsewhere after the recheck: the page really was busy, and is counted as such.
            result = result.copy()
            result[busy] = np.where(self._query(pages[todo][busy]) == node, node, -errno_mod.EBUSY)
        self._migrate_s += seconds
        moved = int(np.count_nonzero(result == node))
        failed = Counter(syscalls.errno_name(int(c)) if c < 0 else f"on node {int(c)}" for c in result[result != node])
        status = status.copy()
        status[todo] = result
        self._settle(move.block, state, status)
        self.result.migrations.append(MigrationRecord(
            time_s=self._clock() - self._t0, epoch=self._epoch, chunk=move.block,
            address=move.block * self.tracker.chunk_bytes, reason=move.reason, source_tier=move.source,
            target_tier=move.target, source_node=source_node, target_node=node, pages=int(todo.size), moved=moved,
            bytes=moved * PAGE_SIZE, seconds=seconds,
            outcome="moved" if moved == todo.size else "partial" if moved else "failed",
            failed=dict(failed), busy_rechecked=rechecked))
        if self.view.tier_of(move.block) != move.target:
            return False
        self.ledger.record(move.block, move.source, move.target, move.reason, self._epoch, moved * PAGE_SIZE)
        self.result.ping_pongs = self.ledger.ping_pongs
        return True

    def _settle(self, chunk: int, state: ChunkState, status: np.ndarray) -> None:
        """Record where a chunk's pages are after a move (or a query that found them moved)."""
        state.by_node = node_counts(status)
        tier = self._majority(state.by_node)
        state.tier = tier
        if tier is not None:
            self.view.place(chunk, tier)

    def _query(self, pages: np.ndarray) -> np.ndarray:
        try:
            return self.pages.query(self.pid, pages)
        except NumaError as exc:
            if exc.errno == errno_mod.ESRCH:
                raise TargetGoneError(f"process {self.pid} exited while it was tracked", pid=self.pid) from None
            raise

    def _move(self, pages: np.ndarray, node: int) -> np.ndarray:
        """Per-page status; a call that fails as a whole (ENOMEM, EBUSY...) fails every page with its errno."""
        try:
            return self.pages.move(self.pid, pages, node)
        except (CapabilityError, InvalidNodeError):
            raise
        except NumaError as exc:
            if exc.errno == errno_mod.ESRCH:
                raise TargetGoneError(f"process {self.pid} exited while it was tracked", pid=self.pid) from None
            return np.full(pages.size, -(exc.errno or errno_mod.EIO), dtype=np.int32)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _majority(self, by_node: Mapping[int, int]) -> str | None:
        per_tier: Counter[str] = Counter()
        for node, count in by_node.items():
            tier = self._node_tier.get(node)
            if tier is not None:
                per_tier[tier] += count
        if not per_tier:
            return None
        return max(per_tier, key=lambda name: (per_tier[name], -self._tier[name].rank))


def _reason(view: ChunkView, source: str, target: str) -> str:
    return "promote" if view.rank[target] < view.rank[source] else "demote"


def sample_indices(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n) (all of them when k is 0 or at least n)."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def node_counts(status: np.ndarray) -> dict[int, int]:
    nodes, counts = np.unique(status[status >= 0], return_counts=True)
    return {int(n): int(c) for n, c in zip(nodes, counts, strict=True)}


# -- building one, checked -----------------------------------------------------------------------------------


def attach(config: AttachConfig, *, topology: Topology | None = None,
           has_cap_sys_nice: Callable[[], bool] = syscalls.has_cap_sys_nice, tracker: Tracker | None = None,
           pages: PageMover | None = None, kernel: KernelTiering | None = None) -> AttachedDaemon:
    """Check everything before touching the process, in this order: the settings, the process (exists, readable),
    CAP_SYS_NICE (unless only watching), the tiers (two or more nodes), the kernel knobs (for `kernel`), the policy.
    Nothing is written anywhere until `AttachedDaemon.start`."""
    _check_settings(config)
    if tracker is None:
        tracker = ProcessTracker(config.pid, chunk_bytes=config.chunk_bytes, min_region_bytes=config.min_region_bytes)
        tracker.check_access()
    watching = config.policy == KERNEL_POLICY
    if not watching and not has_cap_sys_nice():
        raise AttachError(
            f"process {config.pid}: moving its pages needs CAP_SYS_NICE, which this process lacks (the daemon moves "
            "the pages it shares with other processes too, MPOL_MF_MOVE_ALL). Run as root or with the capability "
            "(sudo capsh --caps=cap_sys_nice+eip ...); --policy kernel only watches and needs no capability")
    topology = topology or discover("/")
    if config.tier_file is not None:
        tiers = tiers_from_map(load_tier_map(config.tier_file), topology, config.chunk_bytes)
    else:
        tiers = default_tiers(topology)
    require_two_nodes(config.pid, tiers, topology)
    kernel = kernel or KernelTiering("/")
    policy = None
    if watching:
        _check_kernel_baseline(config.pid, kernel)
    else:
        policy = get_policy(config.policy, config.params, PolicyContext(epoch_s=config.epoch_s))
    return AttachedDaemon(config, tiers, policy, tracker, pages or KernelPages(), kernel)


def _check_settings(config: AttachConfig) -> None:
    if config.pid <= 0:
        raise AttachError(f"pid {config.pid}: give the pid of a running process (a positive number)")
    if config.pid == 1:
        raise AttachError("pid 1 is init: moving the pages of the process every other depends on is refused; "
                          "give the pid of the workload")
    if config.pid == os.getpid():
        raise AttachError(f"pid {config.pid} is this daemon itself: give the pid of the workload")
    if (problem := number_problem(config.epoch_s, Range(0, MAX_SECONDS, lo_closed=False))) is not None:
        raise AttachError(f"epoch (seconds) {problem}")
    if config.budget_gbps is not None and (problem := number_problem(config.budget_gbps, GBPS)) is not None:
        raise AttachError(f"budget (GB/s) {problem}; or none for unlimited")
    if config.sample_pages < 0:
        raise AttachError(f"sample_pages={config.sample_pages}: give 0 (every page) or a positive count")
    if config.policy == KERNEL_POLICY and config.params:
        raise AttachError(f"policy {KERNEL_POLICY} takes no parameters (got {', '.join(config.params)}); the kernel's "
                          "own knobs are set by the lab profile kernel-tiering")


def _check_kernel_baseline(pid: int, kernel: KernelTiering) -> None:
    where = kernel.applicability()
    if not where.applicable:
        raise AttachError(f"process {pid}: the kernel tiering baseline cannot run here: {where.reason}")
    knobs = kernel.knobs()
    if not knobs.ready:
        raise AttachError(f"process {pid}: the kernel tiering baseline needs its knobs set: {knobs.describe()}")
