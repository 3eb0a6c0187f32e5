"""The one interface every placement policy implements, and the bookkeeping several policies share.

A policy never moves memory itself. It answers questions (where does a new block go, which block leaves a full
tier) and returns a plan once per epoch; whoever drives it (the simulator, the daemon, the execute mode) carries the
plan out within the tiers' capacities. Tiers are ordered fastest first: rank 0 is the fastest.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import ClassVar, NamedTuple, Protocol

import numpy as np

from tieremu.errors import PolicyError

MOVE_REASONS = ("promote", "demote", "prefetch")
# How a policy runs (the driver reads `Policy.family`):
# - demand: a demand cache (vLLM, LMCache, SGLang HiCache). Every reference is a hit in the fastest tier, a hit in a
#   slower tier (served there, then moved at once to the tier `admit` names, normally the fastest), or a miss
#   (placed where `admit` says). A full tier pushes its victim one tier down. The policy learns of each access as
#   it happens (`observe` with one event), and never plans.
# - daemon: a tiering daemon. Accesses are served where the block lives; the policy moves blocks in its epoch
#   `plan`, within the run's migration budget.
# - static: placement chosen once, at allocation; never moved.
FAMILIES = ("demand", "daemon", "static")


@dataclass(frozen=True, slots=True)
class TierState:
    """Occupancy a policy sees of one tier."""

    name: str
    rank: int
    capacity_blocks: int | None  # None = unlimited
    used_blocks: int

    @property
    def has_room(self) -> bool:
        return self.capacity_blocks is None or self.used_blocks < self.capacity_blocks


class AccessEvent(NamedTuple):
    """One read of a block. A named tuple, not a frozen dataclass: replays and the daemon build one per block
    reference, and a tuple builds in a third of the time."""

    block: int  # block key (the prefix hash id)
    tier: str | None  # tier that served it; None = miss (the block was just created)
    time: float  # seconds (trace time in simulate; monotonic time in execute)
    request: int  # request index
    layer: int | None = None  # None when the block spans all layers, and always in simulate


@dataclass(frozen=True)
class AccessCounts:
    """One batch of accesses (a daemon epoch's) aggregated per block, as numpy columns: what a policy that only
    counts, or only wants the last access, needs, without one AccessEvent per access.

    Rows are the distinct blocks read, ordered by their last access (the order a walk over the events would leave
    them in). Every access is a read of a resident block, so every tier is a tier (never a miss), and all accesses
    of a batch carry one time. The per-access columns keep the order of the events, so a policy can aggregate
    further with numpy; `events` is the same batch as AccessEvents (built only if read), what `Policy.observe`
    gets.
    """

    tiers: tuple[str, ...]  # tier names: the tier columns index into it (fastest first)
    time: float  # seconds: the time of every access in the batch (AccessEvent.time)
    block: np.ndarray  # per row: the block (int64, or object for keys beyond int64)
    tier: np.ndarray  # per row: index of the tier of its last access
    first_tier: np.ndarray  # per row: index of the tier of its first access
    count: np.ndarray  # per row: accesses (int64)
    first: np.ndarray  # per row: index of its first access in the batch
    last: np.ndarray  # per row: index of its last access in the batch (increasing down the rows)
    request: np.ndarray  # per row: the request of its last access
    layer: np.ndarray | None  # per row: its layer (per-layer blocks); None when blocks span all layers
    row: np.ndarray  # per access: its row
    access_tier: np.ndarray  # per access: index of the tier that served it
    access_request: np.ndarray  # per access: its request
    events: Sequence[AccessEvent] = field(repr=False, default=())

    def __len__(self) -> int:
        return len(self.block)

    @property
    def accesses(self) -> int:
        return len(self.row)

    def by_tier(self) -> list[tuple[str, np.ndarray]]:
        """Per tier of last access: its rows, in row order."""
        tier = self.tier
        present = np.flatnonzero(np.bincount(tier)).tolist() if len(tier) else []  # a few tiers: cheaper than unique
        if len(present) == 1:
            return [(self.tiers[present[0]], np.arange(len(tier)))]
        return [(self.tiers[t], np.flatnonzero(tier == t)) for t in present]

    @property
    def last_time(self) -> np.ndarray:
        """Per row: the time of its last access."""
        return np.full(len(self.block), self.time)

    @classmethod
    def of(cls, tiers: Sequence[str], time: float, block: np.ndarray, tier: np.ndarray, request: np.ndarray,
           layer: np.ndarray | None = None, events: Sequence[AccessEvent] = ()) -> AccessCounts:
        """Aggregate per-access columns (in access order) per block, with numpy only: one stable sort."""
        n = len(block)
        order = np.argsort(block, kind="stable")
        ordered = block[order]
        starts_run = np.empty(n, dtype=bool)
        starts_run[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=starts_run[1:])
        starts = np.flatnonzero(starts_run)
        ends = np.append(starts[1:], n) if n else starts
        by_last = np.argsort(order[ends - 1], kind="stable")
        first, last, count = order[starts][by_last], order[ends - 1][by_last], (ends - starts)[by_last]
        row_of_run = np.empty(len(starts), dtype=np.int64)
        row_of_run[by_last] = np.arange(len(starts))
        row = np.empty(n, dtype=np.int64)
        row[order] = row_of_run[np.cumsum(starts_run) - 1]
        return cls(tuple(tiers), time, block[last], tier[last], tier[first], count.astype(np.int64), first, last,
                   request[last], None if layer is None else layer[last], row, tier, request, events)


@dataclass(frozen=True, slots=True)
class Move:
    block: int
    source: str
    target: str
    reason: str  # one of MOVE_REASONS


@dataclass
class Plan:
    moves: list[Move] = field(default_factory=list)
    evictions: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UpcomingRequest:
    """A request the scheduler is about to run: what a scheduler-aware policy may prefetch for."""

    request: int
    arrival: float  # seconds
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know beyond the live view: offline policies need the future, most need nothing."""

    # Block keys of every request, indexed by request index; only trace replay can give it (Belady needs it).
    future: Sequence[Sequence[int]] | None = None
    epoch_s: float = 0.05


class BlockView(Protocol):
    """Read-only view of where blocks are, given to policies."""

    @property
    def tiers(self) -> Sequence[TierState]: ...

    def tier_of(self, block: int) -> str | None: ...

    def blocks_in(self, tier: str) -> Iterable[int]: ...

    def pinned(self, block: int) -> bool:
        """True for blocks of the request being served: they must not be chosen as victims."""
        ...


class Policy(ABC):
    """A placement policy. Subclasses take their parameters as keyword-only constructor arguments with defaults
    (the registry validates names and types against them) and the PolicyContext as the only positional one."""

    name: ClassVar[str]
    family: ClassVar[str] = "daemon"  # one of FAMILIES
    # An idealised bound (the L100/L0 of the CXL papers): the simulator treats every tier as unlimited for it, so
    # it shows what placement alone gives when the tier it fills could hold everything. Results say so.
    lifts_capacity: ClassVar[bool] = False

    def __init__(self, context: PolicyContext | None = None) -> None:
        self.context = context or PolicyContext()

    @abstractmethod
    def admit(self, block: int, view: BlockView) -> str:
        """The tier a new block is placed in (the driver makes room there, pushing victims down)."""

    def observe(self, events: Sequence[AccessEvent]) -> None:  # noqa: B027 - optional hook
        """Accesses since the last call, in order."""

    def observe_counts(self, counts: AccessCounts) -> None:
        """Accesses since the last call, aggregated per block (the migration daemon's batched path: see
        `observes_counts`). A policy whose state is a function of per-block counts and last accesses overrides it
        to skip building and walking one event per access; the default hands the events to `observe`."""
        self.observe(counts.events)

    @abstractmethod
    def victim(self, tier: str, view: BlockView) -> int:
        """A resident, unpinned block of `tier` to push one tier down (or out, from the last tier).
        Only called when the tier holds at least one unpinned block."""

    def plan(self, view: BlockView, now: float) -> Plan:
        """Once per epoch: moves and evictions to carry out now. A plan depends on what the policy has seen, not on
        `now` alone: after an empty plan, a driver need not ask again until an access or a move happens."""
        return Plan()

    def moved(self, block: int, source: str, target: str | None) -> None:  # noqa: B027 - optional hook
        """The driver moved `block` from `source` to `target` (None: out of the last tier), after a plan, a victim
        push or a promotion on access, or placed a new block in `target` when `source`, the tier the policy admitted
        it to, was full of pinned blocks. Policies that keep per-tier rankings re-file the block here."""

    def upcoming(self, requests: Sequence[UpcomingRequest]) -> None:  # noqa: B027 - optional hook
        """Scheduler hint: the request about to be served first, then the next arrivals."""


def observes_counts(policy: Policy) -> bool:
    """True when a driver should hand this policy its accesses as AccessCounts (observe_counts) rather than events:
    its observe_counts is defined where its observe is, or in a subclass of that class. A subclass that overrides
    only `observe` (a user policy deriving from a built-in one) keeps getting every event."""
    mro = type(policy).__mro__
    counts = next(c for c in mro if "observe_counts" in c.__dict__)
    events = next(c for c in mro if "observe" in c.__dict__)
    return counts is not Policy and issubclass(counts, events)


def checked_victim(policy: Policy, tier: str, view: BlockView) -> int:
    """The policy's victim for `tier`; PolicyError if it is not an unpinned block of that tier (a driver must
    never push out a block in use, nor one that is elsewhere)."""
    victim = policy.victim(tier, view)
    if view.tier_of(victim) != tier or view.pinned(victim):
        state = "pinned" if view.pinned(victim) else f"in {view.tier_of(victim) or 'no tier'}"
        raise PolicyError(f"policy {policy.name} chose block {victim} as the victim of tier {tier}, but it is "
                          f"{state}: a victim must be an unpinned block of that tier")
    return victim


def first_unpinned(view: BlockView, tier: str) -> int:
    """The oldest resident unpinned block of a tier in the view's order: a fallback victim for any policy."""
    for block in view.blocks_in(tier):
        if not view.pinned(block):
            return block
    raise PolicyError(f"tier {tier!r} holds no unpinned block to push out; a driver asks for a victim only when "
                      "one exists")


class RankedBlocks:
    """Blocks ranked by a score the policy keeps, per tier, with the lowest and the highest found in O(log n).

    The policy records where it believes each block is; a block the driver moved without telling it is
    re-filed when it surfaces (checked against the view), so beliefs never need to be exact, only mostly right.
    Heaps hold stale entries until they surface (lazy deletion); they are rebuilt when stale entries dominate.
    Ties on score go to the block scored longest ago for lowest(), most recently for highest().
    """

    def __init__(self, *, track_highest: bool = False) -> None:
        self._score: dict[int, float] = {}
        self._tier: dict[int, str] = {}
        self._stamp: dict[int, int] = {}
        self._low: dict[str, list[tuple[float, int, int]]] = {}
        self._high: dict[str, list[tuple[float, int, int]]] | None = {} if track_highest else None
        self._clock = 0
        self._walks = 0

    def __contains__(self, block: int) -> bool:
        return block in self._score

    def score(self, block: int) -> float | None:
        return self._score.get(block)

    def tier(self, block: int) -> str | None:
        return self._tier.get(block)

    def set(self, block: int, tier: str, score: float) -> None:
        self._clock += 1
        stamp = self._clock
        self._score[block] = score
        self._tier[block] = tier
        self._stamp[block] = stamp
        low = self._low.setdefault(tier, [])
        heapq.heappush(low, (score, stamp, block))
        if self._high is not None:
            heapq.heappush(self._high.setdefault(tier, []), (-score, -stamp, block))
        if len(low) > 4 * len(self._score) + 1024:
            self._rebuild()

    def scores(self, blocks: Iterable[int], default: float) -> list[float]:
        """The scores of many blocks (`default` for a block not ranked)."""
        get = self._score.get
        return [get(b, default) for b in blocks]

    def set_many(self, tier: str, blocks: Sequence[int], scores: Sequence[float]) -> None:
        """set() of each block in turn, all in `tier` (later ones are the more recently scored on ties), with the
        dictionary updates in C and the heaps pushed, or extended and re-heapified when that is cheaper. Stamps
        only ever break ties within a tier, so a caller may set each tier's blocks in its own call."""
        n = len(blocks)
        if not n:
            return
        start = self._clock + 1
        self._clock += n
        stamps = range(start, start + n)
        self._score.update(zip(blocks, scores, strict=True))
        self._tier.update(zip(blocks, [tier] * n, strict=True))
        self._stamp.update(zip(blocks, stamps, strict=True))
        low = self._low.setdefault(tier, [])
        _push_all(low, list(zip(scores, stamps, blocks, strict=True)))
        if self._high is not None:
            _push_all(self._high.setdefault(tier, []),
                      list(zip([-x for x in scores], range(-start, -start - n, -1), blocks, strict=True)))
        if len(low) > 4 * len(self._score) + 1024:
            self._rebuild()

    def move(self, block: int, tier: str) -> None:
        """File a block under another tier, keeping its score."""
        score = self._score.get(block)
        if score is not None and self._tier[block] != tier:
            self.set(block, tier, score)

    def forget(self, block: int) -> None:
        if self._score.pop(block, None) is not None:
            del self._tier[block], self._stamp[block]

    def follow(self, block: int, target: str | None) -> None:
        """File a block where the driver moved it (None: it left the last tier and is forgotten)."""
        if target is None:
            self.forget(block)
        else:
            self.move(block, target)

    def pushed_down(self, block: int, tier: str, order: Sequence[str]) -> None:
        """Follow a victim the driver pushes from `tier` one tier down `order`, or out of the last tier."""
        rank = order.index(tier)
        if rank + 1 < len(order):
            self.move(block, order[rank + 1])
        else:
            self.forget(block)

    def lowest(self, tier: str, view: BlockView, *, skip: Callable[[int], bool] | None = None) -> int | None:
        """The lowest-scored block really in `tier`, not pinned and not skipped; None if there is none."""
        with self.walk(tier, view) as walk:
            return walk.next_block(skip)

    def highest(self, tier: str, view: BlockView, *, skip: Callable[[int], bool] | None = None) -> int | None:
        with self.walk(tier, view, highest=True) as walk:
            return walk.next_block(skip)

    def walk(self, tier: str, view: BlockView, *, highest: bool = False) -> RankedWalk:
        """Blocks of a tier from the lowest score up (or highest down), for a policy taking several in a row.
        Use it as a context manager: what it passed over is put back when it closes."""
        heaps = self._low
        if highest:
            if self._high is None:
                raise PolicyError("RankedBlocks(track_highest=True) is needed to walk from the highest score")
            heaps = self._high
        return RankedWalk(self, heaps.setdefault(tier, []), tier, view)

    def _rebuild(self) -> None:
        if self._walks:
            return  # a walk holds the heaps; the next set() after it closes rebuilds
        self._low = {}
        high: dict[str, list[tuple[float, int, int]]] | None = {} if self._high is not None else None
        for block, score in self._score.items():
            tier, stamp = self._tier[block], self._stamp[block]
            self._low.setdefault(tier, []).append((score, stamp, block))
            if high is not None:
                high.setdefault(tier, []).append((-score, -stamp, block))
        for heap in self._low.values():
            heapq.heapify(heap)
        if high is not None:
            for heap in high.values():
                heapq.heapify(heap)
            self._high = high


def _push_all(heap: list[tuple[float, int, int]], entries: list[tuple[float, int, int]]) -> None:
    if 4 * len(entries) > len(heap):  # heapify is linear in the heap: cheaper than many pushes into a small one
        heap.extend(entries)
        heapq.heapify(heap)
    else:  # the pushes driven by map() in C: half the time of a Python loop over them
        deque(map(heapq.heappush, repeat(heap, len(entries)), entries), maxlen=0)


class RankedWalk:
    """One pass over a tier's heap in RankedBlocks; see RankedBlocks.walk."""

    def __init__(self, owner: RankedBlocks, heap: list[tuple[float, int, int]], tier: str, view: BlockView) -> None:
        self._owner = owner
        self._heap = heap
        self._tier = tier
        self._view = view
        self._passed: list[tuple[float, int, int]] = []

    def __enter__(self) -> RankedWalk:
        self._owner._walks += 1
        return self

    def __exit__(self, *exc: object) -> None:
        heap = self._heap
        for entry in self._passed:
            heapq.heappush(heap, entry)
        self._passed = []
        self._owner._walks -= 1

    def next_block(self, skip: Callable[[int], bool] | None = None) -> int | None:
        """The next block really in the tier, unpinned and not skipped; None when there are no more."""
        owner, heap, tier, view = self._owner, self._heap, self._tier, self._view
        stamps, tiers = owner._stamp, owner._tier
        while heap:
            entry = heapq.heappop(heap)
            block = entry[2]
            if stamps.get(block) != abs(entry[1]) or tiers.get(block) != tier:
                continue  # superseded by a later score or filing
            actual = view.tier_of(block)
            if actual != tier:
                if actual is None:
                    owner.forget(block)
                else:
                    owner.move(block, actual)
                continue
            self._passed.append(entry)
            if view.pinned(block) or (skip is not None and skip(block)):
                continue
            return block
        return None
