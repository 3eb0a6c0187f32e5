"""Simulate-mode trace replay: a policy's placement decisions played against a request trace, accounting only.

No tensors and no memory: each prefix-block reference is a hit in some tier or a miss, blocks occupy slots of
tiers with block capacities, and a full tier pushes the policy's victim one tier down (out, from the last tier).
Requests run in file order; requests sharing a timestamp are spread evenly over its millisecond, so that epochs can
fall between them. Per request:

1. the epochs that ended by its arrival run: a tiering daemon's plan is carried out within capacities and the
   migration budget, and residency is sampled (for STRR). An epoch after an empty plan with nothing seen since
   is not planned again (it costs O(1): its residency sample is the last one);
2. the policy is told which requests come next (this one first);
3. each hash id is a reference: a hit where the block lives, or a miss, and the new block is placed where the
   policy admits it. A block is pinned from its reference until the request ends (the GPU holds every block the
   request has read so far: it is never a victim meanwhile); `pin=False` turns this off, to compare with textbook
   caches on the flattened stream. (LRU's victim is never one of those most recent blocks anyway, so pinning
   changes LRU only when a request needs more blocks than a tier holds.) A demand cache (policy family "demand")
   also moves a block hit in a slower tier at once to the tier its `admit` names, and observes every access as it
   happens; other policies observe the request's accesses after it;
4. its TTFT estimate is its missed tokens at the prefill rate, plus the bytes of its hits over each tier's read
   bandwidth, plus the longest wait for a block it reads that is still in flight.

Migrations cost. Every move (a promotion on access, a victim pushed down, a plan's move) takes block_bytes over the
tier pair's bandwidth (the lower of the two tiers' read bandwidths, else DEFAULT_MOVE_GBPS), capped by the run's
migration budget, on one migration channel that carries one block at a time: a move starts when the channel is
free and the block is not readable at its target until it lands. A move into or out of a compressed tier
(`tier_codecs`) carries the block's compressed bytes instead, over the tiers' raw read rates, plus the measured
(de)compression of the block (kv/compress_tiers.move_cost), as the KV pool's moves do. A demand cache's moves always
queue; a plan's move that could not start within its epoch is deferred (counted, not carried out). Migration bytes
are what the moves carried (compressed where they were); migration GB/s is those bytes over the span from the first
arrival to the later of the last arrival and the last landing, so it never exceeds the budget.

Moves of a plan are carried out in order. A move takes its block out of the source first, so a promotion and
the demotion it causes can swap two blocks between full tiers. A move into a full tier makes room there as an
admission does; a move whose block is not in its source any more, or is pinned, is skipped and counted.
While the policy picks a victim, the block that overfilled the tier already sits there (one over capacity) and
is pinned: the policy never sees a block in no tier, and never pushes out the one just placed. Every move the
driver carries out is reported to the policy (`Policy.moved`).

The built-in demand caches (lru, lfu, belady) run in a compiled core (tieremu/native/replay.c, `core="auto"`)
with results identical to this module's Python path, which runs every other policy. Every figure is labelled
`simulated`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

from tieremu.errors import ConfigError, PolicyError
from tieremu.kv.compress_tiers import TierCodec, move_cost
from tieremu.policy.base import (
    AccessEvent,
    Plan,
    Policy,
    PolicyContext,
    TierState,
    UpcomingRequest,
)
from tieremu.policy.engine import (
    DEFAULT_PING_PONG_EPOCHS,
    MigrationChannel,
    MoveLedger,
    Step,
    admit,
    check_move,
    make_room,
    rank_in,
)
from tieremu.record.stats import percentile
from tieremu.workloads.trace import MOONCAKE_BLOCK_TOKENS, Request

# 512 tokens of Llama-3-8B KV in fp16: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 128 KiB a token.
DEFAULT_BLOCK_BYTES = 64 << 20
# Prefill throughput of an 8B model on one A100-class GPU, order of magnitude.
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0
DEFAULT_EPOCH_S = 0.05
# Requests told to the policy per arrival (the one about to run first): the most a look-ahead window can use.
DEFAULT_UPCOMING = 16
# A block moved back where it came from within this many epochs of its last move is a ping-pong.
# Bandwidth of a move between two tiers when neither has a read bandwidth: a PCIe 4.0 x16 link, order of magnitude.
DEFAULT_MOVE_GBPS = 16.0
CORES = ("auto", "python", "native")


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
        return cls(percentile(ordered, 50), percentile(ordered, 99), ordered[-1], math.fsum(ordered) / len(ordered))


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
    family: str = "daemon"  # the policy's family: demand, daemon or static (tieremu.policy.base.FAMILIES)
    pinned: bool = True  # the blocks the request being served has read were pinned
    budget_gbps: float | None = None  # the migration budget (None: only the tier pairs' bandwidths limit moves)
    moves_deferred: int = 0  # plan moves not carried out: the migration channel was busy past their epoch
    waited_requests: int = 0  # requests that waited for a block in flight
    core: str = "python"  # which replay core ran: python or native
    prepare_s: float = 0.0  # native: flattening the trace into the core's arrays (outside wall_s, as parsing is)
    ttft_samples_ms: tuple[float, ...] = field(default=(), repr=False)

    def tier(self, name: str) -> TierResult:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    @property
    def fast_hit_ratio(self) -> float:
        return self.tiers[0].hit_ratio

    @property
    def moves(self) -> int:
        return self.promotions + self.demotions + self.prefetches

    def to_dict(self, *, samples: bool = False) -> dict[str, object]:
        data = asdict(self)
        if not samples:
            del data["ttft_samples_ms"]
        return data


def policy_context(requests: Sequence[Request], epoch_s: float = DEFAULT_EPOCH_S) -> PolicyContext:
    """What trace replay can tell a policy: the whole future, for offline bounds such as Belady."""
    return PolicyContext(future=[r.hash_ids for r in requests], epoch_s=epoch_s)


@dataclass(frozen=True)
class Settings:
    """A replay's settings, as both cores read them."""

    names: tuple[str, ...]
    capacity: tuple[int | None, ...]  # as simulated (None: unlimited, or lifted for a bound)
    epoch_s: float
    block_bytes: int
    read_gbps: tuple[float | None, ...]
    read_s: tuple[float, ...]  # a block's read time per tier (0 where no bandwidth was given)
    move_s: tuple[tuple[float, ...], ...]  # a block's move time from tier i to tier j, budget included
    prefill: float
    block_tokens: int
    ping_pong_epochs: int
    pin: bool
    budget_gbps: float | None
    # The bytes a move from tier i to tier j carries (compressed where an end is compressed); () when every move
    # carries block_bytes.
    move_bytes: tuple[tuple[int, ...], ...] = ()

    def bytes_of(self, source: int, target: int) -> int:
        return self.move_bytes[source][target] if self.move_bytes else self.block_bytes


