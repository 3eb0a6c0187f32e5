"""One serving instance, as its own process: execute-mode replay of the requests routed to it, against its own
tiered KV store and policy, with a peer tier behind its own tiers.

With `--pd P:D` (settings' `role`) an instance is a prefill instance (it serves its requests as below, keeps
serving its blocks to the decode instances, and reports `prefilled` instead of `done`) or a decode instance: it
is handed a prefilled request with its holder, pulls every block of it that it lacks from the holder over the
block transport (checksummed; a failed pull is recomputed here, never used), stores them under its policy, and
runs decode steps, each one query's attention over the request's blocks through the cache. Generated tokens' KV is
not appended: every step attends over the prompt's blocks (the handed-over KV is what is measured).

Run as `python -m tieremu.cluster.instance` (inside its network namespace when there are namespaces). The
orchestrator (tieremu.cluster.replay) writes one JSON line of settings, then requests, faults and `end` on
stdin; the instance answers with JSON lines on stdout (ready, one `done` per request, drained, result).

It reuses execute mode's run (tieremu.workloads.execute: the cache over the resolved tiers, the policy's
admission with room-making, pinning, the migration daemon) and changes what happens to a block missing from
the instance's own tiers: it is looked up in the peer index; if peers hold it and the estimate says pulling is
faster than recomputing, it is pulled (checksummed end to end), else it is recomputed by the prefill model
(tieremu.cluster.prefill). Either way it is stored locally where the policy admits it, and the instance tells
the index (stored / evicted events).
"""

from __future__ import annotations

import heapq
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tieremu.cluster.index import Endpoints, IndexStats, PeerIndex
from tieremu.cluster.link import LinkSpec
from tieremu.cluster.mooncake import DESCRIBE_KEY, MooncakeStage, StageSpec
from tieremu.cluster.prefill import PrefillData, tensor_digest
from tieremu.cluster.shm import PoolSpec, ShmPool
from tieremu.cluster.wire import BlockClient, BlockServer, LinkState, PullError
from tieremu.daemon.daemon import DaemonReport
from tieremu.kv.arena import NumaArena
from tieremu.numa.topology import discover
from tieremu.policy.base import AccessEvent, UpcomingRequest
from tieremu.policy.registry import get_policy
from tieremu.tiers.config import TierMap, load_tier_map
from tieremu.tiers.resolve import resolve
from tieremu.workloads.execute import BlockCheck, _check, _limits, _Run, scaled_layout
from tieremu.workloads.simulate import policy_context
from tieremu.workloads.trace import Request

SUSPECT_S = 1.0  # a peer whose pull failed is not asked again for this long
SELF_CHECKS = 3  # pulled blocks per instance also recomputed here and compared byte for byte
HANDOFF_TIMEOUT_S = 2.0  # a hand-off pull not answered in this long is recomputed here (the holder is then avoided)
EMA = 0.2
DEFAULT_OVERHEAD_S = 300e-6  # a pull's software cost before the first probe
PROBE_KEY = 2**64 - 1  # a hash id no trace has: the reply is "not held", a round trip with no payload
PROBES = 3


def local_tiers(tier_map: TierMap) -> TierMap:
    """The instance's own tiers: the tier map without its peer tier(s)."""
    return TierMap(tier_map.name, tuple(t for t in tier_map.tiers if t.kind != "peer"), tier_map.description,
                   tier_map.source)


@dataclass
class Counters:
    local: int = 0
    peer: int = 0
    miss: int = 0
    peer_bytes: int = 0
    pulls: int = 0
    pulls_failed: int = 0
    stale: int = 0
    corrupted: int = 0
    pull: int = 0  # requests whose peer-held blocks were pulled
    recompute: int = 0  # requests whose peer-held blocks were recomputed (the estimate said so)
    # --pd, decode instances: blocks handed over (pulled from the prefill instance), found already held here, or
    # recomputed here after a failed or empty pull; their bytes; requests decoded and decode steps run.
    pd_handed: int = 0
    pd_local: int = 0
    pd_recomputed: int = 0
    pd_bytes: int = 0
    decoded: int = 0
    decode_steps: int = 0


