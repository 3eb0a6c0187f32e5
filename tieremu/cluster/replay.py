"""Cluster replay in execute mode: N instance processes (tieremu.cluster.instance), each in its own network
namespace (root) or all on loopback, the trace's requests routed to them in real time, faults injected, the
namespaces always removed, one ClusterResult.

Everything the user gave is checked (`ClusterSpec.check`) before any namespace or process exists.

With `pd=(P, D)` instances 0..P-1 prefill and P..P+D-1 decode: request k is prefilled by prefill instance k mod P
(sharing p2p among the prefill instances as without pd), then handed to decode instance P + k mod D, which pulls
its blocks from that prefill instance over the block transport (TCP, whatever `sharing` says) and decodes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tieremu.cluster import mooncake
from tieremu.cluster.faults import DROPPED_EVENTS, KILL_WAIT_S, REORDERED_EVENTS, Fault, parse_fault
from tieremu.cluster.link import LinkSpec, Shaping
from tieremu.cluster.netns import MAX_INSTANCES, Mesh, burst_bytes, cleanup_stale, have_root, require_root
from tieremu.cluster.result import ClusterResult, HitRatio, InstanceRow, Percentiles
from tieremu.cluster.ring import INDEXES, LEASE_S, ring_homes
from tieremu.cluster.shm import ShmPool, check_node, cleanup_stale_pools, pool_backing
from tieremu.cluster.shm import remove as shm_remove
from tieremu.cluster.wire import paced_slice
from tieremu.errors import ConfigError, TraceError, WorkloadError
from tieremu.processes import terminate_raises
from tieremu.tiers.config import load_tier_map
from tieremu.workloads.trace import Request, read_trace

SHARING = ("none", "p2p")
# estimate: pull a peer-held block only when the estimate says it beats recomputing it; always: pull whenever a
# peer holds it (the estimator still predicts, so its error is still measured).
PULL_RULES = ("estimate", "always")
TRANSPORTS = ("tcp", "shm", "mooncake")
BUILT_TRANSPORTS = ("tcp", "shm", "mooncake")
MODES = ("execute",)
READY_TIMEOUT_S = 120.0
# After the last request, before the index is checked: events in flight land, and a gap one shows is noticed at
# the next heartbeat (index.HEARTBEAT_S) and resynced by the peer's thread. 0.5 s (2.5 heartbeats) was once too
# short on the loaded 2-vCPU CI machine (restart-peer: 6 entries still missing); 5 heartbeats.
QUIESCE_S = 1.0
DISPATCH_LEAD_S = 0.02  # a request is handed to its instance this long before it is due
MAX_DECODE_STEPS = 16  # --pd: decode steps per request, as the vLLM engine caps outputs (tokens beyond are not run)


def route_round_robin(index: int, live: Sequence[int]) -> int:
    """The router: request `index` goes to live instance index mod N (the scheduling work adds other routers)."""
    return live[index % len(live)]


@dataclass(frozen=True)
class ClusterSpec:
    trace: Path
    tiers: Path
    instances: int = 3
    sharing: str = "p2p"
    pull: str = "estimate"
    index: str = "broadcast"
    transport: str = "tcp"
    link: LinkSpec | None = None  # None: the peer tier's link in the tier map
    max_requests: int | None = None
    faults: tuple[str, ...] = ()
    mode: str = "execute"
    namespaces: bool | None = None  # None: when root
    policy: str = "lru"
    capacity_blocks: int = 4096  # per local tier, per instance
    block_kib: int = 64
    time_scale: float = 0.05  # wall seconds per trace second
    epoch_s: float = 0.05
    lease_s: float = LEASE_S
    shm_node: int = 0  # --transport shm: the memory node the shared pool is bound to
    pd: tuple[int, int] | None = None  # (prefill instances, decode instances): P + D = instances


@dataclass(frozen=True)
class Checked:
    spec: ClusterSpec
    requests: list[Request]
    link: LinkSpec
    faults: tuple[Fault, ...]
    namespaces: bool


def check(spec: ClusterSpec) -> Checked:
    """Every input checked, nothing started: ConfigError naming the bad value and what would be valid."""
    if spec.mode not in MODES:
        raise ConfigError(f"--mode {spec.mode!r}: cluster replay runs in {', '.join(MODES)} mode here (the "
                          "cluster simulator adds simulate)")
    if spec.sharing not in SHARING:
        raise ConfigError(f"--sharing {spec.sharing!r}: valid: {', '.join(SHARING)}")
    if spec.pull not in PULL_RULES:
        raise ConfigError(f"--pull {spec.pull!r}: valid: {', '.join(PULL_RULES)}")
    if spec.index not in INDEXES:
        raise ConfigError(f"--index {spec.index!r}: unknown index design; valid: {', '.join(INDEXES)}")
    if spec.transport not in TRANSPORTS:
        raise ConfigError(f"--transport {spec.transport!r}: unknown transport; valid: {', '.join(TRANSPORTS)}")
    if spec.transport not in BUILT_TRANSPORTS:
        raise ConfigError(f"--transport {spec.transport}: not built yet (the Mooncake transport is open work); use "
                          f"{', '.join(BUILT_TRANSPORTS)}")
    if spec.transport == "shm":
        if spec.namespaces:
            raise ConfigError("--transport shm runs the instances on loopback (the pool, not a veth, carries the "
                              "blocks; the transport paces them): drop --namespaces")
        check_node(spec.shm_node)
    if spec.transport == "mooncake":
        mooncake.require()
    if not 1 <= spec.instances <= MAX_INSTANCES:
        raise ConfigError(f"--instances {spec.instances}: give 1..{MAX_INSTANCES}")
    if spec.sharing == "p2p" and spec.instances < 2:
        raise ConfigError("--sharing p2p needs at least 2 instances")
    if spec.pd is not None:
        check_pd(spec.pd, spec.instances, spec.transport)
    if spec.max_requests is not None and spec.max_requests < 1:
        raise ConfigError(f"--max-requests {spec.max_requests}: give 1 or more")
    if not 0 < spec.time_scale <= 100 or not 0.001 <= spec.epoch_s <= 60:
        raise ConfigError(f"time_scale={spec.time_scale}, epoch_s={spec.epoch_s}: time_scale must be in (0, 100] "
                          "and epoch_s in [0.001, 60]")
    if spec.capacity_blocks < 1:
        raise ConfigError(f"capacity_blocks={spec.capacity_blocks}: give 1 or more")
    tier_map = load_tier_map(spec.tiers)
    peer_tiers = [t for t in tier_map.tiers if t.kind == "peer"]
    if not [t for t in tier_map.tiers if t.kind != "peer"]:
        raise ConfigError(f"{spec.tiers}: the tier map needs at least one local tier besides its peer tier")
    given = next((t.link for t in peer_tiers if t.link is not None), None)
    link = spec.link or (None if given is None else LinkSpec(given.latency_us, given.gbps, given.jitter_us, given.loss))
    if link is None:
        if spec.sharing == "p2p" or spec.pd is not None:
            raise ConfigError(f"no link given: pass --link LATENCY_US,GBPS or give the peer tier of {spec.tiers} a "
                              "link: {latency_us: 10, gbps: 10}")
        link = LinkSpec(0.0, 100.0)
    if not spec.trace.is_file():
        raise TraceError(f"{spec.trace}: no such trace file")
    requests = read_trace(spec.trace)[: spec.max_requests]
    if not requests:
        raise TraceError(f"{spec.trace}: the trace has no request")
    faults = tuple(parse_fault(f, spec.instances, len(requests)) for f in spec.faults)
    if spec.pd is not None and faults:
        raise ConfigError(f"--fault {', '.join(spec.faults)} with --pd {pd_label(spec.pd)}: faults are injected "
                          "without --pd only (a dead prefill instance's hand-offs are not rerouted)")
    if faults and spec.sharing != "p2p":
        raise ConfigError("--fault needs --sharing p2p (faults strike peers, links and the index)")
    namespaces = (have_root() if spec.namespaces is None else spec.namespaces) and spec.transport != "shm"
    if namespaces:
        require_root()
    return Checked(spec, requests, link, faults, namespaces)


def check_pd(pd: tuple[int, int], instances: int, transport: str) -> None:
    p, d = pd
    half = max(1, instances // 2)
    if p < 1 or d < 1 or p + d != instances:
        raise ConfigError(f"--pd {p}:{d}: give P:D with P >= 1 prefill and D >= 1 decode instances, P + D = "
                          f"--instances {instances} (e.g. {half}:{instances - half})")
    if transport != "tcp":
        raise ConfigError(f"--pd {p}:{d} with --transport {transport}: the KV hand-off crosses TCP (on the veths or "
                          "loopback); use --transport tcp")


def pd_label(pd: tuple[int, int] | None) -> str | None:
    return None if pd is None else f"{pd[0]}:{pd[1]}"


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Proc:
    me: int
    popen: subprocess.Popen[str]
    incarnation: int = 0
    ready: bool = False
    alive: bool = True
    armed: bool = False  # fault kill-peer: it has been told to die in its next served pull, and said so
    kill_by: float | None = None  # fault kill-peer: the wall time it is killed at if no pull reached it
    drained: bool = False
    ended: bool = False
    result: dict[str, Any] | None = None
    sent: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)


class Cluster:
    def __init__(self, c: Checked) -> None:
        self.c = c
        self.spec = c.spec
        self.n = self.spec.instances
        self.mesh = Mesh(self.n, c.link) if c.namespaces else None
        self.inbox: queue.Queue[tuple[int, int, dict[str, Any]]] = queue.Queue()
        self.procs: dict[int, Proc] = {}
        self.ttft: dict[int, float] = {}
        self.tpot: dict[int, float] = {}  # --pd: per decoded request with 2 or more steps
        self.handoff: dict[int, float] = {}  # --pd: per decoded request, pulling and storing its blocks
        self.prefilled: dict[int, float] = {}  # --pd: per request, its prefill's end from its due time (ms)
        pd = self.spec.pd
        self.prefill_set = list(range(self.n)) if pd is None else list(range(pd[0]))
        self.decode_set: list[int] = [] if pd is None else list(range(pd[0], self.n))
        self.rows_dead: list[dict[str, Any]] = []
        self.ports = _free_port_base(self.n)
        self.trace0 = c.requests[0].arrival_s
        self.t0 = 0.0
        self.notes: list[str] = []
        self.pool: ShmPool | None = None  # --transport shm: created in cluster_replay, always removed there

    def host(self, i: int, seen_from: int) -> str:
        return "127.0.0.1" if self.mesh is None else self.mesh.address(i, seen_from)

    def ports_of(self, i: int) -> dict[str, int]:
        base = self.ports + 10 * i
        return {"events": base, "queries": base + 1, "blocks": base + 2}

    def role(self, i: int) -> str:
        return "both" if self.spec.pd is None else "prefill" if i in self.prefill_set else "decode"

    def sharing_of(self, i: int) -> str:
        """p2p among the prefill instances (all instances without pd); decode instances only take hand-offs."""
        return "none" if i in self.decode_set or len(self.prefill_set) < 2 else self.spec.sharing

    def settings(self, i: int, incarnation: int) -> dict[str, Any]:
        role = self.role(i)
        group = self.decode_set if role == "decode" else self.prefill_set
        share = [r for k, r in enumerate(self.c.requests) if route_round_robin(k, group) == i]
        others = {j: {"host": self.host(j, i), **self.ports_of(j)} for j in range(self.n) if j != i}
        peers = {j: p for j, p in others.items() if j in self.prefill_set and role != "decode"}
        return {
            "me": i, "incarnation": incarnation, "tiers": str(self.spec.tiers), "policy": self.spec.policy,
            "capacity_blocks": self.spec.capacity_blocks, "block_kib": self.spec.block_kib,
            "time_scale": self.spec.time_scale, "epoch_s": self.spec.epoch_s, "sharing": self.sharing_of(i),
            "pull": self.spec.pull, "role": role, "max_decode_steps": MAX_DECODE_STEPS,
            "holders": {j: p for j, p in others.items() if j in self.prefill_set} if role == "decode" else {},
            "index": self.spec.index, "link": self.c.link.to_json(), "pace": self.mesh is None,
            "peers": peers, "peer_hosts": [p["host"] for p in others.values()], "mine": self.ports_of(i),
            "bind": "0.0.0.0" if self.mesh is not None else "127.0.0.1", "lease_s": self.spec.lease_s,
            "share": [[r.timestamp_ms, list(r.hash_ids)] for r in share],
            "pool": None if self.pool is None else self.pool.spec.to_json(),
            "mooncake": self._stage(i),
        }

    def _stage(self, i: int) -> dict[str, Any] | None:
        """--transport mooncake: what instance i needs to start its Transfer Engine and find its peers' engines."""
        if self.spec.transport != "mooncake" or self.spec.sharing != "p2p":
            return None
        others = [j for j in range(self.n) if j != i]
        hosts = {j: self.host(i, j) for j in others}
        peers = {j: (self.host(j, i), self.ports_of(j)["blocks"]) for j in others}
        return mooncake.StageSpec(self.n, self.spec.block_kib * 1024, hosts, peers).to_json()

    def spawn(self, i: int, incarnation: int) -> Proc:
        command = [sys.executable, "-m", "tieremu.cluster.instance"]
        if self.mesh is not None:
            command = ["ip", "netns", "exec", self.mesh.namespaces[i], *command]
        env = {**mooncake.LOG_ENV, **os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
        popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
                                 env=env, start_new_session=True)
        proc = self.procs[i] = Proc(i, popen, incarnation)  # recorded at once: stop() kills what it knows
        self._write(proc, self.settings(i, incarnation))
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def _read(self, proc: Proc) -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            with contextlib.suppress(ValueError):
                self.inbox.put((proc.me, proc.incarnation, json.loads(line)))
        self.inbox.put((proc.me, proc.incarnation, {"ev": "exit"}))

    def _write(self, proc: Proc, msg: dict[str, Any]) -> None:
        if not proc.alive or proc.popen.stdin is None:
            return
        try:
            proc.popen.stdin.write(json.dumps(msg) + "\n")
            proc.popen.stdin.flush()
        except (BrokenPipeError, OSError):
            proc.alive = False

    def pump(self, until: float | None = None, want: Any = None) -> None:
        """Handle messages from the instances until `until` (wall time) or until `want()` is true."""
        while True:
            self._overdue_kills()
            if want is not None and want():
                return
            timeout = 0.05 if until is None else max(0.0, min(0.05, until - time.time()))
            try:
                me, inc, msg = self.inbox.get(timeout=timeout)
            except queue.Empty:
                msg = None
            if msg is not None:
                self._handle(me, inc, msg)
            if until is not None and time.time() >= until:
                return

    def _handle(self, me: int, inc: int, msg: dict[str, Any]) -> None:
        proc = self.procs.get(me)
        if proc is None or proc.incarnation != inc:
            return  # a message from a killed incarnation, already accounted for
        ev = msg["ev"]
        if ev == "ready":
            proc.ready = True
        elif ev == "done":
            proc.done.add(msg["i"])
            self.ttft[msg["i"]] = msg["ttft_ms"]
            if msg.get("tpot_ms") is not None:
                self.tpot[msg["i"]] = msg["tpot_ms"]
            if msg.get("handoff_ms") is not None:
                self.handoff[msg["i"]] = msg["handoff_ms"]
        elif ev == "prefilled":  # --pd: on to its decode instance, with the holder of its blocks
            index = msg["i"]
            proc.done.add(index)
            self.prefilled[index] = msg["ttft_ms"]
            self.send_request(index, self.c.requests[index], route_round_robin(index, self.decode_set), holder=me)
        elif ev == "drained":
            proc.drained = True
        elif ev == "result":
            proc.result = msg
        elif ev == "armed":
            proc.armed = True
        elif ev == "dying":
            self.notes.append(f"kill-peer: instance {me} died mid-transfer (serving block {msg['key']} to a peer)")
        elif ev == "exit" and proc.result is None:
            proc.alive = False  # it died on its own (kill-peer's mid-transfer death) or crashed
            self._record_dead(proc)

    def live(self) -> list[int]:
        return [i for i, p in sorted(self.procs.items()) if p.alive and p.ready and i in self.prefill_set]

    def send_request(self, index: int, request: Request, target: int, holder: int | None = None) -> None:
        proc = self.procs[target]
        proc.sent.add(index)
        self._write(proc, {"op": "request", "i": index, "arrival_ms": request.timestamp_ms,
                           "input_length": request.input_length, "output_length": request.output_length,
                           "hash_ids": list(request.hash_ids), "holder": holder})

    def start(self) -> None:
        for i in range(self.n):
            self.spawn(i, 0)
        deadline = time.time() + READY_TIMEOUT_S
        self.pump(until=deadline, want=lambda: all(p.ready or not p.alive for p in self.procs.values()))
        if not all(p.ready for p in self.procs.values()):
            raise WorkloadError("cluster replay: not every instance started (see its error above)")
        self.t0 = time.time() + 0.2
        for proc in self.procs.values():
            self._write(proc, {"op": "start", "t0_wall": self.t0, "trace0_s": self.trace0})

    def due(self, request: Request) -> float:
        return self.t0 + (request.arrival_s - self.trace0) * self.spec.time_scale

    def dispatch(self) -> None:
        faults = {f.at: f for f in self.c.faults}
        requests = self.c.requests
        for k, request in enumerate(requests):
            self.pump(until=self.due(request) - DISPATCH_LEAD_S)
            if k in faults:
                self.strike(faults[k])
            self._reroute_orphans()
            live = self.live()
            if not live:
                raise WorkloadError("cluster replay: every instance is gone")
            self.send_request(k, request, route_round_robin(k, live))
        self._reroute_orphans()

    def _reroute_orphans(self) -> None:
        """Requests sent to an instance that died before finishing them go to the live ones (from their original
        arrival: the time lost counts in their TTFT)."""
        live = self.live()
        for proc in list(self.procs.values()):
            if proc.alive or not live or proc.me in self.decode_set:
                continue
            orphans = sorted(proc.sent - proc.done)
            proc.sent -= set(orphans)
            for n, index in enumerate(orphans):
                self.send_request(index, self.c.requests[index], live[n % len(live)])

    def _overdue_kills(self) -> None:
        """kill-peer: an armed victim no pull reached in KILL_WAIT_S is killed from here."""
        for proc in list(self.procs.values()):
            if proc.kill_by is not None and time.time() >= proc.kill_by:
                proc.kill_by = None
                if proc.alive:
                    self.notes.append(f"kill-peer: no pull reached instance {proc.me} within {KILL_WAIT_S:.0f} s; "
                                      "killed idle")
                    self._kill(proc)

    def strike(self, fault: Fault) -> None:
        victim = self.procs[fault.victim]
        if fault.kind == "kill-peer":
            # Armed before request N is sent (and acknowledged, so a pull that request makes finds it armed).
            self._write(victim, {"op": "kill-mid-transfer"})
            self.pump(until=time.time() + READY_TIMEOUT_S, want=lambda: victim.armed or not victim.alive)
            victim.kill_by = time.time() + KILL_WAIT_S
        elif fault.kind == "restart-peer":
            self._kill(victim)
            proc = self.spawn(fault.victim, victim.incarnation + 1)
            proc.sent, proc.done = set(), set()
            self.pump(until=time.time() + READY_TIMEOUT_S, want=lambda: proc.ready or not proc.alive)
            self._write(proc, {"op": "start", "t0_wall": self.t0, "trace0_s": self.trace0})
            # What the old process had been sent and not finished, the new one serves.
            for index in sorted(victim.sent - victim.done):
                self.send_request(index, self.c.requests[index], proc.me)
            victim.sent = set(victim.done)
        elif fault.kind == "drop-events":
            self._write(victim, {"op": "drop-events", "count": DROPPED_EVENTS})
        elif fault.kind == "reorder-events":
            self._write(victim, {"op": "reorder-events", "count": REORDERED_EVENTS})
        elif fault.kind == "partition":
            if self.mesh is not None:
                self.mesh.cut(0, fault.victim)
            self._write(self.procs[0], {"op": "partition", "hosts": [self.host(fault.victim, 0)]})
            self._write(victim, {"op": "partition", "hosts": [self.host(0, fault.victim)]})

    def _kill(self, proc: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout=10)
        proc.alive = False
        self._record_dead(proc)
        self.pump(until=time.time() + 0.05)

    def _record_dead(self, proc: Proc) -> None:
        if not any(d["me"] == proc.me and d["incarnation"] == proc.incarnation for d in self.rows_dead):
            self.rows_dead.append({"me": proc.me, "incarnation": proc.incarnation, "requests": len(proc.done)})

    def finish(self) -> None:
        # An armed kill-peer victim dies (mid-transfer, or killed idle) before the run ends.
        self.pump(until=time.time() + KILL_WAIT_S + 1,
                  want=lambda: all(p.kill_by is None or not p.alive for p in self.procs.values()))
        self._reroute_orphans()
        # --pd: the decode instances end after the prefill instances have drained (and so handed over every
        # request); the prefill instances keep serving blocks until the report.
        for group in (self.prefill_set, self.decode_set):
            for i in group:
                self._write(self.procs[i], {"op": "end"})
                self.procs[i].ended = True
            self.pump(until=time.time() + 600, want=self._drained)
        # Entries of a dead sender last until their lease runs out: wait for it before the index is checked.
        wait = self.spec.lease_s + QUIESCE_S if any(not p.alive for p in self.procs.values()) else QUIESCE_S
        self.pump(until=time.time() + wait)
        for proc in self.procs.values():
            self._write(proc, {"op": "report"})
        self.pump(until=time.time() + 120, want=lambda: self._all("result"))

    def _drained(self) -> bool:
        self._reroute_orphans()  # an instance that died while the others drain leaves its requests to them
        return self._all("drained")

    def _all(self, what: str) -> bool:
        procs = [p for p in self.procs.values() if p.alive and (p.ended or what != "drained")]
        return all(p.drained if what == "drained" else p.result is not None for p in procs)

    def stop(self) -> None:
        """Every instance process ends: those that reported get a moment to exit, the rest are killed (their whole
        process group). Never raises for a process that is already gone."""
        for proc in self.procs.values():
            if proc.popen.poll() is None and proc.result is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=5)
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=10)




