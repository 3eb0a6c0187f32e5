"""`kind: cluster` in experiment specs: one cluster replay per run (tieremu.cluster.replay), its figures as rows.

The spec's tier map is each instance's own tiers (no peer tier: the runner resolves it on this machine); the link
between instances is the job's `link: {latency_us, gbps}` (or `LATENCY_US,GBPS`). Keys: `trace`, `max_requests`,
`instances`, `sharing`, `index`, `transport`, `link`, `faults`, `policy`, `capacity_blocks`, `block_kib`,
`time_scale`, `namespaces` (default: when root), `shm_node` (`transport: shm`: the node the shared pool is bound
to; rows then carry `pool_node` and `pool_memory`), `pd` (`P:D`: P prefill and D decode instances, P + D =
`instances`; rows then add `tpot_ms`, `pd_bytes` and `handoff_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tieremu.cluster.link import LinkSpec, parse_link
from tieremu.cluster.replay import PULL_RULES, SHARING, TRANSPORTS, ClusterSpec, check_pd, cluster_replay
from tieremu.cluster.ring import INDEXES
from tieremu.cluster.simulate import parse_pd
from tieremu.configfile import Section, positive
from tieremu.errors import ConfigError
from tieremu.record.row import MetricRow
from tieremu.tiers.config import TierMap
from tieremu.workloads.job import Job, RunContext


@dataclass(frozen=True)
class ClusterParams:
    trace: str
    max_requests: int | None
    instances: int
    sharing: str
    pull: str
    index: str
    transport: str
    link: LinkSpec
    faults: tuple[str, ...]
    policy: str
    capacity_blocks: int
    block_kib: int
    time_scale: float
    namespaces: bool | None
    shm_node: int = 0
    pd: tuple[int, int] | None = None


class ClusterJob(Job):
    kind = "cluster"
    input_files = ("trace",)
    uses_timing = False  # the instances' tiers are real memory here; the link is the transport's

    @classmethod
    def parse(cls, section: Section) -> ClusterParams:
        trace = section.relative_path(section.get("trace", str))
        if not trace.is_file():
            raise section.error("trace", f"{trace}: no such trace file")
        raw = section.get("link", (str, dict), "10,10")
        try:
            link = parse_link(raw) if isinstance(raw, str) else LinkSpec(**{k: float(v) for k, v in raw.items()})
        except (ConfigError, TypeError, ValueError) as exc:
            raise section.error("link", f"{exc}; give LATENCY_US,GBPS or {{latency_us: 10, gbps: 10}}") from None
        faults = section.get("faults", list, [])
        pd_text = section.get("pd", str, None)
        try:
            pd = None if pd_text is None else parse_pd(pd_text)
        except ConfigError as exc:
            raise section.error("pd", str(exc)) from None
        params = ClusterParams(
            trace=str(trace), max_requests=section.get("max_requests", int, None, check=positive),
            instances=section.get("instances", int, 3, check=positive),
            sharing=section.get("sharing", str, "p2p", choices=SHARING),
            pull=section.get("pull", str, "estimate", choices=PULL_RULES),
            index=section.get("index", str, "broadcast", choices=INDEXES),
            transport=section.get("transport", str, "tcp", choices=TRANSPORTS), link=link,
            faults=tuple(str(f) for f in faults), policy=section.get("policy", str, "lru"),
            capacity_blocks=section.get("capacity_blocks", int, 4096, check=positive),
            block_kib=section.get("block_kib", int, 64, check=positive),
            time_scale=section.get("time_scale", float, 0.05, check=positive),
            namespaces=section.get("namespaces", bool, None), shm_node=section.get("shm_node", int, 0), pd=pd)
        if pd is not None:  # refused when the spec is read, before any run
            try:
                check_pd(pd, params.instances, params.transport)
            except ConfigError as exc:
                raise section.error("pd", str(exc)) from None
            if params.faults:
                raise section.error("pd", "faults are injected without pd only")
        section.done()
        return params

    @classmethod
    def validate(cls, params: ClusterParams, tier_map: TierMap) -> tuple[str, str] | None:
        peers = [t.name for t in tier_map.tiers if t.kind == "peer"]
        if peers:
            return "link", (f"the spec's tier map has peer tier(s) {', '.join(peers)}: give each instance's own tiers "
                            "there and the link between instances in the job (link: {latency_us, gbps})")
        return None

    @classmethod
    def run(cls, params: ClusterParams, ctx: RunContext) -> list[MetricRow]:
        source = ctx.resolved.tier_map.source
        if source is None:
            raise ConfigError("cluster job: the tier map has no file, and the instances read it from one")
        r = cluster_replay(ClusterSpec(
            trace=Path(params.trace), tiers=Path(source), instances=params.instances, sharing=params.sharing,
            pull=params.pull,
            index=params.index, transport=params.transport, link=params.link, max_requests=params.max_requests,
            faults=params.faults, namespaces=params.namespaces, policy=params.policy,
            capacity_blocks=params.capacity_blocks, block_kib=params.block_kib, time_scale=params.time_scale,
            shm_node=params.shm_node, pd=params.pd))
        o = r.origin
        rows = [ctx.row("ttft_ms", v, "ms", o, sample=i) for i, v in enumerate(r.ttft_samples_ms)]
        for where, value in (("local", r.hit_ratio.local), ("peer", r.hit_ratio.peer), ("miss", r.hit_ratio.miss)):
            rows.append(ctx.row("hit_ratio", value, "fraction", o, tier=where, of="block references"))
        rows.append(ctx.row("pull_ms", r.pull_ms.p50, "ms", o, p99=r.pull_ms.p99))
        figures: list[tuple[str, Any, str]] = [
            ("peer_bytes", r.peer_bytes, "B"), ("stale_misses", r.stale_misses, "blocks"),
            ("corrupted_blocks", r.corrupted_blocks, "blocks"), ("pulls_failed", r.pulls_failed, "blocks"),
            ("index_stale_entries", r.index_stale_entries, "entries"),
            ("completed_requests", r.completed, "requests")]
        if r.pd is not None:
            figures.append(("pd_bytes", r.pd_bytes, "B"))
            if r.tpot_ms is not None:
                rows.append(ctx.row("tpot_ms", r.tpot_ms.p50, "ms", o, p99=r.tpot_ms.p99, pd=r.pd))
            if r.handoff_ms is not None:
                rows.append(ctx.row("handoff_ms", r.handoff_ms.p50, "ms", o, p99=r.handoff_ms.p99, pd=r.pd))
        if r.estimator_error is not None:
            figures.append(("estimator_error", r.estimator_error, "fraction"))
        pool = {k: r.shaping[k] for k in ("pool_node", "pool_memory") if k in r.shaping}  # transport shm
        rows += [ctx.row(name, float(value), unit, o, sharing=r.sharing, index=r.index, transport=r.transport, **pool)
                 for name, value, unit in figures]
        return rows
