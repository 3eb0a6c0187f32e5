"""The compiled replay core's driver: the built-in demand caches (lru, lfu, belady) replayed in C.

simulate() calls it for those policies (`core="auto"`); the core (tieremu/native/replay.c) makes simulate.py's
Python decisions exactly, and both build their result through simulate.build_result. Only the exact built-in
classes run here: a subclass may override any decision, so it takes the Python path. Flattening the trace into
arrays (hash ids to dense ids) is trace preparation (`prepare_s`), outside `wall_s` as parsing is; `wall_s` is the
core's run and the result built from it, `policy_cpu_s` the core's run alone.
"""

from __future__ import annotations

import ctypes
import time
from array import array
from collections.abc import Sequence
from dataclasses import replace

from tieremu.errors import PolicyError, WorkloadError
from tieremu.policy.base import Policy
from tieremu.policy.belady import Belady
from tieremu.policy.recency import LFU, LRU
from tieremu.workloads.simulate import Counts, ReplayResult, Settings, arrival_times, build_result
from tieremu.workloads.trace import Request

KINDS: dict[type[Policy], int] = {LRU: 0, LFU: 1, Belady: 2}  # replay.c's enum
NATIVE = ("lru", "lfu", "belady")
MAX_TIERS = 16
COUNTS = 9  # replay.c's counts_out


def supports(policy: Policy) -> bool:
    return type(policy) in KINDS


def run(requests: Sequence[Request], settings: Settings, policy: Policy, params: dict[str, object]) -> ReplayResult:
    """Replay in the compiled core; the same result as simulate's Python path (wall and CPU times aside)."""
    from tieremu.native.build import replay_core  # compiles replay.c on first use

    if len(settings.names) > MAX_TIERS:
        raise WorkloadError(f"the compiled replay core takes at most {MAX_TIERS} tiers, got {len(settings.names)}; "
                            "use core=python")
    started = time.perf_counter()
    ids: dict[int, int] = {}
    blocks = array("i", [ids.setdefault(h, len(ids)) for r in requests for h in r.hash_ids])
    starts = array("q", [0])
    for r in requests:
        starts.append(starts[-1] + len(r.hash_ids))
    lengths = array("q", [r.input_length for r in requests])
    arrivals = arrival_times(requests)
    n = len(settings.names)
    capacity = array("q", [-1 if c is None else c for c in settings.capacity])
    read_s = array("d", settings.read_s)
    move_s = array("d", [x for row in settings.move_s for x in row])
    hits, resident, counts = array("q", [0] * n), array("q", [0] * n), array("q", [0] * COUNTS)
    residency, doubles = array("d", [0.0] * n), array("d", [0.0] * 2)
    pair_moves = array("q", [0] * (n * n))  # moves from tier i to tier j: a pair's moves carry its move_bytes
    ttft, ttft_sorted = array("d", bytes(8 * len(requests))), array("d", bytes(8 * len(requests)))
    arrival = array("d", arrivals)
    core_started = time.perf_counter()
    rc = replay_core().replay_demand(
        KINDS[type(policy)], len(blocks), _ptr(blocks), len(ids), len(requests), _ptr(starts), _ptr(lengths),
        _ptr(arrival), n, _ptr(capacity), _ptr(read_s), _ptr(move_s), settings.prefill, settings.block_tokens,
        settings.epoch_s, settings.ping_pong_epochs, int(settings.pin), _ptr(hits), _ptr(residency), _ptr(resident),
        _ptr(counts), _ptr(doubles), _ptr(ttft), _ptr(ttft_sorted), _ptr(pair_moves))
    core_s = time.perf_counter() - core_started
    if rc == 1:
        raise MemoryError("the compiled replay core ran out of memory")
    if rc:
        raise PolicyError(f"the compiled replay core lost track of a block under {policy.name} (code {rc}): a bug; "
                          "core=python replays it")
    misses, evictions, uncached, promotions, demotions, ping_pongs, waited, samples, epochs = counts
    result = Counts(hits=tuple(hits), misses=misses, resident=tuple(resident), residency=tuple(residency),
                    samples=samples, strr_sum=doubles[0], evictions=evictions, uncached=uncached,
                    promotions=promotions, demotions=demotions, prefetches=0, ping_pongs=ping_pongs, skipped=0,
                    deferred=0, waited=waited, epochs=epochs, channel_free=doubles[1], ttft_ms=tuple(ttft),
                    moved_bytes=sum(m * settings.bytes_of(k // n, k % n) for k, m in enumerate(pair_moves)))
    replayed = build_result(result, settings, policy, requests, arrivals, 0.0, core_s, params, core="native",
                            prepare_s=core_started - started, ttft_sorted=ttft_sorted.tolist())
    return replace(replayed, wall_s=time.perf_counter() - core_started)


def _ptr(values: array) -> int:
    """The address of an array's buffer (kept alive by the caller for the call)."""
    address, _ = values.buffer_info()
    return ctypes.c_void_p(address).value or 0
