"""The cluster simulator: a discrete-event simulation of 8-256 serving instances over a whole request trace.

Each instance runs continuous batching: an iteration decodes one token for every running request and spends the
rest of a token budget on prefill chunks of waiting requests, in arrival order; its duration is the serving-time
model's (servtime.py), slower-tier reads charged at their bandwidth. An iteration with no prefill is part of a decode
span computed in closed form up to the next request to finish (its time grows linearly with the context read), cut
short at an iteration boundary when new work arrives: one event per span, not one per token.

Each instance has a tiered KV cache with the demand-LRU semantics of tieremu's replay (`lru`: a miss is placed in the
fastest tier, a hit in a slower tier is promoted to it, a full tier pushes its least recently used block one tier
down, out of the last), kept as one ordered dict per tier (see `TieredLRU`; tests check it against the compiled
replay core on one instance). A request's blocks are looked up when its prefill starts: a resident block is a local
hit in its tier (its KV is read at that tier's bandwidth), a block pulled from a peer a peer hit, the rest misses
whose tokens are computed.

Routing happens at arrival (routers.py), against the instances' state then. With `sharing="p2p"` the blocks the
chosen instance lacks are pulled from the peers holding them when that is cheaper than computing them (the cost
router's estimate): bytes over the target's inbound link (one transfer at a time, latency + bytes / the lower of the
link's and the source tier's bandwidth), the prefill waiting for them to land. With `pd=(P, D)` the first P instances
only prefill and the other D only decode: after its prefill a request's KV (input tokens x bytes per token) moves to
the decode instance with the fewest decode blocks over the same kind of link. SLO-aware admission rejects at arrival.

With `serving="serial"` an instance serves the way an executed cluster instance (tieremu.cluster.instance) does:
one request at a time in arrival order, its blocks looked up when it starts, each resident block read (the fastest
tier at the model's kv_byte_s, slower ones at their read cost), each block a peer holds pulled one after the other
(latency + bytes over the link per block) when pulling them all beats computing them (or always, `pull="always"`),
the rest computed; its first token is its end (no decode). `tieremu cluster validate` compares this against the
executed cluster on the same requests and arrival times.

Every figure is `simulated`.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from tieremu.cluster.economics import Prices, economics
from tieremu.cluster.routers import Admission, InstanceLoad, Router, RouteRequest, block_tokens_of, estimate
from tieremu.cluster.servtime import ServingTimeModel
from tieremu.cluster.simulate_policy import PolicyCache, replay_settings
from tieremu.configfile import load_yaml
from tieremu.errors import ConfigError
from tieremu.numbers import Range
from tieremu.policy.registry import get_policy
from tieremu.record.origin import Origin
from tieremu.workloads.simulate import Tail, arrival_times
from tieremu.workloads.trace import MOONCAKE_BLOCK_TOKENS, Request

SHARING = ("none", "p2p")
DEFAULT_TOKEN_BUDGET = 8192  # tokens per iteration (vLLM's max_num_batched_tokens with chunked prefill)
DEFAULT_MAX_BATCH = 256  # requests in one iteration
MAX_INSTANCES = 4096
CACHES = ("auto", "replay")
SERVING = ("batch", "serial")  # continuous batching, or one request at a time (the executed instances' way)
PULLS = ("cheaper", "always")  # serial serving: pull peer-held blocks when cheaper than computing them, or always


@dataclass(frozen=True)
class SimTierSpec:
    name: str
    capacity_blocks: int | None  # None: unlimited
    read_gbps: float
    price_per_gb_hour: float = 0.0


@dataclass(frozen=True)
class Link:
    latency_us: float = 10.0
    gbps: float = 25.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_us) and 0 <= self.latency_us <= 1e7):
            raise ConfigError(f"link latency_us={self.latency_us!r} must be 0 to 1e7 microseconds")
        if not (math.isfinite(self.gbps) and 0 < self.gbps <= 1e5):
            raise ConfigError(f"link gbps={self.gbps!r} must be above 0 and at most 1e5 GB/s")


@dataclass(frozen=True)
class ClusterSpec:
    """Each instance's tiers, the link between instances, prices (for token economics)."""

    name: str
    tiers: tuple[SimTierSpec, ...]
    link: Link = Link()
    instance_price_per_hour: float | None = None  # None: no prices, no economics

    @property
    def prices(self) -> Prices | None:
        if self.instance_price_per_hour is None:
            return None
        return Prices(self.instance_price_per_hour, tuple(t.price_per_gb_hour for t in self.tiers))