class PeerRun(_Run):
    """Execute mode's run with a peer tier: see the module docstring."""

    def __init__(self, settings: dict[str, Any], requests: Sequence[Request], out: Output) -> None:
        self.s = settings
        self.out = out
        self.me = settings["me"]
        layout = scaled_layout(settings["block_kib"], layers=1)
        tier_map = local_tiers(load_tier_map(settings["tiers"]))
        resolved = resolve(tier_map, discover())
        _check(resolved, layout, settings["time_scale"], settings["epoch_s"], 1)
        limits = _limits(resolved, {t.name: settings["capacity_blocks"] for t in resolved.tiers})
        policy = get_policy(settings["policy"], None, policy_context(requests, settings["epoch_s"]))
        super().__init__(requests, resolved, layout, policy, limits, None, time_scale=settings["time_scale"],
                         epoch_s=settings["epoch_s"], budget_gbps=None, seed=0, daemon_thread=True)
        self.prefill = PrefillData(layout)
        self.c = Counters()
        self.digests: dict[int, bytes] = {}
        self.pull_ms: list[float] = []
        self.estimates: list[tuple[float, float]] = []  # (predicted s, measured s) per request that pulled
        self.self_checked = 0
        self.suspect: dict[int, float] = {}
        self.final_check = BlockCheck(0, ())
        self.stored: list[int] = []
        self.announced: set[int] = set()  # what the index has been told this instance holds
        self.p2p = settings["sharing"] == "p2p"
        self.link = LinkSpec(**settings["link"])
        self.links = {host: LinkState(self.link, pace=settings["pace"]) for host in settings["peer_hosts"]}
        self.backlog = 0
        self.die_mid_transfer = False  # fault kill-peer: die while serving the next pull
        self.index: PeerIndex | None = None
        self.server: BlockServer | None = None
        self.clients: dict[int, BlockClient] = {}
        # --transport shm: the shared pool blocks cross (tieremu.cluster.shm); --transport mooncake: the Transfer
        # Engine and its staging slots (tieremu.cluster.mooncake)
        self.pool: ShmPool | MooncakeStage | None = None
        self.prefill_s = self._warm_prefill()
        self.overhead: dict[int, float] = {}  # peer -> a pull's time beyond the link model (probed, then learned)
        self.role = settings.get("role", "both")  # --pd: prefill | decode
        self.handoff_ms: list[float] = []
        self.tpot_ms: list[float] = []
        if self.p2p:
            peers = {int(j): Endpoints(p["host"], p["events"], p["queries"]) for j, p in settings["peers"].items()}
            mine = settings["mine"]
            if settings.get("pool"):
                self.pool = ShmPool.attach(PoolSpec(**settings["pool"]))
                self.pool.require_on_node()
                self.pool.slot_view(0, 0, self.layout.block_bytes)  # a block fits a slot, or refuse now
            elif settings.get("mooncake"):
                self.pool = MooncakeStage(StageSpec.of_json(settings["mooncake"]), self.me)
                self.pool.slot_view(self.me, 0, self.layout.block_bytes)  # a block fits a slot, or refuse now
            self.server = BlockServer(settings["bind"], mine["blocks"], self._read_block, self._link_for,
                                      seed=self.me, pool=self.pool, me=self.me)
            self.index = PeerIndex(settings["index"], self.me, settings["incarnation"], peers, settings["bind"],
                                   Endpoints(settings["bind"], mine["events"], mine["queries"]), self._held,
                                   self.server.queue_s, lease_s=settings["lease_s"])
            self.clients = {int(j): BlockClient(p["host"], p["blocks"], self.pool, self.me, int(j))
                            for j, p in settings["peers"].items()}
        if self.role == "prefill" and self.server is None:  # the decode instances pull the prefilled blocks here
            self.server = BlockServer(settings["bind"], settings["mine"]["blocks"], self._read_block, self._link_for,
                                      seed=self.me, me=self.me)
        if self.role == "decode":  # the prefill instances, over TCP whatever --sharing says
            self.clients = {int(j): BlockClient(p["host"], p["blocks"], None, self.me, int(j))
                            for j, p in settings["holders"].items()}

    def probe(self) -> None:
        """Time a few empty pulls from each peer: the estimator's first figure for a pull's cost beyond the link."""
        for peer, client in self.clients.items():
            times = []
            for _ in range(PROBES):
                try:
                    times.append(client.pull(PROBE_KEY, 1.0).seconds)
                except PullError:
                    break
            if times:
                self.overhead[peer] = max(0.0, sorted(times)[len(times) // 2] - self.link.latency_us * 1e-6)

    def _warm_prefill(self) -> float:
        self.prefill.of(-1)
        t0 = time.perf_counter()
        self.prefill.of(-2)
        return time.perf_counter() - t0

    def _link_for(self, host: str) -> LinkState:
        return self.links.get(host) or LinkState(self.link, pace=self.s["pace"])

    # -- what peers ask of this instance ------------------------------------------------------------------------

    def _read_block(self, key: int) -> bytes | None:
        if key == DESCRIBE_KEY and isinstance(self.pool, MooncakeStage):  # a peer asks where our engine is
            return self.pool.describe()
        with self.cache.lock:
            block = self.cache.pool.by_key(key)
            if block is None:
                return None
            arena = self.cache.pool.arenas[block.arena]
            if not isinstance(arena, NumaArena):
                return None
            data = arena.blocks[block.slot].contiguous().view(torch.uint8).numpy().tobytes()
        if self.die_mid_transfer:  # fault kill-peer: the pull is taken and the block read; its reply never comes
            self.out.send(ev="dying", key=key)
            os.kill(os.getpid(), signal.SIGKILL)
        return data

    def _held(self) -> set[int]:
        with self.cache.lock:
            return {b.key for b in self.cache.pool.blocks.values() if b.key is not None}

    # -- one request -------------------------------------------------------------------------------------------

    def serve(self, index: int, request: Request) -> None:
        cache, view, keys = self.cache, self.view, request.hash_ids
        with self.daemon.policy_lock:
            self.policy.upcoming([UpcomingRequest(index, request.arrival_s, request.hash_ids)])
        with cache.lock:
            missing = [k for k in dict.fromkeys(keys) if view.tier_of(k) is None]
        pulled = self._pull(missing) if self.p2p and missing else {}
        seqs: list[int] = []
        now = request.arrival_s
        events = []
        for key in keys:
            with cache.lock:
                tier = view.tier_of(key)
                view.pin((key,))
            if tier is not None:
                self._read([key], seqs)
                self.c.local += 1
                events.append(AccessEvent(key, tier, now, index))
                continue
            if key in pulled:
                data = pulled.pop(key)
                self.c.peer += 1
            else:
                t0 = time.perf_counter()
                data = self.prefill.of(key)
                self.prefill_s += EMA * (time.perf_counter() - t0 - self.prefill_s)
                self.c.miss += 1
            if self._admit_and_write(key, data, seqs):
                self.digests[key] = tensor_digest(data)
                self.stored.append(key)
            else:
                self.uncached += 1
            events.append(AccessEvent(key, None, now, index))
        cache.end_step()
        with self.daemon.policy_lock:
            self.policy.observe(events)
        for seq in seqs:
            cache.free_sequence(seq)
        view.unpin()
        if self.index is not None:
            self._publish()
        self.stored = []

    def _publish(self) -> None:
        """Tell the index what changed since the last request, as net changes against what is resident now: blocks
        announced before and gone now (evicted by this request's admissions, or by the daemon since) are 'evicted';
        blocks stored by this request and still resident are 'stored' (one both stored and evicted by this request
        is neither)."""
        assert self.index is not None
        resident = self._held()
        evicted = sorted(self.announced - resident)
        stored = [k for k in dict.fromkeys(self.stored) if k in resident and k not in self.announced]
        for key in evicted:
            self.digests.pop(key, None)
        self.announced.difference_update(evicted)
        self.announced.update(stored)
        self.index.publish("evicted", evicted)
        self.index.publish("stored", stored)

    def _pull(self, missing: list[int]) -> dict[int, torch.Tensor]:
        """Pull the peer-held blocks of `missing` if the estimate says it beats recomputing them."""
        assert self.index is not None
        now = time.monotonic()
        avoid = {p for p, until in self.suspect.items() if until > now}
        holders = self.index.lookup(missing, avoid)
        if not holders:
            return {}
        source = {k: min(hs, key=self.index.queue_of) for k, hs in holders.items()}
        nbytes = self.layout.block_bytes
        # Per block: the link, this pair's software cost, and the source's lateness in answering (its CPU share);
        # once: the pulls queued at the source.
        predicted = sum(self.link.seconds(nbytes) + self.overhead.get(p, DEFAULT_OVERHEAD_S) + self.index.lag_of(p)
                        for p in source.values()) + max(self.index.queue_of(p) for p in set(source.values()))
        if self.s["pull"] == "estimate" and predicted >= len(source) * self.prefill_s:
            self.c.recompute += 1
            return {}
        self.c.pull += 1
        timeout = max(0.05, 5 * (self.link.seconds(nbytes) + max(self.overhead.values(), default=0.0)))
        got: dict[int, torch.Tensor] = {}
        measured = 0.0
        clean = True
        for key, peer in source.items():
            if self.suspect.get(peer, 0) > time.monotonic():
                clean = False
                continue
            try:
                reply = self.clients[peer].pull(key, timeout)
            except PullError as exc:
                clean = False
                if exc.kind == "corrupt":
                    self.c.corrupted += 1
                elif exc.kind == "refused":
                    self.c.stale += 1  # the index named a peer that is gone
                    self.suspect[peer] = time.monotonic() + SUSPECT_S
                else:
                    self.c.pulls_failed += 1
                    self.suspect[peer] = time.monotonic() + SUSPECT_S
                continue
            if reply.payload is None:
                self.c.stale += 1
                clean = False
                continue
            self.c.pulls += 1
            measured += reply.seconds
            self.c.peer_bytes += len(reply.payload)
            self.pull_ms.append(reply.seconds * 1e3)
            known = self.overhead.get(peer, DEFAULT_OVERHEAD_S)
            beyond = reply.seconds - self.link.seconds(nbytes) - self.index.lag_of(peer)
            self.overhead[peer] = max(0.0, known + EMA * (beyond - known))
            data = torch.frombuffer(bytearray(reply.payload), dtype=self.layout.dtype).view(self.layout.block_shape)
            if self.self_checked < SELF_CHECKS:  # the bytes a peer computed are the bytes we would compute
                self.self_checked += 1
                if not torch.equal(data, self.prefill.of(key)):
                    self.c.corrupted += 1
                    continue
            got[key] = data
        if clean and got:
            self.estimates.append((predicted, measured))
        return got

    # -- --pd: one handed-over request on a decode instance -------------------------------------------------------

    def decode(self, index: int, request: Request, holder: int, due: float) -> tuple[float, float | None, float]:
        """Take the request's blocks from `holder` (those not held here), store them, run the decode steps: (TTFT
        ms from `due` to the first token, TPOT ms or None for a single step, hand-off ms)."""
        cache, view = self.cache, self.view
        keys = list(dict.fromkeys(request.hash_ids))
        with self.daemon.policy_lock:
            self.policy.upcoming([UpcomingRequest(index, request.arrival_s, request.hash_ids)])
        seqs: list[int] = []
        events = []
        now = request.arrival_s
        t0 = time.perf_counter()
        client = self.clients[holder]
        failed = False
        for key in keys:
            with cache.lock:
                tier = view.tier_of(key)
                view.pin((key,))
            if tier is not None:
                self.c.pd_local += 1
                events.append(AccessEvent(key, tier, now, index))
                continue
            data = None if failed else self._hand(client, key)
            if data is None:
                failed = failed or self.suspect.get(holder, 0) > time.monotonic()
                data = self.prefill.of(key)
                self.c.pd_recomputed += 1
            if self._admit_and_write(key, data, seqs):
                self.digests[key] = tensor_digest(data)
            else:
                self.uncached += 1
            events.append(AccessEvent(key, None, now, index))
        self.handoff_ms.append((time.perf_counter() - t0) * 1e3)
        with self.daemon.policy_lock:
            self.policy.observe(events)
        with cache.lock:
            resident = [k for k in keys if view.tier_of(k) is not None]
        seq = self._new_seq(seqs)
        cache.add_sequence(seq, keys=resident)
        steps = max(1, min(request.output_length, self.s["max_decode_steps"]))
        lay = self.layout
        q = torch.randn(lay.kv_heads, lay.head_dim, generator=torch.Generator().manual_seed(request.timestamp_ms))
        q = q.to(lay.dtype)
        scale = lay.head_dim ** -0.5
        first = time.time()
        t1 = time.perf_counter()
        for step in range(steps):
            for layer in range(lay.layers):
                if cache.attend(seq, layer, q, scale) is None:  # fp16 blocks: read them, attend here
                    k, v = cache.read(seq, layer)
                    torch.nn.functional.scaled_dot_product_attention(
                        q.unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=scale)
            cache.end_step()
            if step == 0:
                first = time.time()
                t1 = time.perf_counter()
        tpot = (time.perf_counter() - t1) * 1e3 / (steps - 1) if steps > 1 else None
        if tpot is not None:
            self.tpot_ms.append(tpot)
        self.c.decoded += 1
        self.c.decode_steps += steps
        for s in seqs:
            cache.free_sequence(s)
        view.unpin()
        return (first - due) * 1e3, tpot, self.handoff_ms[-1]

    def _hand(self, client: BlockClient, key: int) -> torch.Tensor | None:
        """One block pulled from its prefill instance, checksummed by the transport; None if the pull failed or the
        holder no longer has it (the caller recomputes it)."""
        try:
            reply = client.pull(key, HANDOFF_TIMEOUT_S)
        except PullError as exc:
            if exc.kind == "corrupt":
                self.c.corrupted += 1
            else:
                self.c.pulls_failed += 1
                self.suspect[client.holder] = time.monotonic() + SUSPECT_S
            return None
        if reply.payload is None:
            self.c.stale += 1
            return None
        data = torch.frombuffer(bytearray(reply.payload), dtype=self.layout.dtype).view(self.layout.block_shape)
        if self.self_checked < SELF_CHECKS:  # the bytes the prefill instance computed are the bytes we would
            self.self_checked += 1
            if not torch.equal(data, self.prefill.of(key)):
                self.c.corrupted += 1
                return None
        self.c.pd_handed += 1
        self.c.pd_bytes += len(reply.payload)
        return data

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> DaemonReport:
        """Stop serving peers and the daemon, check every resident block's bytes against the digest taken when it
        was computed or verified on arrival (the end-to-end check), then execute mode's finish (which releases the
        memory; its own check compares with seeded noise, which this run's computed blocks are not)."""
        try:
            if self.index is not None:
                self.index.close()
            if self.server is not None:
                self.server.close()
            for client in self.clients.values():
                client.close()
            if self.pool is not None:
                self.pool.close()
            self.daemon.stop()
            if not self._finished:
                self.final_check = self.check_resident()
        finally:
            self._finished = True
            report = super().finish()
        return report

    def check_resident(self) -> BlockCheck:
        checked, corrupted = 0, []
        with self.cache.lock:
            for block in list(self.cache.pool.blocks.values()):
                if block.key is None:
                    continue
                checked += 1
                arena = self.cache.pool.arenas[block.arena]
                if tensor_digest(arena.blocks[block.slot]) != self.digests.get(block.key):
                    corrupted.append(block.key)
        return BlockCheck(checked, tuple(corrupted))


class Output:
    """JSON lines to the orchestrator, one writer at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def send(self, **msg: Any) -> None:
        with self._lock:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()


class Inbox:
    """Requests (a heap by arrival), faults and the end, read from stdin by a thread."""

    def __init__(self, run_ref: list[PeerRun]) -> None:
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int, Request]] = []
        self.holders: dict[int, int] = {}  # --pd: request -> the prefill instance holding its blocks
        self.ended = False
        self.report = threading.Event()
        self.run_ref = run_ref
        threading.Thread(target=self._read, daemon=True, name="inbox").start()

    def _read(self) -> None:
        for line in sys.stdin:
            msg = json.loads(line)
            op = msg["op"]
            if op == "request":
                r = Request(timestamp_ms=msg["arrival_ms"], input_length=msg["input_length"],
                            output_length=msg["output_length"], hash_ids=tuple(msg["hash_ids"]))
                if msg.get("holder") is not None:  # --pd: a prefilled request handed to this decode instance
                    self.holders[msg["i"]] = int(msg["holder"])
                with self.cond:
                    heapq.heappush(self.heap, (r.arrival_s, msg["i"], r))
                    self.cond.notify()
            elif op == "end":
                with self.cond:
                    self.ended = True
                    self.cond.notify()
            elif op == "report":
                self.report.set()
            elif op == "drop-events" and self.run_ref and self.run_ref[0].index is not None:
                self.run_ref[0].index.drop_next += int(msg["count"])
            elif op == "reorder-events" and self.run_ref and self.run_ref[0].index is not None:
                self.run_ref[0].index.reorder_next += int(msg["count"])
            elif op == "kill-mid-transfer" and self.run_ref:
                self.run_ref[0].die_mid_transfer = True
                self.run_ref[0].out.send(ev="armed")
            elif op == "partition" and self.run_ref:
                run = self.run_ref[0]
                for host in msg["hosts"]:  # replies to that peer are dropped from now on (100% loss)
                    run.links.setdefault(host, LinkState(run.link, pace=run.s["pace"])).partitioned = True
        with self.cond:  # the orchestrator went away: finish what is queued
            self.ended = True
            self.cond.notify()
        self.report.set()

    def next(self, due_of: Any) -> tuple[int, Request, float] | None:
        with self.cond:
            while True:
                if self.heap:
                    arrival, i, r = self.heap[0]
                    due = due_of(arrival)
                    left = due - time.time()
                    if left <= 0:
                        heapq.heappop(self.heap)
                        return i, r, due
                    self.cond.wait(min(left, 0.05))
                elif self.ended:
                    return None
                else:
                    self.cond.wait(0.05)


def main() -> None:
    out = Output()
    settings = json.loads(sys.stdin.readline())
    torch.set_num_threads(1)
    # The block server and the index answer from their own threads while the replay computes: a short switch
    # interval lets them take the GIL within ~0.5 ms instead of 5 ms (pull times measure the link, not the GIL).
    sys.setswitchinterval(0.0005)
    share = [Request(timestamp_ms=ts, input_length=0, output_length=0, hash_ids=tuple(ids))
             for ts, ids in settings["share"]]
    # The share gives the policy its context (the future, for Belady); an instance with none yet gets one block.
    run = PeerRun(settings, share or [Request(0, 0, 0, (0,))], out)
    out.send(ev="ready", me=run.me, prefill_ms=run.prefill_s * 1e3)
    start = json.loads(sys.stdin.readline())  # the common start line: every instance's clock starts together
    inbox = Inbox([run])
    run.probe()

    def due_of(arrival: float) -> float:
        return start["t0_wall"] + (arrival - start["trace0_s"]) * settings["time_scale"]

    run.daemon.start()
    served = 0
    log: list[tuple[int, int, int, int, float, float]] = []  # per request: i, local, peer, miss, serve s, pull s
    try:
        while (item := inbox.next(due_of)) is not None:
            i, request, due = item
            if run.role == "decode":
                ttft, tpot, handoff = run.decode(i, request, inbox.holders.pop(i), due)
                served += 1
                out.send(ev="done", i=i, ttft_ms=ttft, tpot_ms=tpot, handoff_ms=handoff)
                continue
            before, pulls, t0 = (run.c.local, run.c.peer, run.c.miss), len(run.pull_ms), time.perf_counter()
            run.serve(i, request)
            log.append((i, run.c.local - before[0], run.c.peer - before[1], run.c.miss - before[2],
                        time.perf_counter() - t0, sum(run.pull_ms[pulls:]) / 1e3))
            served += 1
            # a prefill instance's figure is its prefill's end, from the request's due time (the TTFT is decode's)
            out.send(ev="prefilled" if run.role == "prefill" else "done", i=i, ttft_ms=(time.time() - due) * 1e3)
        out.send(ev="drained")
        inbox.report.wait()
        entries = run.index.entries() if run.index is not None else {}
        held = sorted(run._held())
        stats = run.index.stats if run.index is not None else None
        served_bytes = run.server.served_bytes if run.server is not None else 0
    finally:
        run.finish()
    c = run.c
    out.send(ev="result", me=run.me, requests=served, local=c.local, peer=c.peer, miss=c.miss,
             peer_bytes=c.peer_bytes, served_bytes=served_bytes, pulls=c.pulls, pulls_failed=c.pulls_failed,
             stale=c.stale, corrupted=c.corrupted + len(run.final_check.corrupted),
             blocks_checked=run.final_check.checked,
             **IndexStats.reported(stats), pull_ms=run.pull_ms, estimates=run.estimates,
             decisions={"pull": c.pull, "recompute": c.recompute}, entries={str(k): v for k, v in entries.items()},
             held=held, prefill_ms=run.prefill_s * 1e3, overhead_ms={str(p): s * 1e3 for p, s in run.overhead.items()},
             backings={t.name: t.backing.value for t in run.resolved.tiers}, uncached=run.uncached,
             incarnation=settings["incarnation"], served=log, role=run.role, decoded=c.decoded,
             decode_steps=c.decode_steps, pd_handed=c.pd_handed, pd_local=c.pd_local, pd_recomputed=c.pd_recomputed,
             pd_bytes=c.pd_bytes, tpot_ms=run.tpot_ms, handoff_ms=run.handoff_ms)


if __name__ == "__main__":
    main()