def cluster_replay(spec: ClusterSpec) -> ClusterResult:
    checked = check(spec)
    cluster, wall_s = run_cluster(checked)
    return _result(cluster, checked, wall_s)


def run_cluster(checked: Checked) -> tuple[Cluster, float]:
    """The executed run of a checked spec: what it needs created (namespaces, the shm pool), the instances started,
    the requests dispatched, and everything removed again however the run ends. The cluster (with the instances'
    own reports) and the wall seconds it took."""
    spec = checked.spec
    if checked.namespaces:
        cleanup_stale()
    cleanup_stale_pools()
    cluster = Cluster(checked)
    if not checked.namespaces and spec.namespaces is None and spec.transport == "tcp":
        cluster.notes.append("not root: instances on loopback TCP, rate paced by the transport (network namespaces "
                             "with tbf-shaped veth links need root)")
    started = time.time()
    with terminate_raises():
        try:
            if spec.transport == "shm" and spec.sharing == "p2p":  # (without sharing nothing crosses it)
                cluster.pool = ShmPool.create(cluster.n, spec.block_kib * 1024, spec.shm_node)
                cluster.notes.append(_pool_note(cluster.pool))
            if spec.transport == "mooncake" and spec.sharing == "p2p":
                cluster.notes.append(MOONCAKE_VETH_NOTE if cluster.mesh is not None else MOONCAKE_NOTE)
            if cluster.mesh is not None:
                cluster.mesh.create()
            cluster.start()
            cluster.dispatch()
            cluster.finish()
        finally:
            try:
                cluster.stop()
            finally:
                try:
                    if cluster.mesh is not None:
                        cluster.mesh.destroy()
                finally:
                    if cluster.pool is not None:
                        cluster.pool.close()
                        shm_remove(cluster.pool.spec.path)
    return cluster, time.time() - started