def simulate(requests: Sequence[Request], tiers: Sequence[SimTier], policy: Policy, *,
             epoch_s: float = DEFAULT_EPOCH_S, block_bytes: int = DEFAULT_BLOCK_BYTES,
             tier_read_gbps: Mapping[str, float] | None = None,
             prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
             block_tokens: int = MOONCAKE_BLOCK_TOKENS, upcoming: int = DEFAULT_UPCOMING,
             ping_pong_epochs: int = DEFAULT_PING_PONG_EPOCHS, params: Mapping[str, object] | None = None,
             pin: bool = True, budget_gbps: float | None = None, core: str = "auto",
             tier_codecs: Mapping[str, TierCodec] | None = None) -> ReplayResult:
    """Replay `requests` against `tiers` (fastest first) under `policy`; see the module docstring. `core` picks
    the compiled core (native: built-in demand caches only), this module's loop (python), or the first that can.
    `tier_codecs` (kv/compress_tiers.tier_codecs): the compressed tiers, whose moves carry compressed bytes (their
    hits' rate is already in tier_read_gbps)."""
    _check(tiers, epoch_s, block_bytes, tier_read_gbps, prefill_tokens_per_s, block_tokens, upcoming, budget_gbps,
           core)
    settings = _settings(tiers, policy, epoch_s, block_bytes, tier_read_gbps or {}, prefill_tokens_per_s,
                         block_tokens, ping_pong_epochs, pin, budget_gbps, tier_codecs or {})
    if core != "python":
        from tieremu.workloads import replay_core  # the compiled core's driver

        if replay_core.supports(policy):
            return replay_core.run(requests, settings, policy, dict(params or {}))
        if core == "native":
            raise ConfigError(f"core=native runs the built-in demand caches ({', '.join(replay_core.NATIVE)}), not "
                              f"{policy.name}; use core=auto or python")
    return _Replay(settings, policy).run(requests, upcoming, dict(params or {}))


