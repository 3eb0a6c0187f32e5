"""Execute-mode trace replay: a request trace played against a real tiered KV cache, with a migration daemon.

Simulate mode (simulate.py) only counts. Here every trace block is a real KV block in a tier's arena
(tieremu.kv): a hash id is the block's prefix key, and the block is the trace's 512-token block with its bytes
scaled down (`scaled_layout`, 64 KiB by default) so that a trace's working set fits in this machine's memory.
Per request, at its arrival (trace time times `time_scale`; a request that is late starts at once, one that is
early waits: that wait is the workload's real idle time):

1. its hash ids are served in order, each pinned from its reference until the request ends (the daemon neither
   moves nor victimises it meanwhile), as in simulate;
2. a resident block is read through the cache's read path: real bytes from its tier's memory, emulated
   tiers' delay paid through the injector;
3. a missing block is admitted where the policy says, room being made the way simulate does (the newcomer is
   shown in the tier, pinned, the policy's victim is pushed one tier down, recursively, or out of the last
   tier), and written in full: real writes standing in for prefill;
4. its measured TTFT is the time steps 2 and 3 took (room-making and emulated delay included);
5. the policy observes the request's accesses (a demand cache each one as it happens, others after the request):
   hits and misses, by request index, at its arrival on the trace's clock, so that look-ahead, Belady and hot/cold's
   half-life see what they see in simulate. (The cache keeps
   no access log: the daemon would hand the same reads to the policy a second time, without request indices.)

Meanwhile a MigrationDaemon thread runs the policy every `epoch_s` of wall time and carries its plans out with
real page migrations (blocks on different nodes) or copies (same node: emulated tiers), under the budget. The
policy is only ever called under the daemon's policy lock. With `daemon_thread=False` the same daemon's epochs
run in the replay's thread instead, between requests, at the trace instants simulate runs them.

Figures are simulate's (ReplayResult, same names), labelled `measured` when every tier touched is a real node
(a QEMU guest's nodes included: see `backings`) and `emulated` when any is emulated or shaped. After the run every
resident block is read back and compared with what was written for its key.

How the placement can differ from simulate's:
- epochs on wall time in a thread (the default) fall between requests only by chance: a plan made while a request
  is served cannot move its pinned blocks (counted in `daemon_reasons["pinned"]`), and when requests run late
  (`lag_ms`) or the daemon waits for the GIL or a lock, fewer epochs fall between two arrivals than in simulate.
  Hit ratios per tier move by this; the total hit ratio hardly does (it is decided by evictions from the last
  tier, not by which tier a block waits in);
- with epochs between requests (`daemon_thread=False`) the decisions are simulate's own, except where a policy
  falls back to the first unpinned block of a full tier: the pool lists a tier's blocks in allocation order,
  simulate in order of arrival in the tier;
- demand caches (`lru`, `lfu`, `belady`; see tieremu.policy.base.FAMILIES) promote on access as in simulate: a hit
  in a slower tier is read there, then moved at once (a real move, room made by the same placement engine) where
  the policy admits it, and the policy observes each access as it happens. The move is synchronous: its time,
  and any wait for the migration budget's credit, is in the request's measured TTFT (simulate queues it on the
  migration channel instead, and charges a later read of the block in flight);
- a tier given as unlimited is sized to hold every block of the trace, and policies see that size as its
  capacity.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tieremu.daemon.daemon import DaemonReport, MigrationDaemon
from tieremu.daemon.room import LiveBoard, admit_new, carry_out_admission
from tieremu.daemon.view import PoolView
from tieremu.errors import ConfigError, WorkloadError
from tieremu.kv.arena import NumaArena
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Directed
from tieremu.kv.pool import MoveRecord
from tieremu.policy.base import AccessEvent, BlockView, Plan, Policy, UpcomingRequest
from tieremu.policy.engine import MoveLedger, rank_in
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap
from tieremu.workloads.simulate import (
    DEFAULT_PING_PONG_EPOCHS,
    DEFAULT_UPCOMING,
    ReplayResult,
    Tail,
    TierResult,
    arrival_times,
)
from tieremu.workloads.trace import MOONCAKE_BLOCK_TOKENS, Request

DEFAULT_BLOCK_KIB = 64
DEFAULT_EPOCH_S = 0.01  # the daemon's period, wall seconds
DEFAULT_TIME_SCALE = 0.2  # wall seconds per trace second
# Below this the daemon's thread would mostly wake up and go back to sleep, taking the GIL from the workload.
MIN_EPOCH_S = 0.001


def scaled_layout(block_kib: int = DEFAULT_BLOCK_KIB, *, layers: int = 2, kv_heads: int = 1,
                  dtype: torch.dtype = torch.float16, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> KVLayout:
    """A layout whose block holds the trace's 512-token block, with a head size that makes it `block_kib` KiB:
    the token count (and so the meaning of a hash id) is kept, the bytes per token are scaled down."""
    per_head_dim = block_tokens * 2 * kv_heads * layers * torch.empty(0, dtype=dtype).element_size()
    head_dim, rest = divmod(block_kib * 1024, per_head_dim)
    if block_kib < 1 or rest or head_dim < 1:
        unit = max(1, per_head_dim // 1024)
        raise ConfigError(f"block_kib={block_kib}: a block of {block_tokens} tokens x {layers} layers x {kv_heads} "
                          f"KV heads ({str(dtype).removeprefix('torch.')}) comes in steps of {unit} KiB; give a "
                          f"multiple of {unit} (e.g. 64, 128 or 256)")
    return KVLayout(layers=layers, kv_heads=kv_heads, head_dim=head_dim, block_tokens=block_tokens, dtype=dtype)


class BlockData:
    """What the block of each prefix key holds: a slice of one seeded noise buffer at an offset drawn from the key,
    with the key itself in the first eight elements (one byte each, exact in any float type), so no two keys hold
    the same bytes. A slice costs a copy, not a random draw: the stand-in prefill stays cheap beside the run."""

    KEY_BYTES = 8

    def __init__(self, layout: KVLayout, seed: int = 0) -> None:
        self.layout = layout
        self.seed = seed
        self._size = layout.block_bytes // layout.itemsize
        generator = torch.Generator().manual_seed(seed)
        self._noise = torch.randn(2 * self._size, generator=generator).to(layout.dtype)

    def of(self, key: int) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        offset = int.from_bytes(digest, "little") % self._size
        data = self._noise[offset:offset + self._size].clone()
        mask = (1 << 8 * self.KEY_BYTES) - 1
        data[:self.KEY_BYTES] = torch.tensor(list((key & mask).to_bytes(self.KEY_BYTES, "little")))
        return data.view(self.layout.block_shape)


@dataclass(frozen=True)
class BlockCheck:
    checked: int  # resident keyed blocks read back
    corrupted: tuple[int, ...]  # keys whose bytes differ from what was written


def check_blocks(cache: TieredKVCache, data: BlockData) -> BlockCheck:
    """Read every resident keyed block back from its arena slot and compare it with what `data` says it holds."""
    checked, corrupted = 0, []
    with cache.lock:
        for block in list(cache.pool.blocks.values()):
            if block.key is None:
                continue
            arena = cache.pool.arenas[block.arena]
            if not isinstance(arena, NumaArena):
                raise WorkloadError(f"block {block.key} is on file tier {block.tier!r}: execute-mode replay keeps "
                                    "blocks in memory tiers only")
            checked += 1
            if not torch.equal(arena.blocks[block.slot], data.of(block.key)):
                corrupted.append(block.key)
    return BlockCheck(checked, tuple(corrupted))


@dataclass(frozen=True)
class ExecuteResult(ReplayResult):
    """Simulate's figures, measured, plus what only a real run has. Byte figures are real: `block_bytes` is what a
    block takes here, migration_gbps is bytes really moved over the replay's wall time (simulate: over trace time);
    policy_cpu_s is the policy's time on the request path (its plans are in daemon_cpu_s)."""

    represented_block_bytes: int = 0  # the KV a block stands for (the trace's block at full size)
    time_scale: float = 1.0  # wall seconds per trace second
    epoch_s: float = 0.0  # the daemon's period, wall seconds (trace seconds: epoch_s / time_scale)
    budget_gbps: float | None = None
    daemon_thread: bool = True  # epochs ran in the daemon's thread (else between requests, as in simulate)
    backings: dict[str, str] = field(default_factory=dict)  # tier -> real | vm | emulated | shaped
    delay_injected: bool = False  # emulated tiers were slowed to their targets (else they ran at host speed)
    injected_s: float = 0.0  # emulated delay paid, reads, writes and moves
    lag_ms: Tail = field(default_factory=lambda: Tail.of(()))  # how late requests started against their scaled arrival
    daemon_cpu_s: float = 0.0
    daemon_wall_s: float = 0.0
    moves_failed: int = 0  # moves the kernel refused (after retries), daemon and admission
    moves_retried: int = 0
    admission_demotions: int = 0  # demotions made on the request path to admit a new block (the rest: daemon)
    daemon_reasons: dict[str, int] = field(default_factory=dict)  # why daemon moves were skipped or failed
    blocks_checked: int = 0
    blocks_corrupted: int = 0