def load_cluster_spec(path: str | Path) -> ClusterSpec:
    """A cluster spec file (configs/cluster/*.yaml)."""
    doc = load_yaml(path)
    name = doc.get("name", str)
    price = doc.get("instance_price_per_hour", float, None, valid=Range(0, 1e9))
    link = Link()
    if doc.has("link"):
        s = doc.section("link")
        link = Link(latency_us=s.get("latency_us", float, 10.0, valid=Range(0, 1e7)),
                    gbps=s.get("gbps", float, 25.0, valid=Range(0, 1e5, lo_closed=False)))
        s.done()
    tiers = []
    sections = doc.sections("tiers")
    # A tier map (execute mode's) where a cluster spec is wanted: say so, naming its peer tier if it has one.
    foreign = [(i, s) for i, s in enumerate(sections) if s.has("kind") or s.has("nodes")]
    if foreign:
        i, s = next(((i, s) for i, s in foreign if s.data.get("kind") == "peer"), foreign[0])
        what = "is a `kind: peer` tier" if s.data.get("kind") == "peer" else "has tier-map keys (kind, nodes)"
        raise doc.error(f"tiers[{i}]", f"{what}: this file is a tier map for --mode execute. --mode simulate takes a "
                        "cluster spec (e.g. configs/cluster/sim-hbm-dram.yaml: each instance's own tiers with "
                        "capacity_blocks and read_gbps, and a `link`); the peers are simulated by --sharing p2p over "
                        "that link, not by a peer tier")
    for s in sections:
        blocks = Range(1, 2**40, integer=True)
        tiers.append(SimTierSpec(name=s.get("name", str),
                                 capacity_blocks=s.get("capacity_blocks", int, None, valid=blocks),
                                 read_gbps=s.get("read_gbps", float, valid=Range(0, 1e5, lo_closed=False)),
                                 price_per_gb_hour=s.get("price_per_gb_hour", float, 0.0, valid=Range(0, 1e9))))
        s.done()
    doc.done()
    if not tiers:
        raise doc.error("tiers", "a cluster spec needs at least one tier")
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise doc.error("tiers", f"tier names must be unique, got {names}")
    return ClusterSpec(name=name, tiers=tuple(tiers), link=link, instance_price_per_hour=price)


@dataclass(frozen=True)
class SimSettings:
    instances: int
    router: Router
    sharing: str = "none"
    pd: tuple[int, int] | None = None  # (prefill instances, decode instances)
    slo_ms: float | None = None
    token_budget: int = DEFAULT_TOKEN_BUDGET
    max_batch: int = DEFAULT_MAX_BATCH
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    policy: str = "lru"  # each instance's cache policy (a name or label of tieremu.policy.registry)
    cache: str = "auto"  # auto: lru runs in TieredLRU, others in simulate's replay state; replay: always the latter
    serving: str = "batch"  # see SERVING and the module docstring
    pull: str = "cheaper"  # see PULLS (serial serving; batch serving pulls where the router's estimate says)
    # Serial serving: instances share the machine's CPUs (as executed instances do): each other busy instance slows
    # an instance's work by this fraction (its rate is 1 / (1 + contention x others busy); 0: independent).
    contention: float = 0.0

    def __post_init__(self) -> None:
        check_settings(self.instances, self.sharing, self.pd, self.slo_ms, self.token_budget, self.max_batch)
        if self.cache not in CACHES:
            raise ConfigError(f"cache={self.cache!r}; valid: {', '.join(CACHES)}")
        if self.serving not in SERVING:
            raise ConfigError(f"serving={self.serving!r}; valid: {', '.join(SERVING)}")
        if self.pull not in PULLS:
            raise ConfigError(f"pull={self.pull!r}; valid: {', '.join(PULLS)}")
        if self.serving == "serial" and self.pd is not None:
            raise ConfigError("serving=serial has no decode phase: it cannot split prefill and decode (pd)")
        if not (math.isfinite(self.contention) and self.contention >= 0) or (self.contention and
                                                                             self.serving != "serial"):
            raise ConfigError(f"contention={self.contention!r} must be a number >= 0, used by serving=serial only")
        if self.serving == "batch" and self.pull != "cheaper":
            raise ConfigError(f"pull={self.pull!r} needs serving=serial (batch serving pulls where the router's "
                              "estimate says)")
        get_policy(self.policy)  # an unknown or offline policy is refused here, before any work