def arrival_times(requests: Sequence[Request]) -> list[float]:
    """Seconds of each request's arrival, requests sharing a timestamp spread evenly over its millisecond in file
    order (so that an epoch can end between them)."""
    times: list[float] = []
    i, n = 0, len(requests)
    while i < n:
        ms = requests[i].timestamp_ms
        j = i + 1
        while j < n and requests[j].timestamp_ms == ms:
            j += 1
        times.extend((ms + k / (j - i)) / 1000.0 for k in range(j - i))
        i = j
    return times


def epochs_due(start: float, epoch_s: float, now: float) -> int:
    """How many epochs ended by `now` (the k-th ends at start + k * epoch_s): O(1), whatever the gap."""
    k = max(0, int((now - start) / epoch_s))
    while start + (k + 1) * epoch_s <= now:
        k += 1
    while k > 0 and start + k * epoch_s > now:
        k -= 1
    return k


def move_gbps(read_gbps: Sequence[float | None], source: int, target: int) -> float:
    """A move's bandwidth between two tiers: the lower of their read bandwidths, else DEFAULT_MOVE_GBPS."""
    known = [g for g in (read_gbps[source], read_gbps[target]) if g is not None]
    return min(known) if known else DEFAULT_MOVE_GBPS


def _settings(tiers: Sequence[SimTier], policy: Policy, epoch_s: float, block_bytes: int,
              tier_read_gbps: Mapping[str, float], prefill: float, block_tokens: int, ping_pong_epochs: int,
              pin: bool, budget_gbps: float | None, codecs: Mapping[str, TierCodec]) -> Settings:
    names = tuple(t.name for t in tiers)
    read = tuple(tier_read_gbps.get(name) for name in names)
    n = len(names)
    # A compressed tier's moves run at its raw read rate (its hits' rate in `read` includes the dequantization).
    link = tuple(codecs[name].read_gbps if name in codecs else read[i] for i, name in enumerate(names))
    cost = [[move_cost(block_bytes, codecs.get(names[i]), codecs.get(names[j])) for j in range(n)] for i in range(n)]
    move_s = tuple(tuple(cost[i][j][0] / (min(move_gbps(link, i, j), budget_gbps or math.inf) * 1e9) + cost[i][j][1]
                         for j in range(n)) for i in range(n))
    return Settings(names=names,
                    capacity=tuple(None if policy.lifts_capacity else t.capacity_blocks for t in tiers),
                    epoch_s=epoch_s, block_bytes=block_bytes, read_gbps=read,
                    read_s=tuple(0.0 if g is None else block_bytes / (g * 1e9) for g in read), move_s=move_s,
                    move_bytes=tuple(tuple(c[0] for c in row) for row in cost),
                    prefill=prefill, block_tokens=block_tokens, ping_pong_epochs=ping_pong_epochs, pin=pin,
                    budget_gbps=budget_gbps)


def _check(tiers: Sequence[SimTier], epoch_s: float, block_bytes: int, read_gbps: Mapping[str, float] | None,
           prefill: float, block_tokens: int, upcoming: int, budget_gbps: float | None, core: str) -> None:
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
    if budget_gbps is not None and not budget_gbps > 0:
        raise ConfigError(f"budget_gbps={budget_gbps} must be positive (GB/s), or None for no budget")
    if core not in CORES:
        raise ConfigError(f"core={core!r}; valid: {', '.join(CORES)}")


_NO_TRIAL = nullcontext()