MOONCAKE_NOTE = ("transport mooncake: payloads move by Mooncake's Transfer Engine (TCP transport, P2P handshake) over "
                 "loopback, unshaped; the link's latency, rate, jitter and loss are applied by the transport on the "
                 "holder's copy into its registered staging slot and on the control reply")
MOONCAKE_VETH_NOTE = ("transport mooncake: payloads move by Mooncake's Transfer Engine (TCP transport, P2P handshake; "
                      "one engine per link address) across the tbf-shaped veth links, which shape their rate; "
                      "latency, jitter and loss are applied by the transport on the control reply")


def _pool_note(pool: ShmPool) -> str:
    node = pool.spec.node
    memory = ("a CPU-less memory node" if pool_backing(node) == "cpuless" else
              "emulated: a node with CPUs (DRAM) stands in for CXL memory")
    return (f"transport shm: blocks cross a {pool.spec.nbytes / 2**20:.1f} MiB shared pool in {pool.spec.path} bound "
            f"to node {node} ({memory}); the kernel reports {pool.placement().describe()}; control messages on "
            "loopback TCP, rate paced by the transport")


def _result(cluster: Cluster, c: Checked, wall_s: float) -> ClusterResult:
    results = [p.result for p in cluster.procs.values() if p.result is not None]
    rows = []
    ttft_by_instance: dict[int, list[float]] = {}
    for p in cluster.procs.values():
        ttft_by_instance.setdefault(p.me, []).extend(cluster.ttft[i] for i in p.done if i in cluster.ttft)
    for r in results:
        me = r["me"]
        pd_figures = {} if c.spec.pd is None else {
            "role": r["role"], "decoded": r["decoded"], "decode_steps": r["decode_steps"], "pd_handed": r["pd_handed"],
            "pd_local": r["pd_local"], "pd_recomputed": r["pd_recomputed"], "pd_bytes": r["pd_bytes"],
            "tpot_ms": Percentiles.of(r["tpot_ms"]) if r["tpot_ms"] else None,
            "handoff_ms": Percentiles.of(r["handoff_ms"]) if r["handoff_ms"] else None}
        rows.append(InstanceRow(
            instance=me, requests=r["requests"], local=r["local"], peer=r["peer"], miss=r["miss"],
            ttft_ms=Percentiles.of(ttft_by_instance.get(me, [])), peer_bytes=r["peer_bytes"],
            served_bytes=r["served_bytes"], pulls=r["pulls"], pulls_failed=r["pulls_failed"], stale_misses=r["stale"],
            corrupted_blocks=r["corrupted"], resyncs=r["resyncs"], events_sent=r["events_sent"],
            events_dropped=r["events_dropped"], blocks_checked=r["blocks_checked"], incarnation=r["incarnation"],
            events_reordered=r["events_reordered"], out_of_order=r["out_of_order"], late_ignored=r["late_ignored"],
            estimates_ms=tuple((p * 1e3, m * 1e3) for p, m in r["estimates"]), **pd_figures))
    for dead in cluster.rows_dead:
        rows.append(InstanceRow(instance=dead["me"], requests=dead["requests"], local=0, peer=0, miss=0,
                                ttft_ms=Percentiles.of([]), peer_bytes=0, served_bytes=0, pulls=0, pulls_failed=0,
                                stale_misses=0, corrupted_blocks=0, resyncs=0, events_sent=0, events_dropped=0,
                                blocks_checked=0,
                                incarnation=dead["incarnation"], killed=True))
    local, peer, miss = (sum(r[k] for r in results) for k in ("local", "peer", "miss"))
    pulls = [ms for r in results for ms in r["pull_ms"]]
    errors = [abs(p - m) / m for r in results for p, m in r["estimates"] if m > 0]
    errors.sort()
    estimator_error = errors[len(errors) // 2] if errors else None
    backings = {v for r in results for v in r["backings"].values()}
    shaped = c.spec.sharing == "p2p" or c.spec.pd is not None  # the link carries pulls or hand-offs
    # The index spans the instances that share peer to peer: all of them, or with --pd the prefill instances.
    indexed = [r for r in results if r["me"] in cluster.prefill_set]
    p2p = cluster.sharing_of(cluster.prefill_set[0]) == "p2p"
    origin = "emulated" if shaped or "emulated" in backings or "shaped" in backings else "measured"
    shaping = Shaping(rate="kernel-tbf" if cluster.mesh is not None else "transport-pacing").to_json()
    shaping["rate_bucket_bytes"] = str(burst_bytes(c.link.gbps) if cluster.mesh is not None
                                       else paced_slice(c.link.gbps))
    if cluster.pool is not None:
        node = c.spec.shm_node
        shaping |= {"medium": "shm-pool", "pool_node": str(node), "pool_memory": pool_backing(node)}
    if c.spec.transport == "mooncake":
        shaping |= {"medium": "mooncake-transfer-engine-tcp-" + ("veth" if cluster.mesh is not None else "loopback")}
    completed = len(cluster.ttft)
    notes = list(cluster.notes)
    if completed < len(c.requests):
        notes.append(f"{len(c.requests) - completed} requests did not complete")
    pd: dict[str, Any] = {}
    if c.spec.pd is not None:
        tpot = [cluster.tpot[i] for i in sorted(cluster.tpot)]
        pd = {"pd": pd_label(c.spec.pd), "tpot_ms": Percentiles.of(tpot) if tpot else None,
              "pd_bytes": sum(r["pd_bytes"] for r in results),
              "handoff_ms": Percentiles.of(list(cluster.handoff.values())) if cluster.handoff else None,
              "prefill_ms": Percentiles.of(list(cluster.prefilled.values())),
              "pd_handed": sum(r["pd_handed"] for r in results), "pd_local": sum(r["pd_local"] for r in results),
              "pd_recomputed": sum(r["pd_recomputed"] for r in results)}
        notes.append(f"pd {pd['pd']}: each decode instance pulls a request's blocks from its prefill instance over "
                     f"TCP and runs min(output_length, {MAX_DECODE_STEPS}) decode steps over them (one query's "
                     "attention per step; generated tokens' KV is not appended); TTFT ends at the first step")
        if c.spec.sharing == "p2p" and not p2p:
            notes.append("sharing p2p: a single prefill instance has no peer to share with")
    return ClusterResult(
        mode=c.spec.mode, origin=origin, sharing=c.spec.sharing, index=c.spec.index, transport=c.spec.transport,
        namespaces=cluster.mesh is not None, instances_n=cluster.n, requests=len(c.requests), completed=completed,
        hit_ratio=HitRatio.of(local, peer, miss), ttft_ms=Percentiles.of(list(cluster.ttft.values())),
        peer_bytes=sum(r["peer_bytes"] for r in results), pull_ms=Percentiles.of(pulls),
        stale_misses=sum(r["stale"] for r in results), corrupted_blocks=sum(r["corrupted"] for r in results),
        estimator_error=estimator_error if estimator_error is None or math.isfinite(estimator_error) else None,
        instances=tuple(sorted(rows, key=lambda r: (r.instance, r.incarnation))), link=c.link.to_json(),
        shaping=shaping if shaped else {}, faults=tuple(f.label() for f in c.faults),
        index_stale_entries=_stale_entries(indexed, c.spec.index, len(cluster.prefill_set)),
        index_missing_entries=_missing_entries(indexed, c.spec.index, len(cluster.prefill_set)) if p2p else 0,
        pulls_failed=sum(r["pulls_failed"] for r in results),
        decisions={k: sum(r["decisions"][k] for r in results) for k in ("pull", "recompute")},
        wall_s=wall_s, notes=tuple(notes), ttft_samples_ms=tuple(cluster.ttft[i] for i in sorted(cluster.ttft)),
        **pd)


def _stale_entries(results: list[dict[str, Any]], design: str, n: int) -> int:
    """Entries, after quiescence, naming a holder for a block it does not hold (a dead holder: all its entries)."""
    held = {r["me"]: set(r["held"]) for r in results}
    stale = 0
    for r in results:
        for origin, keys in r["entries"].items():
            have = held.get(int(origin), set())
            if design == "hash":
                have = {k for k in have if r["me"] in ring_homes(k, n)}
            stale += len(set(keys) - have)
    return stale


def _missing_entries(results: list[dict[str, Any]], design: str, n: int) -> int:
    """Blocks a live instance holds that an index which should know (every other replica; for hash, the block's
    other homes) does not list, after quiescence: 0 when lost events and restarts have been healed."""
    entries = {r["me"]: {int(o): set(keys) for o, keys in r["entries"].items()} for r in results}
    missing = 0
    for r in results:
        origin = r["me"]
        for key in r["held"]:
            knowers = ring_homes(key, n) if design == "hash" else tuple(entries)
            missing += sum(1 for k in knowers if k != origin and k in entries
                           and key not in entries[k].get(origin, set()))
    return missing


def _free_port_base(n: int) -> int:
    """A base port with 10 free ports per instance above it (loopback shares one address among instances)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000 - 10 * n)
        try:
            for port in range(base, base + 10 * n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise WorkloadError("no free port range for the instances")