def check_settings(instances: int, sharing: str, pd: tuple[int, int] | None, slo_ms: float | None,
                   token_budget: int = DEFAULT_TOKEN_BUDGET, max_batch: int = DEFAULT_MAX_BATCH) -> None:
    """Every setting checked before any work (the CLI calls this before reading the trace)."""
    if not (isinstance(instances, int) and 1 <= instances <= MAX_INSTANCES):
        raise ConfigError(f"instances={instances!r} must be an integer from 1 to {MAX_INSTANCES}")
    if sharing not in SHARING:
        raise ConfigError(f"sharing={sharing!r}; valid: {', '.join(SHARING)}")
    if pd is not None:
        p, d = pd
        if p < 1 or d < 1 or p + d != instances:
            raise ConfigError(f"--pd {p}:{d} must split the {instances} instances into at least one prefill and one "
                              f"decode instance (P + D = {instances}), e.g. {max(1, instances // 2)}:"
                              f"{instances - max(1, instances // 2)}")
    if slo_ms is not None and not (math.isfinite(slo_ms) and slo_ms > 0):
        raise ConfigError(f"SLO {slo_ms!r} ms must be a positive number of milliseconds")
    if token_budget < 1 or max_batch < 1:
        raise ConfigError(f"token_budget={token_budget} and max_batch={max_batch} must be at least 1")


def parse_pd(text: str) -> tuple[int, int]:
    p, sep, d = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(p), int(d)
    except ValueError:
        raise ConfigError(f"--pd {text!r} must be P:D, two integers (prefill and decode instances), e.g. 4:12") \
            from None


class TieredLRU:
    """Demand LRU over tiers (see the module docstring): tier 0 holds the most recently used blocks, tier 1 the next,
    and so on; `holders` (block -> instances) is kept up to date for the routers."""

    __slots__ = ("capacity", "holders", "owner", "tiers", "where")

    def __init__(self, capacity: Sequence[int | None], owner: int, holders: dict[int, set[int]]) -> None:
        self.capacity = list(capacity)
        self.tiers: list[OrderedDict[int, None]] = [OrderedDict() for _ in capacity]
        self.where: dict[int, int] = {}
        self.owner = owner
        self.holders = holders

    def access(self, block: int) -> int | None:
        """Reference block: returns the tier it was found in (None: a miss); it ends in tier 0."""
        found = self.where.get(block)
        if found == 0:
            self.tiers[0].move_to_end(block)
            return 0
        if found is None:
            holders = self.holders.get(block)
            if holders is None:
                holders = self.holders[block] = set()
            holders.add(self.owner)
        else:
            del self.tiers[found][block]
        self._put(block, 0)
        return found

    def serve(self, index: int, request: Request, now: float) -> tuple[list[int], list[int]]:
        """The request's references at its prefill start: the positions of its misses, and its hits per tier."""
        missing: list[int] = []
        hits = [0] * len(self.tiers)
        for position, block in enumerate(request.hash_ids):
            tier = self.access(block)
            if tier is None:
                missing.append(position)
            else:
                hits[tier] += 1
        return missing, hits

    def _put(self, block: int, tier: int) -> None:
        while True:
            members = self.tiers[tier]
            members[block] = None
            self.where[block] = tier
            cap = self.capacity[tier]
            if cap is None or len(members) <= cap:
                return
            block, _ = members.popitem(last=False)  # its least recently used goes one tier down
            tier += 1
            if tier == len(self.tiers):
                del self.where[block]
                holders = self.holders[block]
                holders.discard(self.owner)
                if not holders:
                    del self.holders[block]
                return


@dataclass(slots=True)
class _Req:
    index: int
    request: Request
    arrival: float
    instance: int = -1
    remaining_prefill: int = -1  # -1: prefill not started
    ready_at: float = 0.0  # pulls landed
    pulled: frozenset[int] = frozenset()
    remaining_out: int = 0
    context: int = 0
    first_token: float = -1.0
    finish: float = -1.0
    decoder: int = -1
    pd_bytes: int = 0


@dataclass
class _Instance:
    index: int
    kind: str  # both, prefill or decode
    cache: TieredLRU
    waiting: deque[_Req] = field(default_factory=deque)
    running: list[_Req] = field(default_factory=list)
    incoming: list[_Req] = field(default_factory=list)  # P/D: KV in flight or landed, not yet running
    queued_tokens: int = 0
    decode_blocks: int = 0
    busy: bool = False
    version: int = 0
    span: tuple[float, int, float, float] | None = None  # decode span: start, iterations, alpha, beta
    link_free: float = 0.0
    routed: int = 0
    hits: list[int] = field(default_factory=list)
    peer_hits: int = 0
    misses: int = 0
    peer_in: int = 0
    peer_out: int = 0
    pd_in: int = 0
    busy_s: float = 0.0
    iterations: int = 0
    pending: list[tuple[_Req, int]] = field(default_factory=list)  # the iteration's prefill chunks
    iter_start: float = 0.0
    work: float = 0.0  # serial serving with contention: uncontended seconds left of the request in service
    rate: float = 1.0
    updated: float = 0.0


