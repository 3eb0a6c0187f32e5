"""Request routers across serving instances, behind one interface and chosen by name (as policies are).

A router sees a request (its prefix-block hash ids and lengths) and a read-only view of the cluster: each instance's
queue and running batch, which blocks each instance holds and in which tier, the link cost between instances and a
serving-time estimate. The cluster simulator (simulate.py) drives them; the executed cluster can give them the same
view. Routers never change the view.

- `round-robin`: instances in turn.
- `least-loaded`: fewest outstanding requests (queued + running), then least queued prefill work.
- `prefix`: prefix affinity (SGLang's cache-aware router): the instance holding the longest resident prefix of the
  request, unless the load spread (max - min outstanding requests) exceeds `load_threshold`, or the best match is
  below `min_match` of the request's blocks: then least-loaded.
- `cost`: Mooncake's Conductor (FAST'25, Algorithm 1): per instance, the predicted TTFT = queue time + the time to
  read its own resident blocks tier by tier + either the pull of the blocks it lacks from the peers that hold them
  (link latency + bytes over the lower of the link's and the source tier's bandwidth, peer by peer) or their prefill,
  whichever is cheaper + prefill of what is left; the lowest wins.
- `weighted`: Dynamo's KV router: `overlap_weight * potential prefill blocks + potential decode blocks`, lowest wins.

SLO-aware admission (`Admission`) rejects a request whose predicted TTFT on the chosen instance exceeds the SLO.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from tieremu.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RouteRequest:
    hash_ids: tuple[int, ...]
    input_length: int
    output_length: int


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    queued: int  # requests waiting for (or in) prefill
    queued_prefill_tokens: int  # prefill tokens still to compute for them
    running: int  # requests in the decode batch
    decode_blocks: int  # KV blocks the running batch holds


class ClusterView(Protocol):
    """What a router may read. Instances are 0..n-1; tiers are ranks, 0 the fastest."""

    @property
    def instances(self) -> int: ...

    @property
    def block_tokens(self) -> int: ...

    @property
    def sharing(self) -> bool:
        """Whether a block may be pulled from a peer (p2p) or only used where it is resident."""

    def load(self, instance: int) -> InstanceLoad: ...

    def holders(self, block: int) -> Collection[int]:
        """The instances holding block, in any tier."""

    def tier_of(self, instance: int, block: int) -> int | None: ...

    def read_s(self, instance: int, tier: int, blocks: int) -> float:
        """Time to read `blocks` blocks from that instance's tier into its compute (0 for the fastest tier)."""

    def pull_s(self, source: int, target: int, tier: int, blocks: int) -> float:
        """Time to pull `blocks` blocks held in `tier` of `source` into `target` over their link."""

    def queue_s(self, instance: int) -> float:
        """Predicted wait before a new request's prefill starts there."""

    def prefill_s(self, instance: int, tokens: int) -> float:
        """Predicted time to prefill `tokens` tokens there (beside its running batch)."""


@dataclass(frozen=True, slots=True)
class Match:
    """What one instance holds of a request: the leading resident blocks and every resident block, by tier."""

    prefix: int  # leading blocks resident
    resident: int  # blocks resident anywhere in its tiers
    by_tier: tuple[int, ...]  # resident blocks per tier rank (index = rank)


def matches(view: ClusterView, hash_ids: Sequence[int]) -> dict[int, Match]:
    """Per instance holding at least one block of the request, what it holds (O(sum of holders), not O(instances))."""
    prefix: dict[int, int] = {}
    counts: dict[int, list[int]] = {}
    alive: set[int] | None = None
    for position, block in enumerate(hash_ids):
        holders = view.holders(block)
        for i in holders:
            tier = view.tier_of(i, block)
            if tier is None:
                continue
            row = counts.get(i)
            if row is None:
                row = counts[i] = []
            while len(row) <= tier:
                row.append(0)
            row[tier] += 1
        if alive is None:
            alive = set(holders)
            for i in alive:
                prefix[i] = 1
        elif alive:
            alive &= set(holders)
            for i in alive:
                prefix[i] = position + 1
    return {i: Match(prefix.get(i, 0), sum(row), tuple(row)) for i, row in counts.items()}


def block_tokens_of(request: RouteRequest, block_tokens: int) -> list[int]:
    n = len(request.hash_ids)
    if n == 0:
        return []
    last = request.input_length - (n - 1) * block_tokens
    if not 0 < last <= block_tokens:
        last = block_tokens
    return [block_tokens] * (n - 1) + [last]