class _Replay:
    """The replay's state; it is the placement engine's Board (tieremu.policy.engine), mutated as the engine
    decides (nothing needs staging: no memory moves), and the BlockView the policy reads."""

    def __init__(self, settings: Settings, policy: Policy) -> None:
        self.s = settings
        self.policy = policy
        self.demand = policy.family == "demand"
        self.names = settings.names
        self.rank = {name: i for i, name in enumerate(self.names)}
        self.capacity = list(settings.capacity)
        n = len(self.names)
        self.members: list[dict[int, None]] = [{} for _ in range(n)]  # insertion-ordered: oldest first
        self.where: dict[int, int] = {}
        self.pins: set[int] = set()
        self.pinned_in = [0] * n
        self.epoch = 0
        self.now = 0.0
        self.policy_s = 0.0
        self.hits = [0] * n
        self.misses = 0
        self.evictions = self.uncached = self.skipped = self.deferred = self.waited = 0
        self.ledger = MoveLedger(settings.ping_pong_epochs)  # ping-pongs counted in epochs
        self.lands: dict[int, float] = {}  # block -> when its latest move lands
        self.channel = MigrationChannel()
        self.residency = [0.0] * n
        self.strr_sum = 0.0
        self.samples = 0
        self.dirty = True  # something happened since the last empty plan

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

    # -- Board (tieremu.policy.engine) -------------------------------------------------------------------------
    def used_in(self, rank: int) -> int:
        return len(self.members[rank])

    def capacity_of(self, rank: int) -> int | None:
        return self.capacity[rank]

    def pinned_count(self, rank: int) -> int:
        return self.pinned_in[rank]

    def show(self, block: int, rank: int) -> None:
        self._place(block, rank)

    def hide(self, block: int) -> None:
        self._remove(block)

    def pick_victim(self, policy: Policy, rank: int, newcomer: int) -> int:
        guard = newcomer not in self.pins
        if guard:  # pinned only while the policy chooses: the newcomer is never its own victim
            self.pins.add(newcomer)
            self.pinned_in[rank] += 1
        t0 = time.perf_counter()
        victim = policy.victim(self.names[rank], self)
        self.policy_s += time.perf_counter() - t0
        if guard:
            self.pins.discard(newcomer)
            self.pinned_in[rank] -= 1
        if self.where.get(victim) != rank or victim in self.pins or victim == newcomer:
            state = "pinned" if victim in self.pins or victim == newcomer else f"in {self.tier_of(victim) or 'no tier'}"
            raise PolicyError(f"policy {policy.name} chose block {victim} as the victim of tier {self.names[rank]},"
                              f" but it is {state}: a victim must be an unpinned block of that tier")
        return victim

    def droppable(self, block: int) -> bool:
        return True  # no sequence holds a simulated block

    def trial(self) -> nullcontext[None]:
        return _NO_TRIAL

    # -- the replay ------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], upcoming: int, params: dict[str, object]) -> ReplayResult:
        started = time.perf_counter()
        queue = [UpcomingRequest(i, r.arrival_s, r.hash_ids) for i, r in enumerate(requests)]
        arrivals = arrival_times(requests)
        ttft_ms: list[float] = []
        start = arrivals[0] if arrivals else 0.0
        self.channel = MigrationChannel(start)
        for index, request in enumerate(requests):
            self._epochs_until(start, epochs_due(start, self.s.epoch_s, arrivals[index]))
            self.now = arrivals[index]
            t0 = time.perf_counter()
            self.policy.upcoming(queue[index:index + upcoming])
            self.policy_s += time.perf_counter() - t0
            ttft_ms.append(self._serve(index, request) * 1e3)
        if self.samples == 0:
            self._sample(1)
        return self._result(requests, arrivals, ttft_ms, time.perf_counter() - started, params)

    def _epochs_until(self, start: float, due: int) -> None:
        """Run the epochs that ended: plans while the policy may have something to move, then O(1) for the rest
        (nothing changes in an epoch whose plan is empty, so its residency sample is the last one)."""
        while self.epoch < due:
            if self.demand or not self.dirty:
                self._sample(due - self.epoch)
                self.epoch = due
                return
            self.epoch += 1
            self.now = start + self.epoch * self.s.epoch_s
            t0 = time.perf_counter()
            plan = self.policy.plan(self, self.now)
            self.policy_s += time.perf_counter() - t0
            self.dirty = bool(plan.moves or plan.evictions)
            if self.dirty:
                self._execute(plan)
            self._sample(1)

    def _serve(self, index: int, request: Request) -> float:
        """One request's references, pinned unless pinning is off; returns its TTFT estimate in seconds."""
        where, hits, names, now, lands = self.where, self.hits, self.names, self.now, self.lands
        read_cost, demand = self.s.read_s, self.demand
        pin, pins, pinned_in = self.s.pin, self.pins, self.pinned_in
        events = []
        missed_tokens = 0
        read_s = 0.0
        wait = 0.0
        for block, tokens in zip(request.hash_ids, request.block_tokens(self.s.block_tokens), strict=True):
            i = where.get(block)
            if i is None:
                self.misses += 1
                missed_tokens += tokens
                self._admit(block)
                event = AccessEvent(block, None, now, index)
            else:
                hits[i] += 1
                read_s += read_cost[i]
                landing = lands.get(block)
                if landing is not None and landing > now:
                    wait = max(wait, landing - now)
                if demand and i:
                    self._promote_on_access(block, i)
                event = AccessEvent(block, names[i], now, index)
            if pin and block not in pins:
                pins.add(block)
                i = where.get(block)
                if i is not None:
                    pinned_in[i] += 1
            if demand:
                t0 = time.perf_counter()
                self.policy.observe((event,))
                self.policy_s += time.perf_counter() - t0
            else:
                events.append(event)
        if events:
            t0 = time.perf_counter()
            self.policy.observe(events)
            self.policy_s += time.perf_counter() - t0
        self._unpin()
        self.dirty = True
        if wait > 0:
            self.waited += 1
        return missed_tokens / self.s.prefill + read_s + wait

    def _promote_on_access(self, block: int, i: int) -> None:
        """A demand cache's hit in tier i: the block goes where the policy admits it, if that is faster."""
        t0 = time.perf_counter()
        target = self._rank(self.policy.admit(block, self))
        self.policy_s += time.perf_counter() - t0
        if target >= i:
            return
        self._remove(block)
        if self._fit(block, target):
            self._moved(block, i, target, "promote")
        else:
            self._place(block, i)  # the faster tier is full of pinned blocks: it stays (it just left: room)
            self._tell(block, target, i)

    def _sample(self, count: int) -> None:
        sizes = [len(m) for m in self.members]
        total = sum(sizes)
        if total:
            self.samples += count
            self.strr_sum += count * ((total - sizes[0]) / total)
            for i, size in enumerate(sizes):
                self.residency[i] += count * (size / total)

    def _execute(self, plan: Plan) -> None:
        for block in plan.evictions:
            if block in self.where and block not in self.pins:
                source = self._remove(block)
                self.evictions += 1
                self._tell(block, source, None)
        who = f"policy {self.policy.name}"
        for move in plan.moves:
            check_move(move.block, move.source, move.target, move.reason, self.rank, who)
            source, target = self.rank[move.source], self.rank[move.target]
            if self.where.get(move.block) != source or move.block in self.pins:
                self.skipped += 1
                continue
            if self.channel.busy_past(self.now + self.s.epoch_s, self.now):
                self.deferred += 1  # the budget is spent for this epoch: the channel is busy past its end
                continue
            self._remove(move.block)
            if self._fit(move.block, target):
                self._moved(move.block, source, target, move.reason)
            else:
                self._place(move.block, source)  # it just left, so there is room
                self.skipped += 1

    def _admit(self, block: int) -> None:
        t0 = time.perf_counter()
        tier = self.policy.admit(block, self)
        self.policy_s += time.perf_counter() - t0
        admission = admit(self, self.policy, block, self._rank(tier))
        if admission.rank is None:
            self.uncached += 1
            self._tell(block, admission.wanted, None)
            return
        self._apply(admission.chain)
        if admission.rank != admission.wanted:
            self._tell(block, admission.wanted, admission.rank)  # the tiers it was admitted to were full of pinned

    def _fit(self, block: int, i: int) -> bool:
        """Put a block that is in no tier into tier i, making room there (the engine's make_room, applied at
        once); False, with nothing changed, if tier i is full of pinned blocks."""
        chain: list[Step] = []
        if make_room(self, self.policy, block, i, chain) is not None:
            return False
        self._apply(chain)
        return True

    def _apply(self, chain: list[Step]) -> None:
        """The pushes that made room, deepest first: demotions on the ledger and the channel, drops counted."""
        for victim, source, target in chain:
            if target is None:
                self.evictions += 1
                self.lands.pop(victim, None)
                self._tell(victim, source, None)
            else:
                self._moved(victim, source, target, "demote")

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

    def _unpin(self) -> None:
        self.pins.clear()
        for i in range(len(self.pinned_in)):
            self.pinned_in[i] = 0

    def _moved(self, block: int, source: int, target: int, reason: str) -> None:
        """A move carried out: on the ledger (ping-pongs in epochs), on the migration channel, told to the policy."""
        self.ledger.record(block, source, target, reason, self.epoch, self.s.bytes_of(source, target))
        self.lands[block] = self.channel.carry(self.now, self.s.move_s[source][target])
        self._tell(block, source, target)

    def _tell(self, block: int, source: int, target: int | None) -> None:
        t0 = time.perf_counter()
        self.policy.moved(block, self.names[source], None if target is None else self.names[target])
        self.policy_s += time.perf_counter() - t0

    def _rank(self, tier: str) -> int:
        return rank_in(self.rank, tier, f"policy {self.policy.name}")

    def _result(self, requests: Sequence[Request], arrivals: Sequence[float], ttft: list[float], wall_s: float,
                params: dict[str, object]) -> ReplayResult:
        return build_result(Counts(
            hits=tuple(self.hits), misses=self.misses, resident=tuple(len(m) for m in self.members),
            residency=tuple(self.residency), samples=self.samples, strr_sum=self.strr_sum,
            evictions=self.evictions, uncached=self.uncached, promotions=self.ledger.moved["promote"],
            demotions=self.ledger.moved["demote"], prefetches=self.ledger.moved["prefetch"],
            ping_pongs=self.ledger.ping_pongs, skipped=self.skipped, deferred=self.deferred, waited=self.waited,
            epochs=self.epoch, channel_free=self.channel.free, ttft_ms=tuple(ttft), moved_bytes=self.ledger.bytes),
            self.s, self.policy, requests, arrivals, wall_s, self.policy_s, params, core="python")