@dataclass(frozen=True)
class ClusterResult:
    router: dict[str, object]
    policy: str
    n_instances: int
    pd: tuple[int, int] | None
    sharing: str
    requests: int
    completed: int
    rejected: int
    slo_ms: float | None
    slo_attainment: float | None  # requests served within the SLO / all requests (rejected ones count as missed)
    load_imbalance: float  # max / mean requests per (prefill-taking) instance
    ttft_ms: Tail
    tpot_ms: Tail
    hit_ratio: dict[str, object]  # local, peer, miss (shares of block references) and local per tier
    peer_bytes: int
    pd_bytes: int
    link_bytes: int
    peer_bytes_per_request: float  # mean over requests served
    pd_bytes_per_request: float  # mean over requests handed to a decode instance
    throughput_tokens_per_s: float
    cost_per_mtok: float | None
    tokens_per_dollar: float | None
    instances: tuple[dict[str, object], ...]
    servtime: dict[str, object]
    spec: str
    span_s: float
    wall_s: float
    events: int
    origin: str = Origin.SIMULATED.value

    def to_dict(self) -> dict[str, object]:
        from dataclasses import asdict

        return asdict(self)


class _View:
    """The routers' read-only view of the simulated cluster."""

    def __init__(self, sim: ClusterSim) -> None:
        self.sim = sim
        self.instances = len(sim.inst)
        self.block_tokens = sim.s.block_tokens
        self.sharing = sim.s.sharing == "p2p"

    def load(self, instance: int) -> InstanceLoad:
        i = self.sim.inst[instance]
        return InstanceLoad(len(i.waiting), i.queued_tokens, len(i.running) + len(i.incoming), i.decode_blocks)

    def holders(self, block: int) -> Collection[int]:
        return self.sim.holders.get(block, ())

    def tier_of(self, instance: int, block: int) -> int | None:
        return self.sim.inst[instance].cache.where.get(block)

    def read_s(self, instance: int, tier: int, blocks: int) -> float:
        return self.sim.read_s[tier] * blocks

    def pull_s(self, source: int, target: int, tier: int, blocks: int) -> float:
        return self.sim.link_latency_s + blocks * self.sim.pull_block_s[tier]

    def queue_s(self, instance: int) -> float:
        return self.prefill_s(instance, self.sim.inst[instance].queued_tokens) if self.sim.inst[instance].waiting \
            else 0.0

    def prefill_s(self, instance: int, tokens: int) -> float:
        """Iterations of the token budget left beside the running batch, each paying the batch's decode step."""
        i, m, s = self.sim.inst[instance], self.sim.model, self.sim.s
        running = len(i.running) + len(i.incoming)
        iterations = math.ceil(max(tokens, 1) / max(1, s.token_budget - running))
        kv_bytes = m.kv_bytes_per_token * i.decode_blocks * s.block_tokens  # the batch's context, by its blocks
        step = m.base_s + m.decode_seq_s * running + m.kv_byte_s * kv_bytes
        return tokens * m.prefill_token_s + iterations * step