def execute(requests: Sequence[Request], resolved: ResolvedTierMap, policy: Policy, *,
            block_layout: KVLayout | None = None, capacities: Mapping[str, int | None] | None = None,
            time_scale: float = DEFAULT_TIME_SCALE, epoch_s: float = DEFAULT_EPOCH_S,
            budget_gbps: float | None = None, injector: DelayInjector | None = None,
            upcoming: int = DEFAULT_UPCOMING, ping_pong_epochs: int = DEFAULT_PING_PONG_EPOCHS,
            represented_block_bytes: int | None = None, seed: int = 0, daemon_thread: bool = True,
            torch_threads: int | None = 1, params: Mapping[str, object] | None = None) -> ExecuteResult:
    """Replay `requests` on a real cache over `resolved` (tiers fastest first) under `policy`; see the module
    docstring. `capacities` is blocks per tier (None or absent: unlimited). `represented_block_bytes` is the KV a
    block stands for (the trace's block at full size; default: the layout's), a label in the result: every byte
    figure (block_bytes, migration_bytes, migration_gbps) is what this run really stored and moved.
    `daemon_thread=False` runs the daemon's epochs in the replay's thread, between requests, at the instants
    simulate runs them (epoch_s / time_scale of trace time apart): the decisions are then simulate's (but for the
    order of a full tier's blocks, see above), which separates what epoch timing changes from what memory does.
    `torch_threads` is torch's intra-op thread count during the run (restored after; None: leave it): a block's
    copies are too small to share, and OpenMP workers spin-waiting beside the daemon's thread on two cores multiply
    every copy's time."""
    layout = block_layout or scaled_layout()
    if not requests:
        raise WorkloadError("execute-mode replay needs at least one request; the trace is empty")
    _check(resolved, layout, time_scale, epoch_s, upcoming)
    limits = _limits(resolved, capacities or {})
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        run = _Run(requests, resolved, layout, policy, limits, injector, time_scale=time_scale, epoch_s=epoch_s,
                   budget_gbps=budget_gbps, seed=seed, daemon_thread=daemon_thread)
        try:
            run.replay(upcoming)
        finally:
            report = run.finish()
    finally:
        torch.set_num_threads(threads)
    return run.result(report, ping_pong_epochs, represented_block_bytes or layout.block_bytes, dict(params or {}))


