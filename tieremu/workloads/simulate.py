"""Simulate-mode trace replay: a policy's placement decisions played against a request trace, accounting only.

No tensors and no memory: each prefix-block reference is a hit in some tier or a miss, blocks occupy slots of
tiers with block capacities, and a full tier pushes the policy's victim one tier down (out, from the last tier).
Per request in arrival order:

1. the epochs that ended by its arrival run: the policy's plan is carried out within capacities and residency
   is sampled (for STRR);
2. the policy is told which requests come next (this one first);
3. the request's blocks are pinned (never victims while it is served); each hash id is a reference: a hit
   where the block lives, or a miss, and the new block is placed where the policy admits it;
4. the policy observes the request's accesses; its TTFT estimate is its missed tokens at the prefill rate plus
   the bytes of its hits over each tier's read bandwidth.

Moves of a plan are carried out in order. A move takes its block out of the source first, so a promotion and
the demotion it causes can swap two blocks between full tiers. A move into a full tier makes room there as an
admission does; a move whose block is not in its source any more, or is pinned, is skipped and counted.
While the policy picks a victim, the block that overfilled the tier already sits there (one over capacity) and
is pinned: the policy never sees a block in no tier, and never pushes out the one just placed.
Every figure is labelled `simulated`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from tieremu.errors import ConfigError, PolicyError
from tieremu.policy.base import (
    MOVE_REASONS,
    AccessEvent,
    Plan,
    Policy,
    PolicyContext,
    TierState,
    UpcomingRequest,
)
from tieremu.workloads.trace import MOONCAKE_BLOCK_TOKENS, Request

# 512 tokens of Llama-3-8B KV in fp16: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 128 KiB a token.
DEFAULT_BLOCK_BYTES = 64 << 20
# Prefill throughput of an 8B model on one A100-class GPU, order of magnitude.
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0
DEFAULT_EPOCH_S = 0.05
# Requests told to the policy per arrival (the one about to run first): the most a look-ahead window can use.
DEFAULT_UPCOMING = 16
# A block moved back where it came from within this many epochs of its last move is a ping-pong.
DEFAULT_PING_PONG_EPOCHS = 20


@dataclass(frozen=True)
class SimTier:
    name: str
    capacity_blocks: int | None = None  # None = unlimited


@dataclass(frozen=True)
class TierResult:
    name: str
    rank: int
    capacity_blocks: int | None  # as simulated (None when unlimited or lifted for a bound)
    hits: int
    hit_ratio: float  # hits here / all references
    residency: float  # share of resident blocks held here, averaged over epochs
    resident_blocks: int  # at the end of the replay
    read_gbps: float | None  # None: hits here were not charged in the TTFT estimate


@dataclass(frozen=True)
class Tail:
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Tail:
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        ordered = sorted(values)
        return cls(_percentile(ordered, 50), _percentile(ordered, 99), ordered[-1], math.fsum(ordered) / len(ordered))


@dataclass(frozen=True)
class ReplayResult:
    policy: str
    params: dict[str, object]
    requests: int
    references: int
    hits: int
    misses: int
    hit_ratio: float
    tiers: tuple[TierResult, ...]
    evictions: int  # blocks dropped out of the last tier (or evicted by a plan)
    uncached: int  # new blocks no tier could take (every tier full of pinned blocks)
    strr: float  # share of resident KV bytes below the fastest tier, averaged over epochs
    star: float  # share of hits served below the fastest tier
    ttft_ms: Tail
    migration_bytes: int
    migration_gbps: float  # over trace time
    promotions: int
    demotions: int
    prefetches: int
    ping_pongs: int
    moves_skipped: int
    epochs: int
    trace_s: float
    wall_s: float
    policy_cpu_s: float  # time inside policy calls (the replay is one CPU-bound thread)
    block_bytes: int
    prefill_tokens_per_s: float
    capacity_lifted: bool  # the policy is an idealised bound: every tier was treated as unlimited
    origin: str = "simulated"
    ttft_samples_ms: tuple[float, ...] = field(default=(), repr=False)

    def tier(self, name: str) -> TierResult:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    @property
    def fast_hit_ratio(self) -> float:
        return self.tiers[0].hit_ratio

    def to_dict(self, *, samples: bool = False) -> dict[str, object]:
        data = asdict(self)
        if not samples:
            del data["ttft_samples_ms"]
        return data


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def policy_context(requests: Sequence[Request], epoch_s: float = DEFAULT_EPOCH_S) -> PolicyContext:
    """What trace replay can tell a policy: the whole future, for offline bounds such as Belady."""
    return PolicyContext(future=[r.hash_ids for r in requests], epoch_s=epoch_s)


def simulate(requests: Sequence[Request], tiers: Sequence[SimTier], policy: Policy, *,
             epoch_s: float = DEFAULT_EPOCH_S, block_bytes: int = DEFAULT_BLOCK_BYTES,
             tier_read_gbps: Mapping[str, float] | None = None,
             prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
             block_tokens: int = MOONCAKE_BLOCK_TOKENS, upcoming: int = DEFAULT_UPCOMING,
             ping_pong_epochs: int = DEFAULT_PING_PONG_EPOCHS, params: Mapping[str, object] | None = None,
             ) -> ReplayResult:
    """Replay `requests` against `tiers` (fastest first) under `policy`; see the module docstring."""
    _check(tiers, epoch_s, block_bytes, tier_read_gbps, prefill_tokens_per_s, block_tokens, upcoming)
    replay = _Replay(tiers, policy, epoch_s=epoch_s, block_bytes=block_bytes, tier_read_gbps=tier_read_gbps or {},
                     prefill_tokens_per_s=prefill_tokens_per_s, block_tokens=block_tokens,
                     ping_pong_epochs=ping_pong_epochs)
    return replay.run(requests, upcoming, dict(params or {}))


def _check(tiers: Sequence[SimTier], epoch_s: float, block_bytes: int, read_gbps: Mapping[str, float] | None,
           prefill: float, block_tokens: int, upcoming: int) -> None:
    if not tiers:
        raise ConfigError("simulate needs at least one tier")
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ConfigError(f"tier names must be unique, got {names}")
    for t in tiers:
        if t.capacity_blocks is not None and t.capacity_blocks < 1:
            raise ConfigError(f"tier {t.name}: capacity_blocks={t.capacity_blocks} must be 1 or more, or None "
                              "for unlimited")
    for name, gbps in (read_gbps or {}).items():
        if name not in names:
            raise ConfigError(f"tier_read_gbps names tier {name!r}, which is not one of {', '.join(names)}")
        if not gbps > 0:
            raise ConfigError(f"tier_read_gbps[{name}]={gbps} must be positive (GB/s)")
    for key, value in (("epoch_s", epoch_s), ("block_bytes", block_bytes), ("prefill_tokens_per_s", prefill),
                       ("block_tokens", block_tokens)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be positive")
    if upcoming < 1:
        raise ConfigError(f"upcoming={upcoming} must be 1 or more (the request about to run is always told)")


class _Replay:
    """The replay's state; it is also the BlockView the policy reads."""

    def __init__(self, tiers: Sequence[SimTier], policy: Policy, *, epoch_s: float, block_bytes: int,
                 tier_read_gbps: Mapping[str, float], prefill_tokens_per_s: float, block_tokens: int,
                 ping_pong_epochs: int) -> None:
        self.policy = policy
        self.names = tuple(t.name for t in tiers)
        self.rank = {name: i for i, name in enumerate(self.names)}
        self.lifted = policy.lifts_capacity
        self.capacity = [None if self.lifted else t.capacity_blocks for t in tiers]
        self.members: list[dict[int, None]] = [{} for _ in tiers]  # insertion-ordered: oldest first
        self.where: dict[int, int] = {}
        self.pins: set[int] = set()
        self.pinned_in = [0] * len(tiers)
        self.epoch_s = epoch_s
        self.block_bytes = block_bytes
        self.read_gbps = [tier_read_gbps.get(name) for name in self.names]
        self.read_s = [0.0 if g is None else block_bytes / (g * 1e9) for g in self.read_gbps]
        self.prefill = prefill_tokens_per_s
        self.block_tokens = block_tokens
        self.ping_pong_epochs = ping_pong_epochs
        self.epoch = 0
        self.policy_s = 0.0
        self.hits = [0] * len(tiers)
        self.misses = 0
        self.evictions = self.uncached = self.skipped = self.ping_pongs = 0
        self.moved = dict.fromkeys(MOVE_REASONS, 0)
        self.last_move: dict[int, tuple[int, int, int]] = {}  # block -> (epoch, source, target)
        self.residency = [0.0] * len(tiers)
        self.strr_sum = 0.0
        self.samples = 0

    # -- BlockView -------------------------------------------------------------------------------------------
    @property
    def tiers(self) -> tuple[TierState, ...]:
        return tuple(TierState(name, i, self.capacity[i], len(self.members[i])) for i, name in enumerate(self.names))

    def tier_of(self, block: int) -> str | None:
        i = self.where.get(block)
        return None if i is None else self.names[i]

    def blocks_in(self, tier: str) -> Iterable[int]:
        return self.members[self._rank(tier)].keys()

    def pinned(self, block: int) -> bool:
        return block in self.pins

    # -- the replay ------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], upcoming: int, params: dict[str, object]) -> ReplayResult:
        started = time.perf_counter()
        queue = [UpcomingRequest(i, r.arrival_s, r.hash_ids) for i, r in enumerate(requests)]
        ttft_ms: list[float] = []
        start = requests[0].arrival_s if requests else 0.0
        next_epoch_end = start + self.epoch_s
        for index, request in enumerate(requests):
            while next_epoch_end <= request.arrival_s:
                self._run_epoch(next_epoch_end)
                next_epoch_end = start + (self.epoch + 1) * self.epoch_s
            t0 = time.perf_counter()
            self.policy.upcoming(queue[index:index + upcoming])
            self.policy_s += time.perf_counter() - t0
            ttft_ms.append(self._serve(index, request) * 1e3)
        if self.samples == 0:
            self._sample()
        return self._result(requests, ttft_ms, time.perf_counter() - started, params)

    def _serve(self, index: int, request: Request) -> float:
        """One request's references, with its blocks pinned; returns its TTFT estimate in seconds."""
        where, hits, names, now = self.where, self.hits, self.names, request.arrival_s
        self._pin(request.hash_ids)
        events = []
        missed_tokens = 0
        read_s = 0.0
        for block, tokens in zip(request.hash_ids, request.block_tokens(self.block_tokens), strict=True):
            i = where.get(block)
            if i is None:
                self.misses += 1
                missed_tokens += tokens
                self._admit(block)
                events.append(AccessEvent(block, None, now, index))
            else:
                hits[i] += 1
                read_s += self.read_s[i]
                events.append(AccessEvent(block, names[i], now, index))
        t0 = time.perf_counter()
        self.policy.observe(events)
        self.policy_s += time.perf_counter() - t0
        self._unpin()
        return missed_tokens / self.prefill + read_s

    def _run_epoch(self, now: float) -> None:
        self.epoch += 1
        t0 = time.perf_counter()
        plan = self.policy.plan(self, now)
        self.policy_s += time.perf_counter() - t0
        if plan.moves or plan.evictions:
            self._execute(plan)
        self._sample()

    def _sample(self) -> None:
        sizes = [len(m) for m in self.members]
        total = sum(sizes)
        if total:
            self.samples += 1
            self.strr_sum += (total - sizes[0]) / total
            for i, size in enumerate(sizes):
                self.residency[i] += size / total

    def _execute(self, plan: Plan) -> None:
        for block in plan.evictions:
            if block in self.where and block not in self.pins:
                self._remove(block)
                self.evictions += 1
        for move in plan.moves:
            if move.reason not in MOVE_REASONS:
                raise PolicyError(f"policy {self.policy.name} planned a move with reason {move.reason!r}; valid: "
                                  f"{', '.join(MOVE_REASONS)}")
            source, target = self._rank(move.source), self._rank(move.target)
            if (target < source) != (move.reason != "demote") or source == target:
                raise PolicyError(f"policy {self.policy.name} planned {move.reason} of block {move.block} from "
                                  f"{move.source} to {move.target}: promote and prefetch go to a faster tier, "
                                  "demote to a slower one")
            if self.where.get(move.block) != source or move.block in self.pins:
                self.skipped += 1
                continue
            self._remove(move.block)
            if self._fit(move.block, target):
                self._record_move(move.block, source, target, move.reason)
            else:
                self._place(move.block, source)  # it just left, so there is room
                self.skipped += 1

    def _admit(self, block: int) -> None:
        t0 = time.perf_counter()
        tier = self.policy.admit(block, self)
        self.policy_s += time.perf_counter() - t0
        for i in range(self._rank(tier), len(self.names)):
            if self._fit(block, i):
                return
        self.uncached += 1

    def _fit(self, block: int, i: int) -> bool:
        """Put a block that is in no tier into tier i; if that overfills it, push the policy's victim one tier
        down (recursively), or out of the last tier. False, with nothing changed, if tier i is full of pinned
        blocks. The newcomer is placed (and pinned) before the policy is asked, so the policy never sees a block
        that is nowhere, nor picks the newcomer itself."""
        cap = self.capacity[i]
        members = self.members[i]
        if cap is not None and len(members) >= cap and len(members) <= self.pinned_in[i]:
            return False
        self._place(block, i)
        if cap is None or len(members) <= cap:
            return True
        guard = block not in self.pins
        if guard:
            self.pins.add(block)
            self.pinned_in[i] += 1
        t0 = time.perf_counter()
        victim = self.policy.victim(self.names[i], self)
        self.policy_s += time.perf_counter() - t0
        if guard:
            self.pins.discard(block)
            self.pinned_in[i] -= 1
        if self.where.get(victim) != i or victim in self.pins or victim == block:
            state = "pinned" if victim in self.pins or victim == block else f"in {self.tier_of(victim) or 'no tier'}"
            raise PolicyError(f"policy {self.policy.name} chose block {victim} as the victim of tier {self.names[i]},"
                              f" but it is {state}: a victim must be an unpinned block of that tier")
        self._remove(victim)
        if i + 1 < len(self.names) and self._fit(victim, i + 1):
            self._record_move(victim, i, i + 1, "demote")
        else:
            self.evictions += 1
        return True

    def _place(self, block: int, i: int) -> None:
        self.members[i][block] = None
        self.where[block] = i
        if block in self.pins:
            self.pinned_in[i] += 1

    def _remove(self, block: int) -> int:
        i = self.where.pop(block)
        del self.members[i][block]
        if block in self.pins:
            self.pinned_in[i] -= 1
        return i

    def _pin(self, blocks: Sequence[int]) -> None:
        self.pins = set(blocks)
        for block in self.pins:
            i = self.where.get(block)
            if i is not None:
                self.pinned_in[i] += 1

    def _unpin(self) -> None:
        self.pins = set()
        self.pinned_in = [0] * len(self.names)

    def _record_move(self, block: int, source: int, target: int, reason: str) -> None:
        self.moved[reason] += 1
        last = self.last_move.get(block)
        if last is not None and last[1] == target and last[2] == source and \
                self.epoch - last[0] <= self.ping_pong_epochs:
            self.ping_pongs += 1
        self.last_move[block] = (self.epoch, source, target)

    def _rank(self, tier: str) -> int:
        try:
            return self.rank[tier]
        except KeyError:
            raise PolicyError(f"policy {self.policy.name} named tier {tier!r}; tiers: {', '.join(self.names)}") \
                from None

    def _result(self, requests: Sequence[Request], ttft: list[float], wall_s: float,
                params: dict[str, object]) -> ReplayResult:
        misses = self.misses
        references = sum(self.hits) + misses
        hits = sum(self.hits)
        trace_s = requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0
        moves = sum(self.moved.values())
        tiers = tuple(
            TierResult(name=name, rank=i, capacity_blocks=self.capacity[i], hits=self.hits[i],
                       hit_ratio=self.hits[i] / references if references else 0.0,
                       residency=self.residency[i] / self.samples if self.samples else 0.0,
                       resident_blocks=len(self.members[i]), read_gbps=self.read_gbps[i])
            for i, name in enumerate(self.names))
        return ReplayResult(
            policy=self.policy.name, params=params, requests=len(requests), references=references, hits=hits,
            misses=misses, hit_ratio=hits / references if references else 0.0, tiers=tiers,
            evictions=self.evictions, uncached=self.uncached,
            strr=self.strr_sum / self.samples if self.samples else 0.0,
            star=(hits - self.hits[0]) / hits if hits else 0.0,
            ttft_ms=Tail.of(ttft), migration_bytes=moves * self.block_bytes,
            migration_gbps=moves * self.block_bytes / trace_s / 1e9 if trace_s > 0 else 0.0,
            promotions=self.moved["promote"], demotions=self.moved["demote"], prefetches=self.moved["prefetch"],
            ping_pongs=self.ping_pongs, moves_skipped=self.skipped, epochs=self.epoch, trace_s=trace_s,
            wall_s=wall_s, policy_cpu_s=self.policy_s, block_bytes=self.block_bytes,
            prefill_tokens_per_s=self.prefill, capacity_lifted=self.lifted,
            ttft_samples_ms=tuple(ttft))