class ClusterSim:
    def __init__(self, spec: ClusterSpec, settings: SimSettings, model: ServingTimeModel) -> None:
        self.spec, self.s, self.model = spec, settings, model
        self.block_bytes = model.kv_bytes_per_token * settings.block_tokens
        # A slower tier's block read: at the serving-time model's fitted cost for a tier of that name, else at the
        # read bandwidth the spec gives (the fastest tier's reads are part of the model's own terms).
        self.read_s = [0.0] + [self.block_bytes * model.tier_byte_s[t.name] if t.name in model.tier_byte_s
                               else self.block_bytes / (t.read_gbps * 1e9) for t in spec.tiers[1:]]
        self.pull_block_s = [self.block_bytes / (min(spec.link.gbps, t.read_gbps) * 1e9) for t in spec.tiers]
        self.link_latency_s = spec.link.latency_us * 1e-6
        self.link_byte_s = 1.0 / (spec.link.gbps * 1e9)
        self.holders: dict[int, set[int]] = {}
        capacity = [t.capacity_blocks for t in spec.tiers]
        n = settings.instances
        kinds = ["both"] * n if settings.pd is None else \
            ["prefill"] * settings.pd[0] + ["decode"] * settings.pd[1]
        self.inst = [_Instance(i, kinds[i], self._cache(capacity, i), hits=[0] * len(capacity)) for i in range(n)]
        self.eligible = [i for i in range(n) if kinds[i] != "decode"]
        self.decoders = [i for i in range(n) if kinds[i] == "decode"]
        self.view = _View(self)
        self.events: list[tuple[float, int, int, int, int]] = []  # time, seq, kind, instance, version
        self.seq = 0
        self.count = 0
        self.reqs: list[_Req] = []  # after run(): every request, with its simulated times

    def _cache(self, capacity: list[int | None], owner: int) -> TieredLRU | PolicyCache:
        if self.s.policy == "lru" and self.s.cache == "auto":
            return TieredLRU(capacity, owner, self.holders)
        policy = get_policy(self.s.policy)
        settings = replay_settings([t.name for t in self.spec.tiers], capacity,
                                   [t.read_gbps for t in self.spec.tiers], self.block_bytes, self.s.block_tokens,
                                   1.0 / self.model.prefill_token_s if self.model.prefill_token_s else 1e12, policy)
        return PolicyCache(settings, policy, owner, self.holders)

    # -- events -------------------------------------------------------------------------------------------------
    def _push(self, at: float, kind: int, instance: int, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, instance, version))

    def run(self, requests: Sequence[Request], arrivals: Sequence[float] | None = None) -> ClusterResult:
        """Simulate the requests, arriving at `arrivals` (seconds, non-decreasing; default: from their timestamps).
        Each request's state stays in `self.reqs` (per-request comparisons)."""
        started = time.perf_counter()
        if arrivals is None:
            arrivals = arrival_times(requests)
        elif len(arrivals) != len(requests) or any(b < a for a, b in pairwise(arrivals)):
            raise ConfigError(f"{len(arrivals)} arrival times for {len(requests)} requests: give one per request, "
                              "in non-decreasing order")
        arrivals = list(arrivals)
        reqs = self.reqs = [_Req(i, r, a) for i, (r, a) in enumerate(zip(requests, arrivals, strict=True))]
        admission = Admission(self.s.slo_ms) if self.s.slo_ms is not None else None
        next_arrival = 0
        n = len(reqs)
        while next_arrival < n or self.events:
            if next_arrival < n and (not self.events or reqs[next_arrival].arrival <= self.events[0][0]):
                req = reqs[next_arrival]
                next_arrival += 1
                self._arrive(req, admission)
                continue
            at, _, kind, index, version = heapq.heappop(self.events)
            self.count += 1
            inst = self.inst[index]
            if kind == 0:  # an iteration (or a decode span) ended
                if version == inst.version:
                    self._iteration_end(inst, at)
            else:  # pulls or a KV handoff landed: there may be work
                self._kick(inst, at)
        return self._result(reqs, admission, arrivals, time.perf_counter() - started)

    def _arrive(self, req: _Req, admission: Admission | None) -> None:
        now = req.arrival
        r = req.request
        route = RouteRequest(r.hash_ids, r.input_length, r.output_length)
        choice = self.s.router.route(route, self.view, self.eligible)
        predicted = estimate(self.view, route, choice)
        if admission is not None and not admission.admit(predicted):
            return
        inst = self.inst[choice]
        inst.routed += 1
        req.instance = choice
        req.ready_at = now
        if predicted.pulled_blocks and self.s.serving == "batch":
            pulled: set[int] = set()
            for source, tier, blocks in predicted.pull_from:
                nbytes = blocks * self.block_bytes
                inst.link_free = max(now, inst.link_free) + blocks * self.pull_block_s[tier]
                req.ready_at = max(req.ready_at, inst.link_free + self.link_latency_s)
                inst.peer_in += nbytes
                self.inst[source].peer_out += nbytes
            for block in r.hash_ids:
                if inst.cache.where.get(block) is None and self.holders.get(block):
                    pulled.add(block)
            req.pulled = frozenset(pulled)
            self._push(req.ready_at, 1, choice)
        inst.waiting.append(req)
        inst.queued_tokens += r.input_length
        self._kick(inst, now)

    def _kick(self, inst: _Instance, now: float) -> None:
        """New work for inst: start an iteration if idle; cut a decode span short at its next iteration boundary."""
        if not inst.busy:
            self._start(inst, now)
            if self.s.contention and inst.busy:
                self._contend(now)
            return
        if inst.span is None:
            return
        t0, k, alpha, beta = inst.span
        done = _iterations_by(now - t0, alpha, beta, k)
        if done + 1 < k:
            k = done + 1
            inst.span = (t0, k, alpha, beta)
            inst.version += 1
            self._push(t0 + _span_s(k, alpha, beta), 0, inst.index, inst.version)

    def _start(self, inst: _Instance, now: float) -> None:
        if self.s.serving == "serial":
            self._start_serial(inst, now)
            return
        m, s = self.model, self.s
        if inst.incoming:
            landed = [q for q in inst.incoming if q.ready_at <= now]
            if landed:
                inst.incoming = [q for q in inst.incoming if q.ready_at > now]
                inst.running.extend(landed)
        budget = s.token_budget - len(inst.running)
        room = s.max_batch - len(inst.running)
        chunks: list[tuple[_Req, int]] = []
        slow_s = 0.0
        if inst.kind != "decode":
            for req in inst.waiting:
                if budget <= 0 or room <= 0:
                    break
                if req.ready_at > now:
                    continue
                if req.remaining_prefill < 0:
                    slow_s += self._lookup(inst, req, now)
                take = min(budget, req.remaining_prefill)
                chunks.append((req, take))
                budget -= take
                room -= 1
        if not chunks and not inst.running:
            inst.busy = False
            return
        inst.busy = True
        bpt = m.kv_bytes_per_token
        contexts = sum(q.context for q in inst.running)
        if not chunks:  # a decode span up to the first request to finish
            b = len(inst.running)
            k = min(q.remaining_out for q in inst.running)
            alpha = m.base_s + m.decode_seq_s * b + m.kv_byte_s * bpt * contexts
            beta = m.kv_byte_s * bpt * b
            inst.span = (now, k, alpha, beta)
            inst.version += 1
            self._push(now + _span_s(k, alpha, beta), 0, inst.index, inst.version)
            return
        inst.span = None
        tokens = sum(t for _, t in chunks)
        for req, take in chunks:
            req.remaining_prefill -= take
            inst.queued_tokens -= take
        inst.pending = chunks
        seconds = m.iteration_s(tokens, len(inst.running), bpt * contexts, slow_s)
        inst.version += 1
        inst.iter_start = now
        self._push(now + seconds, 0, inst.index, inst.version)

    def _start_serial(self, inst: _Instance, now: float) -> None:
        """Serial serving (see the module docstring): the next waiting request, whole, as one iteration."""
        if not inst.waiting:
            inst.busy = False
            return
        req = inst.waiting.popleft()
        r, m = req.request, self.model
        # Peers holding a block this instance lacks, looked up before its own lookup makes it a holder.
        source: dict[int, int] = {}
        for block in r.hash_ids:
            if block not in source and inst.cache.where.get(block) is None:
                holders = [h for h in self.holders.get(block, ()) if h != inst.index]
                if holders:
                    source[block] = min(holders)
        missing, hits = inst.cache.serve(req.index, r, now)
        read = hits[0] * self.block_bytes * m.kv_byte_s + math.fsum(
            self.read_s[t] * count for t, count in enumerate(hits) if t)
        for tier, count in enumerate(hits):
            inst.hits[tier] += count
        tokens_of = block_tokens_of(RouteRequest(r.hash_ids, r.input_length, 0), self.s.block_tokens)
        pullable = [p for p in missing if r.hash_ids[p] in source]
        pull_s = math.fsum(self.link_latency_s + self.pull_block_s[self._tier_at(source[r.hash_ids[p]], r.hash_ids[p])]
                           for p in pullable)
        pull_tokens = sum(tokens_of[p] for p in pullable)
        if pullable and self.s.sharing == "p2p" and (self.s.pull == "always"
                                                      or pull_s < pull_tokens * m.prefill_token_s):
            pulled = set(pullable)
            for p in pullable:
                self.inst[source[r.hash_ids[p]]].peer_out += self.block_bytes
            inst.peer_in += self.block_bytes * len(pullable)
            inst.peer_hits += len(pullable)
        else:
            pulled, pull_s = set(), 0.0
        computed = max(0, r.input_length - len(r.hash_ids) * self.s.block_tokens)
        for p in missing:
            if p not in pulled:
                inst.misses += 1
                computed += tokens_of[p]
        inst.queued_tokens -= r.input_length
        inst.busy, inst.span, inst.iter_start = True, None, now
        inst.pending = [(req, 0)]
        work = m.base_s + read + pull_s + max(1, computed) * m.prefill_token_s
        if self.s.contention:
            inst.work, inst.updated = work, now  # _contend schedules its end
            return
        inst.version += 1
        self._push(now + work, 0, inst.index, inst.version)

    def _contend(self, now: float) -> None:
        """Serial serving with contention: the busy instances' work done so far at their old rate, their ends
        rescheduled at the rate the new number of busy instances gives."""
        busy = [i for i in self.inst if i.busy]
        rate = 1.0 / (1.0 + self.s.contention * (len(busy) - 1)) if busy else 1.0
        for i in busy:
            i.work = max(0.0, i.work - (now - i.updated) * i.rate)
            i.updated, i.rate = now, rate
            i.version += 1
            self._push(now + i.work / rate, 0, i.index, i.version)

    def _tier_at(self, instance: int, block: int) -> int:
        return self.inst[instance].cache.where.get(block, 0)

    def _lookup(self, inst: _Instance, req: _Req, now: float) -> float:
        """The request's blocks at its prefill start: hits by tier, peer hits, misses; returns the slower tiers' read
        time. A block missing locally that was pulled for the request is a peer hit, its tokens not computed."""
        r = req.request
        computed = max(0, r.input_length - len(r.hash_ids) * self.s.block_tokens)
        missing, hits = inst.cache.serve(req.index, r, now)
        slow = 0.0
        for tier, count in enumerate(hits):
            inst.hits[tier] += count
            slow += self.read_s[tier] * count
        tokens_of = block_tokens_of(RouteRequest(r.hash_ids, r.input_length, 0), self.s.block_tokens)
        pulled = req.pulled
        for position in missing:
            if r.hash_ids[position] in pulled:
                inst.peer_hits += 1
            else:
                inst.misses += 1
                computed += tokens_of[position]
        # At least one token is computed: it gives the first output token.
        req.remaining_prefill = max(1, computed)
        inst.queued_tokens += req.remaining_prefill - r.input_length
        return slow

    def _iteration_end(self, inst: _Instance, now: float) -> None:
        inst.iterations += 1
        if self.s.serving == "serial":  # the request's first token is its end
            inst.busy_s += now - inst.iter_start
            for req, _ in inst.pending:
                req.first_token = req.finish = now
            inst.pending = []
            self._start(inst, now)
            if self.s.contention:
                self._contend(now)
            return
        if inst.span is not None:
            t0, k, _, _ = inst.span
            inst.busy_s += now - t0
            inst.span = None
            finished = []
            for q in inst.running:
                q.remaining_out -= k
                q.context += k
                if q.remaining_out <= 0:
                    finished.append(q)
            self._finish(inst, finished, now)
            self._start(inst, now)
            return
        inst.busy_s += now - inst.iter_start
        finished = []
        for q in inst.running:  # each running request got one token
            q.remaining_out -= 1
            q.context += 1
            if q.remaining_out <= 0:
                finished.append(q)
        self._finish(inst, finished, now)
        for req, _ in inst.pending:
            if req.remaining_prefill > 0:
                continue
            inst.waiting.remove(req)
            req.first_token = now
            req.remaining_out = req.request.output_length - 1
            req.context = req.request.input_length + 1
            if req.remaining_out <= 0:
                req.finish = now
                continue
            if inst.kind == "prefill":
                self._hand_off(inst, req, now)
            else:
                inst.running.append(req)
                inst.decode_blocks += len(req.request.hash_ids) + 1
        inst.pending = []
        self._start(inst, now)

    def _finish(self, inst: _Instance, finished: list[_Req], now: float) -> None:
        if not finished:
            return
        for q in finished:
            q.finish = now
            inst.decode_blocks -= len(q.request.hash_ids) + 1
        done = set(id(q) for q in finished)
        inst.running = [q for q in inst.running if id(q) not in done]

    def _hand_off(self, source: _Instance, req: _Req, now: float) -> None:
        """P/D: the request's KV moves to the decode instance with the fewest decode blocks."""
        target = min(self.decoders, key=lambda i: (self.inst[i].decode_blocks, i))
        dst = self.inst[target]
        nbytes = req.request.input_length * self.model.kv_bytes_per_token
        dst.link_free = max(now, dst.link_free) + nbytes * self.link_byte_s
        req.ready_at = dst.link_free + self.link_latency_s
        req.decoder = target
        req.pd_bytes = nbytes
        dst.pd_in += nbytes
        dst.incoming.append(req)
        dst.decode_blocks += len(req.request.hash_ids) + 1
        self._push(req.ready_at, 1, target)

    # -- the result ---------------------------------------------------------------------------------------------
    def _result(self, reqs: list[_Req], admission: Admission | None, arrivals: list[float],
                wall_s: float) -> ClusterResult:
        served = [q for q in reqs if q.instance >= 0]
        ttft = [(q.first_token - q.arrival) * 1e3 for q in served if q.first_token >= 0]
        tpot = [(q.finish - q.first_token) * 1e3 / (q.request.output_length - 1) for q in served
                if q.finish >= 0 and q.request.output_length > 1]
        completed = sum(1 for q in served if q.finish >= 0)
        rejected = admission.rejected if admission else 0
        attainment = None
        if self.s.slo_ms is not None:
            attainment = sum(1 for t in ttft if t <= self.s.slo_ms) / len(reqs) if reqs else 0.0
        routed = [self.inst[i].routed for i in self.eligible]
        mean = sum(routed) / len(routed)
        local = [sum(i.hits[t] for i in self.inst) for t in range(len(self.spec.tiers))]
        peer = sum(i.peer_hits for i in self.inst)
        miss = sum(i.misses for i in self.inst)
        refs = sum(local) + peer + miss
        peer_bytes = sum(i.peer_in for i in self.inst)
        pd_bytes = sum(i.pd_in for i in self.inst)
        end = max([q.finish for q in served if q.finish >= 0], default=arrivals[-1] if arrivals else 0.0)
        span = max(end - (arrivals[0] if arrivals else 0.0), 1e-9)
        tokens = sum(q.request.input_length + q.request.output_length for q in served if q.finish >= 0)
        cost_per_mtok = per_dollar = None
        if (prices := self.spec.prices) is not None:
            eco = economics(prices, instances=len(self.inst), span_s=span, tokens=tokens,
                            tier_bytes=[(t.capacity_blocks or 0) * self.block_bytes for t in self.spec.tiers])
            cost_per_mtok, per_dollar = eco.cost_per_mtok, eco.tokens_per_dollar
        rows = tuple({"instance": i.index, "kind": i.kind, "requests": i.routed, "iterations": i.iterations,
                      "busy_s": i.busy_s, "hits": dict(zip((t.name for t in self.spec.tiers), i.hits, strict=True)),
                      "peer_hits": i.peer_hits, "misses": i.misses, "peer_bytes_in": i.peer_in,
                      "peer_bytes_out": i.peer_out, "pd_bytes_in": i.pd_in} for i in self.inst)
        return ClusterResult(
            router=self.s.router.describe(), policy=self.s.policy, n_instances=len(self.inst), pd=self.s.pd,
            sharing=self.s.sharing,
            requests=len(reqs), completed=completed, rejected=rejected, slo_ms=self.s.slo_ms,
            slo_attainment=attainment, load_imbalance=max(routed) / mean if mean else 0.0,
            ttft_ms=Tail.of(ttft), tpot_ms=Tail.of(tpot),
            hit_ratio={"local": _share(refs, sum(local)), "peer": _share(refs, peer), "miss": _share(refs, miss),
                       "by_tier": {t.name: _share(refs, h) for t, h in zip(self.spec.tiers, local, strict=True)}},
            peer_bytes=peer_bytes, pd_bytes=pd_bytes, link_bytes=peer_bytes + pd_bytes,
            peer_bytes_per_request=peer_bytes / len(served) if served else 0.0,
            pd_bytes_per_request=pd_bytes / handed if (handed := sum(1 for q in served if q.decoder >= 0)) else 0.0,
            throughput_tokens_per_s=tokens / span, cost_per_mtok=cost_per_mtok, tokens_per_dollar=per_dollar,
            instances=rows,
            servtime={"name": self.model.name, "origin": self.model.origin,
                      "fit": None if self.model.fit is None else vars(self.model.fit)},
            spec=self.spec.name, span_s=span, wall_s=wall_s, events=self.count)


