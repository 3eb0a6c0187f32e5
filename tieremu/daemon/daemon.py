"""The migration daemon: an epoch loop beside the workload that lets a policy place a live cache's KV blocks.

An epoch reads the cache's access log since the last epoch and hands it to the policy as AccessEvents (tier names
from the cache's tier order, time = the epoch's monotonic time, request = the sequence), or, to a policy with its
own `observe_counts` (the built-in observing ones: policy.base.observes_counts), counted per block in one compiled
pass over the log's chunks (AccessCounts from tieremu/native/counts.c: batched access counting, no Python per
access), asks the policy for a plan, and carries it out (executor.py) within the migration budget. The budget is a
token bucket: `budget_gbps` accrues with elapsed time, at most one epoch's worth is saved up, and an epoch that
overshoots (a whole block is the unit) is paid back by the next ones, so the long-run rate holds whatever the block
size.

`epoch()` runs one epoch in the calling thread; `start()` runs them every `epoch_s` in a background thread until
`stop()`; `step()`, called by the workload between its steps (run_decode's on_step), runs an epoch there when one
is due: the accesses of the steps since are counted in one batch, in the workload's thread, with no thread to
wake and no GIL to hand over (what a serving engine's scheduler hook does; moves then wait for the step boundary
instead of overlapping the compute). In the thread, migration system calls and copies release the GIL (ctypes and
torch both do), so the workload's Python keeps running while pages move; the cache's lock is held per block move
only.

A policy with a `layer_started(layer)` method (LayerAware: layer-ahead prefetch) is told when the model starts
each layer: the daemon hooks `cache.on_layer_start`. A running daemon is woken to run an epoch at once, beside
the layer's compute; a daemon that was not started runs that epoch in the model's thread before the layer
continues (deterministic: what prefetch gives when it never falls behind).

Threads: the policy is only called under `policy_lock`; another thread that talks to the policy (a scheduler's
upcoming(), an admission) must take it too. Take the cache's lock before the policy's, never the other way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from typing import Protocol, overload, runtime_checkable

import numpy as np

from tieremu.daemon.executor import DEFAULT_RETRIES, PlanOutcome, execute_plan
from tieremu.daemon.view import PoolView
from tieremu.errors import ConfigError, TieremuError
from tieremu.kv.access_log import Accesses, AccessLog
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.pool import MoveRecord
from tieremu.native.build import count_kernels
from tieremu.policy.base import AccessCounts, AccessEvent, Move, Plan, Policy, observes_counts
from tieremu.policy.engine import TokenBucket


@runtime_checkable
class LayerAware(Protocol):
    """A policy that wants to know when the model starts a layer. Called from the model's thread without the
    policy lock: it must only note the layer (one attribute write), never walk shared state."""

    def layer_started(self, layer: int) -> None: ...


@dataclass
class DaemonReport:
    epochs: int
    moved: int
    failed: int
    skipped: int
    retried: int
    evicted: int
    bytes: int
    migration_gbps: float  # bytes moved over wall_seconds
    cpu_seconds: float  # CPU time of the daemon's work (its thread's, plus epochs run in other threads)
    wall_seconds: float
    records: list[MoveRecord] = field(repr=False)
    reasons: dict[str, int]

    def to_dict(self, *, records: bool = False) -> dict[str, object]:
        data = asdict(self)
        data["records"] = [r.to_dict() for r in self.records] if records else len(self.records)
        return data


class MigrationDaemon:
    def __init__(self, cache: TieredKVCache, policy: Policy, *, epoch_s: float = 0.01,
                 budget_gbps: float | None = None, ident: str = "id", retries: int = DEFAULT_RETRIES) -> None:
        if not epoch_s > 0:
            raise ConfigError(f"daemon epoch_s={epoch_s} must be positive (seconds; e.g. 0.01 for 10 ms)")
        if budget_gbps is not None and not budget_gbps > 0:
            raise ConfigError(f"daemon budget_gbps={budget_gbps} must be positive, or None for no limit")
        if retries < 0:
            raise ConfigError(f"daemon retries={retries} must be 0 or more (extra attempts after EBUSY)")
        self.cache = cache
        self.policy = policy
        self.epoch_s = epoch_s
        self.budget_gbps = budget_gbps
        self.retries = retries
        self.view = PoolView(cache, ident=ident)
        self.policy_lock = threading.RLock()
        self._epoch_lock = threading.Lock()  # epochs never overlap, whichever threads run them
        self._mark = cache.log.mark if cache.log is not None else 0
        self._entries_at_mark = len(cache.log) if cache.log is not None else 0
        self._totals = PlanOutcome()
        self._epochs = 0
        self._cpu = 0.0
        self._started: float | None = None
        self._ended: float | None = None
        # The placement engine's token bucket: at most one epoch's budget saved up.
        self.budget = TokenBucket(budget_gbps, epoch_s)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._step_due: float | None = None  # step(): when the next epoch is due
        self._hooked = isinstance(policy, LayerAware)
        self._batched = observes_counts(policy)  # batched access counting (see EventBatch.counts)
        if self._hooked:
            self._previous_hook = cache.on_layer_start
            cache.on_layer_start = self._layer_started

    # -- one epoch ----------------------------------------------------------------------------------------------

    def epoch(self, now: float | None = None) -> PlanOutcome:
        """Collect, plan, execute, in the calling thread; returns what the epoch did. `now` (default: monotonic
        time) is the time events carry, plan() is given and the budget accrues by."""
        with self._epoch_lock:
            cpu0 = time.thread_time()
            if self._started is None:
                self._started = time.monotonic()  # wall time is monotonic whatever clock `now` follows
            now = time.monotonic() if now is None else now
            events = self._collect(now)
            with self.policy_lock:
                if self._batched and isinstance(events, EventBatch):
                    self.policy.observe_counts(events.counts())
                else:
                    self.policy.observe(events)
                plan = self.policy.plan(self.view, now)
            budget = self.budget.allowance(now)
            if plan.moves or plan.evictions:
                outcome = execute_plan(self.cache, plan, self.view, budget_bytes=budget, policy=self.policy,
                                       retries=self.retries, policy_lock=self.policy_lock)
                self.budget.spend(outcome.bytes)
                self._totals.merge(outcome)
            else:
                outcome = PlanOutcome()
            self._epochs += 1
            self._cpu += time.thread_time() - cpu0
            return outcome

    def pay(self, nbytes: int) -> None:
        """Bytes moved on the request path outside the daemon (an admission's demotions): paid from the budget."""
        self.budget.spend(nbytes)

    def promote(self, ident: int, source: str, target: str) -> PlanOutcome:
        """A demand cache's promotion on access (tieremu.policy.base.FAMILIES), on the request path: the block,
        pinned by the request that just read it, is moved to `target` with room made as for a plan's move, on the
        same migration budget as the epochs (the caller waits until the budget has credit: that wait is its
        request's). Counted in the daemon's totals; a promotion that found no room is counted as skipped."""
        with self._epoch_lock:
            self.budget.wait(time.monotonic, time.sleep)  # the channel is busy: the request waits, as a real one
            now = time.monotonic()
            budget = self.budget.allowance(now)
            outcome = execute_plan(self.cache, Plan([Move(ident, source, target, "promote")]), self.view,
                                   budget_bytes=budget, policy=self.policy, retries=self.retries,
                                   policy_lock=self.policy_lock, own=(ident,))
            self.budget.spend(outcome.bytes)
            self._totals.merge(outcome)
            return outcome

    def _collect(self, now: float) -> Sequence[AccessEvent]:
        log = self.cache.log
        if log is None:
            return ()
        with self.cache.lock:  # the workload appends under this lock: the mark and the count agree
            end, entries = log.mark, len(log)
        batch = EventBatch(log, self._mark, end, entries - self._entries_at_mark, self.view, now)
        self._mark, self._entries_at_mark = end, entries
        return batch

    # -- between the workload's steps ------------------------------------------------------------------------

    def step(self, *_: object) -> PlanOutcome | None:
        """Run an epoch now if one is due (the first call only starts the clock); None if none was. Epochs missed
        while a long step ran are not made up: the next is one period on, as in the background thread."""
        now = time.monotonic()
        if self._step_due is None:
            if self._started is None:
                self._started = now
            self._step_due = now + self.epoch_s
            return None
        if now < self._step_due:
            return None
        outcome = self.epoch(now)
        due = self._step_due + self.epoch_s
        self._step_due = due if due > now else now + self.epoch_s
        return outcome

    # -- in the background --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run epochs every epoch_s in a background thread until stop()."""
        if self._thread is not None:
            raise TieremuError("the migration daemon is already running; stop() it first")
        self._stopping.clear()
        self._wake.clear()
        if self._started is None:
            self._started = time.monotonic()
        self._ended = None
        self._thread = threading.Thread(target=self._run, name="tieremu-migration-daemon", daemon=True)
        self._thread.start()

    def stop(self) -> DaemonReport:
        """Stop the thread (if running) and unhook from the cache; the report of everything done. An error that
        stopped the thread early is raised here."""
        if self._thread is not None:
            self._stopping.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        self._ended = time.monotonic()
        if self._hooked and self.cache.on_layer_start == self._layer_started:
            self.cache.on_layer_start = self._previous_hook
            self._hooked = False
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.report()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def report(self) -> DaemonReport:
        t = self._totals
        wall = 0.0 if self._started is None else (self._ended or time.monotonic()) - self._started
        return DaemonReport(
            epochs=self._epochs, moved=t.moved, failed=t.failed, skipped=t.skipped, retried=t.retried,
            evicted=t.evicted, bytes=t.bytes, migration_gbps=t.bytes / wall / 1e9 if wall > 0 else 0.0,
            cpu_seconds=self._cpu, wall_seconds=wall, records=list(t.records), reasons=dict(t.reasons),
        )

    def _run(self) -> None:
        cpu0 = time.thread_time()
        cpu_in_epochs = 0.0
        due = time.monotonic() + self.epoch_s
        try:
            while not self._stopping.is_set():
                wait = due - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                if self._stopping.is_set():
                    break
                self._wake.clear()
                cpu = time.thread_time()
                self.epoch()
                cpu_in_epochs += time.thread_time() - cpu
                now = time.monotonic()
                if now >= due:  # a periodic epoch (not only a wake-up): the next one is one period on
                    due = due + self.epoch_s if due + self.epoch_s > now else now + self.epoch_s
        except BaseException as exc:  # handed to stop(): a thread has no one else to tell
            self._error = exc
        finally:
            self._cpu += time.thread_time() - cpu0 - cpu_in_epochs  # the loop's own waking and waiting

    def _layer_started(self, layer: int) -> None:
        self.policy.layer_started(layer)  # type: ignore[attr-defined]
        if self._thread is None:
            self.epoch()
        else:
            self._wake.set()  # (a thread stopped by an error is not replaced here: stop() raises it)


class EventBatch(Sequence[AccessEvent]):
    """The log's accesses of one epoch (`count` entries from chunk `start` on) as AccessEvents, read from the log
    and built only when the policy first looks: a policy that ignores events costs nothing per access. `counts()`
    gives the same accesses aggregated per block (AccessCounts) without building any event.

    All-layers blocks hold every layer, so reading a block's layers 0..L-1 in one step is one access: only the
    first read of a block per (step, sequence) becomes an event, with layer None. Per-layer blocks give one event
    per read, with its layer. Under ident "key", accesses of blocks without a key, or gone since, are left out.
    """

    def __init__(self, log: AccessLog, start: int, end: int, count: int, view: PoolView, now: float) -> None:
        self._log = log
        self._start = start
        self._end = end  # the log's mark at the epoch's end: chunks start..end hold its `count` entries
        self._count = count
        self._view = view
        self._now = now
        self._events: list[AccessEvent] | None = None
        self._acc: Accesses | None = None
        self._counts: AccessCounts | None = None

    def _built(self) -> list[AccessEvent]:
        if self._events is None:
            self._events = self._build()
        return self._events

    def _accesses(self) -> Accesses:
        """The epoch's accesses as the log's columns, one per event (all-layers: first read per step)."""
        if self._acc is None:
            acc = self._log.since(self._start, self._end)  # chunks appended since the epoch's end are left out
            if not self._view.cache.layout.per_layer and len(acc):
                acc = _take(acc, _first_per_step(acc))
            self._acc = acc
        return self._acc

    def _build(self) -> list[AccessEvent]:
        view, now = self._view, self._now
        if not self._count:
            return []
        acc = self._accesses()
        per_layer = view.cache.layout.per_layer
        names = view.pool.order
        tiers = list(map(names.__getitem__, acc.tier.tolist()))
        blocks = acc.block.tolist()
        seqs = acc.seq.tolist()
        layers = acc.layer.tolist() if per_layer else repeat(None)
        # Events are built with tuple.__new__ from zipped columns: half the time of AccessEvent(...) per event,
        # which is most of what an observing policy costs the decode on this path (counts() avoids it).
        new, event = tuple.__new__, AccessEvent
        if view.ident == "key":
            known = view.pool.blocks
            keys = [getattr(known.get(b), "key", None) for b in blocks]
            return [new(event, e) for e in zip(keys, tiers, repeat(now), seqs, layers) if e[0] is not None]
        return [new(event, e) for e in zip(blocks, tiers, repeat(now), seqs, layers)]

    def counts(self) -> AccessCounts:
        """The same accesses aggregated per block (see AccessCounts): under ident "id" in one compiled pass over
        the log's chunks (tieremu/native/counts.c), under ident "key" with numpy and Python per distinct block (to
        look its key up); no Python per access either way. Its `events` is this batch."""
        if self._counts is None and self._view.ident == "id" and self._count < 1 << 31:
            self._counts = self._compiled_counts()
        if self._counts is None:
            view = self._view
            acc = self._accesses()
            block, tier, seq = acc.block, acc.tier, acc.seq
            layer = acc.layer if view.cache.layout.per_layer else None
            if view.ident == "key" and len(block):
                ids, inverse = np.unique(block, return_inverse=True)
                known = view.pool.blocks
                keys = [getattr(known.get(b), "key", None) for b in ids.tolist()]
                kept = np.array([k is not None for k in keys])[inverse]
                try:
                    by_id = np.array([0 if k is None else k for k in keys], dtype=np.int64)
                except OverflowError:  # keys beyond int64 (a foreign hash): numpy sorts them as objects
                    by_id = np.array([0 if k is None else k for k in keys], dtype=object)
                block, tier, seq = by_id[inverse][kept], tier[kept], seq[kept]
            self._counts = AccessCounts.of(view.pool.order, self._now, block, tier, seq, layer, self)
        return self._counts

    def _compiled_counts(self) -> AccessCounts:
        """counts() by counts.c: deduplication (all-layers blocks: first read per step and sequence) and the
        aggregation per block in one pass. Input and output share one int64 buffer ([meta | block ids | eight
        output columns]) and one int16 buffer ([tiers | three output columns]): two allocations and two pointers
        per epoch. Equal to the numpy path (AccessCounts.of over _accesses(), tests/test_daemon_counts.py)."""
        chunks = self._log.chunks(self._start, self._end)
        k, n = len(chunks), sum(chunks.meta[3::4])  # the chunks' own lengths (a racing len(log) may lag a chunk)
        per_layer = self._view.cache.layout.per_layer
        buf64 = np.empty(4 * k + 9 * n, dtype=np.int64)
        buf16 = np.empty(4 * n, dtype=np.int16)
        if k:
            buf64[:4 * k] = chunks.meta
            np.concatenate(chunks.block, out=buf64[4 * k:4 * k + n])
            np.concatenate(chunks.tier, out=buf16[:n])
        p64, p16 = buf64.ctypes.data, buf16.ctypes.data
        packed = count_kernels().count_accesses(p64, k, p64 + 32 * k, p16, n, 0 if per_layer else 1,
                                                p64 + 8 * (4 * k + n), p16 + 2 * n)
        if packed < 0:
            raise MemoryError(f"counting an epoch's {n} block reads: the counter's tables could not be allocated")
        kept, rows = packed & 0xFFFFFFFF, packed >> 32
        block, count, first, last, request, layer, row, access_request = buf64[4 * k + n:].reshape(8, n)
        tier, first_tier, access_tier = buf16[n:].reshape(3, n)
        return AccessCounts(tuple(self._view.pool.order), self._now, block[:rows], tier[:rows], first_tier[:rows],
                            count[:rows], first[:rows], last[:rows], request[:rows],
                            layer[:rows].astype(np.int32) if per_layer else None, row[:kept], access_tier[:kept],
                            access_request[:kept], self)

    def __len__(self) -> int:
        return len(self._built())

    @overload
    def __getitem__(self, index: int) -> AccessEvent: ...

    @overload
    def __getitem__(self, index: slice) -> list[AccessEvent]: ...

    def __getitem__(self, index: int | slice) -> AccessEvent | list[AccessEvent]:
        return self._built()[index]

    def __iter__(self) -> Iterator[AccessEvent]:
        return iter(self._built())


def _take(acc: Accesses, index: np.ndarray | slice) -> Accesses:
    return Accesses(acc.step[index], acc.layer[index], acc.seq[index], acc.block[index], acc.tier[index])


def _first_per_step(acc: Accesses) -> np.ndarray:
    """Indexes of the first read of each block per (step, sequence), in log order."""
    columns = [acc.step, acc.seq, acc.block]
    lows = [int(c.min()) for c in columns]
    spans = [int(c.max()) - low + 1 for c, low in zip(columns, lows, strict=True)]
    if spans[0] * spans[1] * spans[2] < 1 << 62:  # one int64 key: a 1-D unique, ~10x faster than unique by rows
        key = ((acc.step - lows[0]) * spans[1] + (acc.seq - lows[1])) * spans[2] + (acc.block - lows[2])
        _, first = np.unique(key, return_index=True)
    else:
        _, first = np.unique(np.stack(columns), axis=1, return_index=True)
    first.sort()
    return first
