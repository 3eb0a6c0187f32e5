"""What a cluster replay reports: one JSON shape for execute mode (here) and the cluster simulator.

`hit_ratio` splits every block reference into local (in the instance's own tiers), peer (pulled from another
instance) and miss (recomputed: not indexed anywhere, a stale or failed pull, or a pull the estimator judged
slower than recomputing). `estimator_error` is the median of |predicted - measured| / measured over pulls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tieremu.workloads.simulate import Tail


@dataclass(frozen=True)
class HitRatio:
    local: float
    peer: float
    miss: float

    @classmethod
    def of(cls, local: int, peer: int, miss: int) -> HitRatio:
        total = local + peer + miss
        if not total:
            return cls(0.0, 0.0, 0.0)
        return cls(local / total, peer / total, miss / total)


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        tail = Tail.of(values)
        return cls(tail.p50, tail.p99)


@dataclass(frozen=True)
class InstanceRow:
    instance: int
    requests: int  # completed here
    local: int  # block references served from the instance's own tiers
    peer: int  # pulled from a peer (verified)
    miss: int  # recomputed
    ttft_ms: Percentiles
    peer_bytes: int  # bytes pulled in
    served_bytes: int  # bytes sent to peers
    pulls: int
    pulls_failed: int  # a pull that timed out, was refused or lost (the block was recomputed)
    stale_misses: int  # the index named a holder that no longer held the block
    corrupted_blocks: int  # received blocks whose checksum failed (never stored) + resident blocks failing check
    resyncs: int  # sequence gaps (or restarts) that made this instance re-read a peer's holdings
    events_sent: int
    events_dropped: int  # fault injection: numbered but never sent
    blocks_checked: int
    incarnation: int  # 0 for the first process; a restarted instance counts up
    killed: bool = False
    events_reordered: int = 0  # fault injection: held back and sent after their successor
    out_of_order: int = 0  # peers' events received ahead of their turn, buffered, applied in number order
    late_ignored: int = 0  # peers' events received after a snapshot had covered them: not applied
    # The pull-or-recompute log: (predicted ms, measured ms) of every request whose peer-held blocks were pulled.
    estimates_ms: tuple[tuple[float, float], ...] = ()
    # --pd: the instance's role (prefill | decode; both without pd); a decode instance's requests decoded, decode
    # steps, blocks handed over (pulled from the prefill instance), already held, recomputed after a failed pull,
    # the handed bytes, its TPOT and hand-off (pull and store of a request's blocks) tails.
    role: str = "both"
    decoded: int = 0
    decode_steps: int = 0
    pd_handed: int = 0
    pd_local: int = 0
    pd_recomputed: int = 0
    pd_bytes: int = 0
    tpot_ms: Percentiles | None = None
    handoff_ms: Percentiles | None = None


@dataclass(frozen=True)
class ClusterResult:
    mode: str  # execute | simulate
    origin: str  # measured | emulated | simulated
    sharing: str
    index: str
    transport: str
    namespaces: bool  # instances ran in their own network namespaces
    instances_n: int
    requests: int
    completed: int
    hit_ratio: HitRatio
    ttft_ms: Percentiles
    peer_bytes: int
    pull_ms: Percentiles
    stale_misses: int
    corrupted_blocks: int
    estimator_error: float | None  # None: no pull was made
    instances: tuple[InstanceRow, ...]
    link: dict[str, float] = field(default_factory=dict)
    shaping: dict[str, str] = field(default_factory=dict)  # property -> mechanism (kernel-tbf, transport, ...)
    faults: tuple[str, ...] = ()
    index_stale_entries: int = 0  # at the end, after quiescence: entries naming a holder that lacks the block
    index_missing_entries: int = 0  # at the end: held blocks an index that should know them does not list
    pulls_failed: int = 0
    decisions: dict[str, int] = field(default_factory=dict)  # pull | recompute (requests with peer-held blocks)
    wall_s: float = 0.0
    notes: tuple[str, ...] = ()
    ttft_samples_ms: tuple[float, ...] = ()  # one per completed request (left out of the JSON)
    # --pd P:D (None without): TTFT then ends at a decode instance's first token; TPOT over the decode steps after
    # it (None when no request ran 2 or more); the KV handed from prefill to decode instances (bytes, blocks
    # pulled, already held by the decode instance, recomputed there after a failed pull); hand-off and prefill
    # (a prefill instance's end, from the request's due time) tails.
    pd: str | None = None
    tpot_ms: Percentiles | None = None
    pd_bytes: int = 0
    handoff_ms: Percentiles | None = None
    prefill_ms: Percentiles | None = None
    pd_handed: int = 0
    pd_local: int = 0
    pd_recomputed: int = 0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("ttft_samples_ms")
        if doc["estimator_error"] is not None and not math.isfinite(doc["estimator_error"]):
            doc["estimator_error"] = None
        return doc