def _share(total: int, part: int) -> float:
    return part / total if total else 0.0


def _span_s(k: int, alpha: float, beta: float) -> float:
    """Time of k decode iterations whose m-th (from 0) takes alpha + beta * m."""
    return k * alpha + beta * k * (k - 1) / 2


def _iterations_by(elapsed: float, alpha: float, beta: float, k: int) -> int:
    """Iterations of a span completed `elapsed` after its start (at most k)."""
    if elapsed <= 0:
        return 0
    if beta <= 0:
        j = int(elapsed / alpha) if alpha > 0 else k
    else:  # the root of beta/2 j^2 + (alpha - beta/2) j - elapsed = 0
        a, b = beta / 2, alpha - beta / 2
        j = int((-b + math.sqrt(b * b + 4 * a * elapsed)) / (2 * a))
    j = max(0, min(j, k))
    while j > 0 and _span_s(j, alpha, beta) > elapsed:
        j -= 1
    while j < k and _span_s(j + 1, alpha, beta) <= elapsed:
        j += 1
    return j


def simulate_cluster(requests: Sequence[Request], spec: ClusterSpec, settings: SimSettings,
                     model: ServingTimeModel, arrivals: Sequence[float] | None = None) -> ClusterResult:
    """Simulate the cluster over the requests; see the module docstring."""
    if not requests:
        raise ConfigError("the trace holds no requests")
    return ClusterSim(spec, settings, model).run(requests, arrivals)