def _check(resolved: ResolvedTierMap, layout: KVLayout, time_scale: float, epoch_s: float, upcoming: int) -> None:
    files = [t.name for t in resolved.tiers if t.spec.is_file]
    if files:
        raise ConfigError(f"tier(s) {', '.join(files)} are file tiers; execute-mode replay keeps blocks in memory "
                          "tiers only: use a tier map without them (simulate mode takes any)")
    cuda = [t.name for t in resolved.tiers if t.spec.is_cuda]
    if cuda:
        # Refused even where it is emulated (NUMA memory), so one experiment file behaves alike on every machine.
        raise ConfigError(f"tier(s) {', '.join(cuda)} are cuda tiers; execute-mode replay keeps blocks in NUMA "
                          "memory tiers only (its reads, moves and block check work on host memory): use a tier map "
                          "without them (simulate mode takes any)")
    if layout.per_layer:
        raise ConfigError("execute-mode replay needs the all-layers block layout (a trace block holds every layer); "
                          "got per-layer")
    if not time_scale > 0:
        raise ConfigError(f"time_scale={time_scale} must be positive (wall seconds per trace second, e.g. 0.1)")
    if not epoch_s >= MIN_EPOCH_S:
        raise ConfigError(f"epoch_s={epoch_s} is below {MIN_EPOCH_S} s of wall time: raise the epoch or the time "
                          "scale (an epoch of E trace seconds lasts E x time_scale)")
    if upcoming < 1:
        raise ConfigError(f"upcoming={upcoming} must be 1 or more (the request about to run is always told)")