@dataclass(frozen=True, slots=True)
class Estimate:
    """A predicted TTFT on one instance, and its parts."""

    instance: int
    queue_s: float
    read_s: float  # local resident blocks, tier by tier
    pull_s: float  # blocks pulled from peers (0 when recomputing is cheaper or sharing is off)
    prefill_s: float  # tokens computed
    pulled_blocks: int
    pull_from: tuple[tuple[int, int, int], ...]  # (source instance, source tier, blocks)

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.read_s + self.pull_s + self.prefill_s


def estimate(view: ClusterView, request: RouteRequest, instance: int,
             found: Mapping[int, Match] | None = None) -> Estimate:
    """Mooncake's TTFT prediction for `request` on `instance`: queue + local reads + min(pull, recompute) of the
    blocks it lacks + prefill. A lacking block is pulled from the holder with the cheapest pull (peer by peer, tier
    by tier) when sharing is on and the pull is cheaper than computing its tokens."""
    tokens = block_tokens_of(request, view.block_tokens)
    own_by_tier: dict[int, int] = {}
    sources: dict[tuple[int, int], int] = {}  # (peer, tier) -> blocks to pull
    missing_tokens = max(0, request.input_length - sum(tokens))  # tokens beyond the hashed blocks
    for block, n_tokens in zip(request.hash_ids, tokens, strict=True):
        tier = view.tier_of(instance, block)
        if tier is not None:
            own_by_tier[tier] = own_by_tier.get(tier, 0) + 1
            continue
        best: tuple[float, int, int] | None = None
        if view.sharing:
            for peer in view.holders(block):
                if peer == instance:
                    continue
                t = view.tier_of(peer, block)
                if t is None:
                    continue
                cost = view.pull_s(peer, instance, t, 1)
                if best is None or (cost, peer, t) < best:
                    best = (cost, peer, t)
        if best is not None:
            sources[(best[1], best[2])] = sources.get((best[1], best[2]), 0) + 1
            missing_tokens += n_tokens  # provisional: decided below
            continue
        missing_tokens += n_tokens
    read = math.fsum(view.read_s(instance, t, k) for t, k in sorted(own_by_tier.items()))
    pulled = sum(sources.values())
    pull = math.fsum(view.pull_s(peer, instance, t, k) for (peer, t), k in sorted(sources.items()))
    pulled_tokens = pulled * view.block_tokens
    recompute = view.prefill_s(instance, missing_tokens)
    with_pull = pull + view.prefill_s(instance, max(0, missing_tokens - pulled_tokens))
    if pulled and with_pull < recompute:
        return Estimate(instance, view.queue_s(instance), read, pull, with_pull - pull, pulled,
                        tuple((peer, t, k) for (peer, t), k in sorted(sources.items())))
    return Estimate(instance, view.queue_s(instance), read, 0.0, recompute, 0, ())


class Router(ABC):
    """Picks the instance (out of `eligible`) that serves a request's prefill."""

    name: ClassVar[str]
    params: ClassVar[dict[str, tuple[type, float, float]]] = {}  # name -> (type, lowest, highest) accepted

    @abstractmethod
    def route(self, request: RouteRequest, view: ClusterView, eligible: Sequence[int]) -> int: ...

    def describe(self) -> dict[str, object]:
        return {"router": self.name, **{k: getattr(self, k) for k in self.params}}


def _outstanding(load: InstanceLoad) -> int:
    return load.queued + load.running


def least_loaded(view: ClusterView, eligible: Sequence[int]) -> int:
    """Fewest outstanding requests, then least queued prefill work, then the lowest index."""
    best, key = eligible[0], None
    for i in eligible:
        load = view.load(i)
        k = (_outstanding(load), load.queued_prefill_tokens, i)
        if key is None or k < key:
            best, key = i, k
    return best


class RoundRobin(Router):
    name = "round-robin"

    def __init__(self) -> None:
        self.turn = 0

    def route(self, request: RouteRequest, view: ClusterView, eligible: Sequence[int]) -> int:
        choice = eligible[self.turn % len(eligible)]
        self.turn += 1
        return choice


class LeastLoaded(Router):
    name = "least-loaded"

    def route(self, request: RouteRequest, view: ClusterView, eligible: Sequence[int]) -> int:
        return least_loaded(view, eligible)