@dataclass(frozen=True)
class Counts:
    """What a replay core counted; build_result turns it into a ReplayResult the same way for both cores."""

    hits: tuple[int, ...]
    misses: int
    resident: tuple[int, ...]
    residency: tuple[float, ...]  # summed over samples
    samples: int
    strr_sum: float
    evictions: int
    uncached: int
    promotions: int
    demotions: int
    prefetches: int
    ping_pongs: int
    skipped: int
    deferred: int
    waited: int
    epochs: int
    channel_free: float  # when the last move landed
    ttft_ms: tuple[float, ...]
    moved_bytes: int  # what the moves carried (a move into or out of a compressed tier: its compressed bytes)


def build_result(c: Counts, s: Settings, policy: Policy, requests: Sequence[Request], arrivals: Sequence[float],
                 wall_s: float, policy_s: float, params: dict[str, object], *, core: str,
                 prepare_s: float = 0.0, ttft_sorted: Sequence[float] | None = None) -> ReplayResult:
    """The result from a core's counts (`ttft_sorted`: the TTFT samples already sorted, if the core sorted them)."""
    hits = sum(c.hits)
    references = hits + c.misses
    trace_s = arrivals[-1] - arrivals[0] if arrivals else 0.0
    # Moves still in flight after the last arrival stretch the span: the rate never exceeds the channel's.
    span = max(trace_s, c.channel_free - arrivals[0]) if arrivals else 0.0
    tiers = tuple(
        TierResult(name=name, rank=i, capacity_blocks=s.capacity[i], hits=c.hits[i],
                   hit_ratio=c.hits[i] / references if references else 0.0,
                   residency=c.residency[i] / c.samples if c.samples else 0.0,
                   resident_blocks=c.resident[i], read_gbps=s.read_gbps[i])
        for i, name in enumerate(s.names))
    return ReplayResult(
        policy=policy.name, params=params, requests=len(requests), references=references, hits=hits,
        misses=c.misses, hit_ratio=hits / references if references else 0.0, tiers=tiers,
        evictions=c.evictions, uncached=c.uncached,
        strr=c.strr_sum / c.samples if c.samples else 0.0,
        star=(hits - c.hits[0]) / hits if hits else 0.0,
        ttft_ms=Tail.of(c.ttft_ms if ttft_sorted is None else ttft_sorted), migration_bytes=c.moved_bytes,
        migration_gbps=c.moved_bytes / span / 1e9 if span > 0 else 0.0,
        promotions=c.promotions, demotions=c.demotions, prefetches=c.prefetches,
        ping_pongs=c.ping_pongs, moves_skipped=c.skipped, epochs=c.epochs, trace_s=trace_s,
        wall_s=wall_s, policy_cpu_s=policy_s, block_bytes=s.block_bytes,
        prefill_tokens_per_s=s.prefill, capacity_lifted=policy.lifts_capacity,
        family=policy.family, pinned=s.pin, budget_gbps=s.budget_gbps, moves_deferred=c.deferred,
        waited_requests=c.waited, core=core, prepare_s=prepare_s, ttft_samples_ms=c.ttft_ms)