@dataclass(frozen=True)
class _Limit:
    name: str
    given: int | None  # None: unlimited (or lifted for a bound)
    blocks: int  # what the pool is given


def _limits(resolved: ResolvedTierMap, capacities: Mapping[str, int | None]) -> dict[str, int | None]:
    """Blocks per tier, in tier order (None: unlimited)."""
    names = [t.name for t in resolved.tiers]
    unknown = sorted(set(capacities) - set(names))
    if unknown:
        raise ConfigError(f"capacity given for unknown tier(s) {', '.join(unknown)}; tiers: {', '.join(names)}")
    for name, given in capacities.items():
        if given is not None and given < 1:
            raise ConfigError(f"tier {name}: capacity {given} blocks must be 1 or more, or None for unlimited")
    return {name: capacities.get(name) for name in names}


class _Ledger(Policy):
    """The run's policy, passed through, with the reason of every planned move noted so that the moves carried out
    can be told apart (promotion or prefetch)."""

    def __init__(self, inner: Policy) -> None:
        super().__init__(inner.context)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.lifts_capacity = inner.lifts_capacity  # type: ignore[misc]
        self.family = inner.family  # type: ignore[misc]
        self.planned: dict[int, list[tuple[float, str]]] = {}  # key -> (monotonic time, reason) per plan

    def admit(self, block: int, view: BlockView) -> str:
        return self.inner.admit(block, view)

    def observe(self, events: Sequence[AccessEvent]) -> None:
        self.inner.observe(events)

    def victim(self, tier: str, view: BlockView) -> int:
        return self.inner.victim(tier, view)

    def moved(self, block: int, source: str, target: str | None) -> None:
        self.inner.moved(block, source, target)

    def upcoming(self, requests: Sequence[UpcomingRequest]) -> None:
        self.inner.upcoming(requests)

    def plan(self, view: BlockView, now: float) -> Plan:
        plan = self.inner.plan(view, now)
        stamp = time.monotonic()
        for move in plan.moves:
            self.planned.setdefault(move.block, []).append((stamp, move.reason))
        return plan

    def reason_for(self, key: int, at: float) -> str | None:
        """The reason of the latest plan before `at` that moved this block."""
        entries = self.planned.get(key, [])
        i = bisect.bisect_right(entries, (at, "~")) - 1
        return entries[i][1] if i >= 0 else None


class _Residency:
    """Share of resident blocks in each tier, averaged over wall time (what STRR is made of)."""

    def __init__(self, cache: TieredKVCache) -> None:
        self.pool = cache.pool
        self.weighted = [0.0] * len(self.pool.order)
        self.seconds = 0.0
        self._last: tuple[float, list[int]] | None = None

    def sample(self) -> None:
        now = time.monotonic()
        sizes = [self.pool.used(t) for t in self.pool.order]
        if self._last is not None:
            then, before = self._last
            total = sum(before)
            if total:
                for i, size in enumerate(before):
                    self.weighted[i] += (now - then) * size / total
                self.seconds += now - then
        self._last = (now, sizes)

    def shares(self) -> list[float]:
        if self.seconds <= 0:
            sizes = [self.pool.used(t) for t in self.pool.order]
            total = sum(sizes)
            return [s / total if total else 0.0 for s in sizes]
        return [w / self.seconds for w in self.weighted]