class PrefixAffinity(Router):
    name = "prefix"
    params: ClassVar[dict[str, tuple[type, float, float]]] = {"load_threshold": (int, 0, 1 << 30),
                                                              "min_match": (float, 0.0, 1.0)}

    def __init__(self, load_threshold: int = 8, min_match: float = 0.0) -> None:
        self.load_threshold = load_threshold
        self.min_match = min_match

    def route(self, request: RouteRequest, view: ClusterView, eligible: Sequence[int]) -> int:
        loads = {i: _outstanding(view.load(i)) for i in eligible}
        if max(loads.values()) - min(loads.values()) > self.load_threshold:
            return least_loaded(view, eligible)  # too unbalanced: balance first (SGLang's balance_abs_threshold)
        found = matches(view, request.hash_ids)
        best, key = None, None
        for i in eligible:
            m = found.get(i)
            if m is None or m.prefix == 0:
                continue
            k = (-m.prefix, loads[i], i)
            if key is None or k < key:
                best, key = i, k
        n = len(request.hash_ids)
        if best is None or (n and -key[0] / n < self.min_match):  # type: ignore[index]
            return least_loaded(view, eligible)
        return best


class CostRouter(Router):
    """Every instance holding a block of the request is estimated in full; of the others (which differ only by
    their queue and batch, and by links, alike in the simulator) the one whose queue + full prefill is shortest."""

    name = "cost"

    def route(self, request: RouteRequest, view: ClusterView, eligible: Sequence[int]) -> int:
        found = matches(view, request.hash_ids)
        candidates = [i for i in eligible if i in found]
        others = [i for i in eligible if i not in found]
        if others:
            candidates.append(min(others, key=lambda i: (view.queue_s(i) + view.prefill_s(i, request.input_length),
                                                          i)))
        return min((estimate(view, request, i).ttft_s, i) for i in candidates)[1]


class WeightedBlocks(Router):
    name = "weighted"
    params: ClassVar[dict[str, tuple[type, float, float]]] = {"overlap_weight": (float, 0.0, 1e6)}

    def __init__(self, overlap_weight: float = 1.0) -> None:
        self.overlap_weight = overlap_weight

    def route(self, request: RouteRequest, view: ClusterView, eligible: Sequence[int]) -> int:
        found = matches(view, request.hash_ids)
        per_block = view.block_tokens
        n = len(request.hash_ids)
        best, key = eligible[0], None
        for i in eligible:
            load = view.load(i)
            m = found.get(i)
            prefill_blocks = math.ceil(load.queued_prefill_tokens / per_block) + n - (m.prefix if m else 0)
            decode_blocks = load.decode_blocks + n
            k = (self.overlap_weight * prefill_blocks + decode_blocks, i)
            if key is None or k < key:
                best, key = i, k
        return best


ROUTERS: dict[str, type[Router]] = {r.name: r for r in (RoundRobin, LeastLoaded, PrefixAffinity, CostRouter,
                                                        WeightedBlocks)}


def make_router(name: str, params: Mapping[str, object] | None = None) -> Router:
    """The router called name with its parameters; ConfigError naming the valid names, parameters and ranges."""
    cls = ROUTERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown router {name!r}; valid routers: {', '.join(ROUTERS)}")
    kwargs: dict[str, object] = {}
    for key, raw in (params or {}).items():
        if key not in cls.params:
            valid = ", ".join(cls.params) or "none"
            raise ConfigError(f"router {name}: unknown parameter {key!r}; its parameters: {valid}")
        kind, low, high = cls.params[key]
        value = _number(name, key, raw, kind)
        if not low <= value <= high:
            raise ConfigError(f"router {name}: {key}={raw!r} is out of range; valid: {low} to {high}")
        kwargs[key] = value
    return cls(**kwargs)  # type: ignore[arg-type]


def _number(router: str, key: str, raw: object, kind: type) -> float:
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(raw, bool):
            raise ValueError
        number = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"router {router}: {key}={raw!r} is not {what}") from None
    if not math.isfinite(number) or (kind is int and number != int(number)):
        raise ConfigError(f"router {router}: {key}={raw!r} is not {what}")
    return int(number) if kind is int else number


def parse_router(spec: str) -> Router:
    """`NAME` or `NAME:key=value,key=value` (e.g. `prefix:load_threshold=4`)."""
    name, _, rest = spec.partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"router {spec!r}: parameter {item!r} must be key=value")
        params[key.strip()] = value.strip()
    return make_router(name.strip(), params)


@dataclass
class Admission:
    """SLO-aware admission: a request whose predicted TTFT on its chosen instance exceeds `slo_ms` is rejected."""

    slo_ms: float
    rejected: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.slo_ms, int | float) and math.isfinite(self.slo_ms) and self.slo_ms > 0):
            raise ConfigError(f"SLO {self.slo_ms!r} ms must be a positive number of milliseconds")

    def admit(self, predicted: Estimate) -> bool:
        if predicted.ttft_s * 1e3 > self.slo_ms:
            self.rejected += 1
            return False
        return True