class _Run:
    def __init__(self, requests: Sequence[Request], resolved: ResolvedTierMap, layout: KVLayout, policy: Policy,
                 limits: Mapping[str, int | None], injector: DelayInjector | None, *, time_scale: float, epoch_s: float,
                 budget_gbps: float | None, seed: int, daemon_thread: bool) -> None:
        self.requests = requests
        self.resolved = resolved
        self.layout = layout
        self.policy = _Ledger(policy)
        self.lifted = policy.lifts_capacity
        # Unlimited tiers (and every tier of a bound) get room for every block of the trace: they never fill.
        distinct = len({key for r in requests for key in r.hash_ids})
        self.limits = [_Limit(name, None, distinct) if self.lifted or given is None else _Limit(name, given, given)
                       for name, given in limits.items()]
        self.names = [lim.name for lim in self.limits]
        self.rank = {name: i for i, name in enumerate(self.names)}
        self.time_scale = time_scale
        self.epoch_s = epoch_s
        self.budget_gbps = budget_gbps
        self.data = BlockData(layout, seed)
        self.daemon_thread = daemon_thread
        self.daemon_epochs = 0  # run by the replay's thread (daemon_thread=False)
        self.injector = injector
        self.placement = Directed(self.names[0], "replay's policy")
        self.cache = TieredKVCache(resolved, layout, capacities={lim.name: lim.blocks for lim in self.limits},
                                   placement=self.placement, injector=injector, log_accesses=False)
        try:
            self.daemon = MigrationDaemon(self.cache, self.policy, epoch_s=epoch_s, budget_gbps=budget_gbps,
                                          ident="key")
        except BaseException:
            self.cache.close()
            raise
        self.view: PoolView = self.daemon.view
        self.board = LiveBoard(self.view, self.cache.pool.capacity, self.daemon.policy_lock)
        self.demand = policy.family == "demand"
        self.residency = _Residency(self.cache)
        self.hits = [0] * len(self.names)
        self.misses = self.uncached = 0
        self.admission_demotions = self.admission_failed = 0
        self.key_of: dict[int, int] = {}  # Block.id -> key, for every block this run created
        self.ttft_ms: list[float] = []
        self.lag_ms: list[float] = []
        self.policy_s = 0.0
        self.write_s = 0.0  # inside the cache's writes of admitted blocks
        self.written = 0
        self.next_seq = 0
        self.wall_s = 0.0
        self.check = BlockCheck(0, ())
        self._finished = False

    # -- the replay ------------------------------------------------------------------------------------------

    def replay(self, upcoming: int) -> None:
        requests = self.requests
        queue = [UpcomingRequest(i, r.arrival_s, r.hash_ids) for i, r in enumerate(requests)]
        self.start_trace = requests[0].arrival_s
        self.start_wall = time.monotonic()
        self.residency.sample()
        if self.daemon_thread:
            self.daemon.start()
        arrivals = arrival_times(requests)  # equal timestamps spread over their millisecond, as in simulate
        for index, request in enumerate(requests):
            due = self.start_wall + (request.arrival_s - self.start_trace) * self.time_scale
            if not self.daemon_thread:
                self._epochs_until(arrivals[index])
            self._wait_until(due)
            self.lag_ms.append(max(0.0, time.monotonic() - due) * 1e3)
            with self.daemon.policy_lock:
                t0 = time.perf_counter()
                self.policy.upcoming(queue[index:index + upcoming])
                self.policy_s += time.perf_counter() - t0
            self.ttft_ms.append(self._serve(index, request) * 1e3)
            self.residency.sample()
        self.wall_s = time.monotonic() - self.start_wall

    def _wait_until(self, due: float) -> None:
        """Idle until the arrival, sampling residency once per epoch while the daemon works."""
        while (left := due - time.monotonic()) > 0:
            time.sleep(min(left, self.epoch_s))
            self.residency.sample()

    def _epochs_until(self, arrival: float) -> None:
        """Without the daemon's thread: the epochs that end by the arrival run here first, each at its time if
        the replay is early, at once if it is late. Counted in trace time exactly as simulate counts them, so
        epochs and requests interleave in the same order."""
        epoch_trace = self.epoch_s / self.time_scale
        while (end := self.start_trace + (self.daemon_epochs + 1) * epoch_trace) <= arrival:
            self._wait_until(self.start_wall + (end - self.start_trace) * self.time_scale)
            self.daemon.epoch()
            self.daemon_epochs += 1

    def _serve(self, index: int, request: Request) -> float:
        """One request, reference by reference as simulate serves it: a resident block is read where it is, a
        missing one admitted and written; each is pinned from its reference until the request ends. Returns the
        seconds that took."""
        cache, view, keys = self.cache, self.view, request.hash_ids
        with cache.lock:
            data = {key: self.data.of(key) for key in keys if view.tier_of(key) is None}
        now = request.arrival_s  # the trace's clock, as in simulate: time-based parameters mean the same
        seqs: list[int] = []
        events: list[AccessEvent] = []
        t0 = time.perf_counter()
        for key in keys:
            with cache.lock:  # found and pinned together: nothing moves it in between
                tier = view.tier_of(key)
                view.pin((key,))
            if tier is not None:
                self._read([key], seqs)
                self.hits[self.rank[tier]] += 1
                if self.demand and self.rank[tier]:
                    self._promote_on_access(key, tier)
                event = AccessEvent(key, tier, now, index)
            else:
                self.misses += 1
                block_data = data[key] if key in data else self.data.of(key)  # it left after the request began
                if not self._admit_and_write(key, block_data, seqs):
                    self.uncached += 1
                event = AccessEvent(key, None, now, index)
            if self.demand:  # a demand cache learns of each access as it happens, as in simulate
                self._observe((event,))
            else:
                events.append(event)
        cache.end_step()  # pays the emulated delay the reads and writes owe
        seconds = time.perf_counter() - t0
        self._observe(events)
        for seq in seqs:
            cache.free_sequence(seq)
        view.unpin()
        return seconds

    def _observe(self, events: Sequence[AccessEvent]) -> None:
        if events:
            with self.daemon.policy_lock:
                t0 = time.perf_counter()
                self.policy.observe(events)
                self.policy_s += time.perf_counter() - t0

    def _promote_on_access(self, key: int, tier: str) -> None:
        """A demand cache's hit below the fastest tier: served there (read already), then moved at once where the
        policy admits it, if that is faster, by a real move through the daemon (room made by the placement engine,
        on the run's migration budget). Where no room could be made, it stays, and the policy is told so."""
        with self.daemon.policy_lock:
            t0 = time.perf_counter()
            target = self.policy.admit(key, self.view)
            self.policy_s += time.perf_counter() - t0
        if rank_in(self.rank, target, f"policy {self.policy.name}") >= self.rank[tier]:
            return
        self.daemon.promote(key, tier, target)
        if self.view.tier_of(key) != target:
            with self.daemon.policy_lock:
                self.policy.moved(key, target, tier)

    def _read(self, keys: list[int], seqs: list[int]) -> None:
        """Read resident, pinned blocks through the cache's read path (a sequence whose table is those blocks)."""
        if not keys:
            return
        seq = self._new_seq(seqs)
        hit = self.cache.add_sequence(seq, keys=keys)
        if hit.tokens != len(keys) * self.layout.block_tokens:
            raise WorkloadError(f"request blocks {keys[:5]}... were pinned as resident but only "
                                f"{hit.tokens // self.layout.block_tokens} of {len(keys)} were found: a pinned block "
                                "left the cache")
        for layer in range(self.layout.layers):
            self.cache.read(seq, layer)

    def _admit_and_write(self, key: int, data: torch.Tensor, seqs: list[int]) -> bool:
        """Make room where the policy admits the block and write it there; False if no tier could take it."""
        cache = self.cache
        with cache.lock:  # nothing may take the room made before the block lands in it
            t0 = time.perf_counter()
            admission = admit_new(self.board, self.policy, key)
            self.policy_s += time.perf_counter() - t0
            if any(target is not None for _, _, target in admission.chain):
                self.daemon.budget.wait(time.monotonic, time.sleep)  # demotions, too, are within the budget
            done = carry_out_admission(cache, self.board, self.policy, key, admission)
            self.daemon.pay(done.demoted * self.layout.block_bytes)
            self.admission_demotions += done.demoted
            self.admission_failed += done.failed
            if admission.rank is None:
                return False
            tier = self.names[admission.rank]
            self.placement.target = tier
            seq = self._new_seq(seqs)
            cache.add_sequence(seq, keys=[key])
            t1 = time.perf_counter()
            for layer in range(self.layout.layers):
                cache.write(seq, layer, 0, data[layer, 0], data[layer, 1])
            self.write_s += time.perf_counter() - t1
            self.written += 1
            block = cache.pool.by_key(key)
            if block is None or block.tier != tier:
                raise WorkloadError(f"block {key} was admitted to tier {tier!r} but landed in "
                                    f"{None if block is None else block.tier!r}: the room made for it was taken")
            self.key_of[block.id] = key
            return True

    def _new_seq(self, seqs: list[int]) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        seqs.append(seq)
        return seq

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> DaemonReport:
        """Stop the daemon, check every block's bytes, release the memory (also after an error)."""
        try:
            report = self.daemon.stop()
            if not self._finished:
                self.residency.sample()
                self.check = check_blocks(self.cache, self.data)
            return report
        finally:
            self._finished = True
            self.resident = [self.cache.pool.used(t) for t in self.names]
            self.evictions = self.cache.pool.evictions
            self.moves = list(self.cache.pool.moves)
            self.traffic = {t: (s.bytes_read, s.bytes_written) for t, s in self.cache.stats.traffic.items()}
            self.cache.close()

    def result(self, report: DaemonReport, ping_pong_epochs: int, represented_block_bytes: int,
               params: dict[str, object]) -> ExecuteResult:
        moves = _count_moves(self.moves, self.rank, self.key_of, self.policy, ping_pong_epochs * self.epoch_s)
        references = sum(self.hits) + self.misses
        hits = sum(self.hits)
        shares = self.residency.shares()
        tiers = tuple(
            TierResult(name=lim.name, rank=i, capacity_blocks=lim.given, hits=self.hits[i],
                       hit_ratio=self.hits[i] / references if references else 0.0, residency=shares[i],
                       resident_blocks=self.resident[i], read_gbps=None)
            for i, lim in enumerate(self.limits))
        touched = {m.source for m in self.moves} | {m.target for m in self.moves} | \
            {t for t, (read, written) in self.traffic.items() if read or written}
        backings = {t.name: t.backing.value for t in self.resolved.tiers}
        emulated = any(self.resolved.tier(t).backing.origin == "emulated" for t in touched)
        injected = 0.0 if self.injector is None else sum(a.injected_ns for a in self.injector.audits.values()) / 1e9
        trace_s = self.requests[-1].arrival_s - self.requests[0].arrival_s
        return ExecuteResult(
            policy=self.policy.name, params=params, requests=len(self.requests), references=references, hits=hits,
            misses=self.misses, hit_ratio=hits / references if references else 0.0, tiers=tiers,
            evictions=self.evictions, uncached=self.uncached, strr=1.0 - shares[0] if any(shares) else 0.0,
            star=(hits - self.hits[0]) / hits if hits else 0.0, ttft_ms=Tail.of(self.ttft_ms),
            migration_bytes=moves.bytes, migration_gbps=moves.bytes / self.wall_s / 1e9 if self.wall_s > 0 else 0.0,
            promotions=moves.moved["promote"], demotions=moves.moved["demote"], prefetches=moves.moved["prefetch"],
            ping_pongs=moves.ping_pongs, moves_skipped=report.skipped, epochs=report.epochs, trace_s=trace_s,
            wall_s=self.wall_s, policy_cpu_s=self.policy_s, block_bytes=self.layout.block_bytes,
            # Not an assumption here: the rate at which the stand-in prefill's writes went.
            prefill_tokens_per_s=self.written * self.layout.block_tokens / self.write_s if self.write_s else 0.0,
            capacity_lifted=self.lifted, origin="emulated" if emulated else "measured", family=self.policy.family,
            ttft_samples_ms=tuple(self.ttft_ms),
            represented_block_bytes=represented_block_bytes, time_scale=self.time_scale, epoch_s=self.epoch_s,
            budget_gbps=self.budget_gbps,
            daemon_thread=self.daemon_thread, backings=backings,
            delay_injected=self.injector is not None, injected_s=injected, lag_ms=Tail.of(self.lag_ms),
            daemon_cpu_s=report.cpu_seconds, daemon_wall_s=report.wall_seconds,
            moves_failed=report.failed + self.admission_failed, moves_retried=report.retried,
            admission_demotions=self.admission_demotions, daemon_reasons=dict(report.reasons),
            blocks_checked=self.check.checked, blocks_corrupted=len(self.check.corrupted),
        )


def _count_moves(records: Sequence[MoveRecord], rank: Mapping[str, int], key_of: Mapping[int, int],
                 planned: _Ledger, window_s: float) -> MoveLedger:
    """Moves that happened, on the engine's ledger by direction (an upward one is a prefetch if its plan said so);
    a move back to where the block came from within `window_s` of its last move is a ping-pong."""
    ledger = MoveLedger(window_s)
    for rec in sorted((r for r in records if r.ok and r.bytes), key=lambda r: r.time):
        if rank[rec.target] > rank[rec.source]:
            reason = "demote"
        elif planned.reason_for(key_of.get(rec.block, -1), rec.time) == "prefetch":
            reason = "prefetch"
        else:
            reason = "promote"
        ledger.record(rec.block, rec.source, rec.target, reason, rec.time, rec.bytes)
    return ledger
