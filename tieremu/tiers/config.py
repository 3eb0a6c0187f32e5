"""Tier maps as written in `configs/tiers/*.yaml`: which tiers exist, where their memory lives, how fast they should be.

A tier map is a list ordered fastest first, which is also the demotion order later layers walk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tieremu.configfile import Section, load_yaml, show
from tieremu.numa.syscalls import Policy
from tieremu.numbers import MAX_GBPS, MAX_MIB, MAX_NS, MAX_RATIO, Range, number_problem

KINDS = ("numa", "file", "cuda", "peer")
# How a tier stores KV blocks (tieremu/kv/compress.py): as written, or quantized with per-group scales, grouped per
# token row (`block`) or with keys per channel and values per token (`kivi`).
COMPRESSIONS = ("none", "fp8", "int8", "int4")
COMPRESSION_LAYOUTS = ("block", "kivi")
POLICIES = tuple(p.name.lower() for p in Policy if p.takes_nodes)
# The documented ranges of a tier map's numbers (the kernel's MAX_NUMNODES is at most 1024).
NODE_IDS = Range(0, 1023, integer=True)
DEVICE_IDS = Range(0, 1023, integer=True)
CAPACITY_MIB = Range(1, MAX_MIB, integer=True)
LATENCY_NS = Range(0, MAX_NS, lo_closed=False)
GBPS = Range(0, MAX_GBPS, lo_closed=False)
RATIO = Range(0, MAX_RATIO, lo_closed=False)
# A peer tier's link (tieremu.cluster checks the same bounds for --link).
LINK_LATENCY_US = Range(0, 1e6)
LINK_GBPS = Range(0.001, 400)
LINK_LOSS = Range(0, 1)


@dataclass(frozen=True)
class LinkTarget:
    """The host link of an emulated GPU tier (PCIe): what a KV block crossing between host memory and the tier
    costs, per transfer (latency) and per byte (bandwidth). A real GPU's link is real and takes no model."""

    gbps: float
    latency_us: float = 0.0

    def describe(self) -> str:
        return f"link {self.gbps:g} GB/s + {self.latency_us:g} us per transfer"


@dataclass(frozen=True)
class TimingTarget:
    """How fast a tier should be when it is emulated: absolute figures or ratios to the local node."""

    latency_ns: float | None = None
    latency_ratio: float | None = None
    bandwidth_gbps: float | None = None
    bandwidth_ratio: float | None = None
    # Writes can be slower than reads (CXL expanders often are); unset, they follow the bandwidth above.
    write_bandwidth_gbps: float | None = None
    write_bandwidth_ratio: float | None = None
    # A fixed cost per access on top of latency (e.g. a protocol or software layer per block fetched).
    access_overhead_ns: float = 0.0
    link: LinkTarget | None = None  # kind cuda only: the emulated host link (PCIe) blocks cross to reach the tier

    def describe(self) -> str:
        parts = []
        if self.latency_ns is not None:
            parts.append(f"latency {self.latency_ns:g} ns")
        if self.latency_ratio is not None:
            parts.append(f"latency {self.latency_ratio:g}x local")
        if self.bandwidth_gbps is not None:
            parts.append(f"bandwidth {self.bandwidth_gbps:g} GB/s")
        if self.bandwidth_ratio is not None:
            parts.append(f"bandwidth {self.bandwidth_ratio:g}x local")
        if self.write_bandwidth_gbps is not None:
            parts.append(f"write bandwidth {self.write_bandwidth_gbps:g} GB/s")
        if self.write_bandwidth_ratio is not None:
            parts.append(f"write bandwidth {self.write_bandwidth_ratio:g}x local")
        if self.access_overhead_ns:
            parts.append(f"+{self.access_overhead_ns:g} ns per access")
        if self.link is not None:
            parts.append(self.link.describe())
        return ", ".join(parts) or "no targets"


@dataclass(frozen=True)
class Compression:
    """A tier's `compression`: `none`, or a format (fp8, int8, int4) and how its scales are grouped."""

    format: str = "none"
    layout: str = "block"

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    def describe(self) -> str:
        return "none" if not self.enabled else f"{self.format} ({self.layout} scales)"


@dataclass(frozen=True)
class PeerLink:
    """A peer tier's link to the other instances: one-way latency, bandwidth (Gb/s), jitter, loss probability."""

    latency_us: float
    gbps: float
    jitter_us: float = 0.0
    loss: float = 0.0


@dataclass(frozen=True)
class TierSpec:
    name: str
    kind: str
    nodes: tuple[int, ...]
    policy: Policy
    weights: tuple[int, ...] | None
    allow_emulation: bool
    emulate: TimingTarget | None
    description: str = ""
    shape: bool = False  # a real node slowed to the emulate targets (only the difference is injected)
    capacity_mib: int | None = None  # how much KV this tier may hold (None: as much as the node has)
    path: Path | None = None  # kind file: the directory blocks are stored in
    device: int | None = None  # kind cuda: the CUDA device index whose memory (HBM) holds the tier
    compression: Compression = Compression()  # how the tier stores KV blocks (tieremu/kv/compress.py)
    link: PeerLink | None = None  # kind peer: the link to the other instances (None: given on the command line)

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def is_peer(self) -> bool:
        return self.kind == "peer"


@dataclass(frozen=True)
class TierMap:
    name: str
    tiers: tuple[TierSpec, ...]
    description: str = ""
    source: Path | None = None

    def tier(self, name: str) -> TierSpec:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier {name!r} in tier map {self.name!r}; tiers: {', '.join(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)


def load_tier_map(path: str | Path) -> TierMap:
    return parse_tier_map(load_yaml(path))


def parse_tier_map(doc: Section) -> TierMap:
    name = doc.get("name", str)
    description = doc.get("description", str, "")
    tiers = tuple(_tier(s) for s in doc.sections("tiers"))
    doc.done()
    if not tiers:
        raise doc.error("tiers", "a tier map needs at least one tier")
    seen: set[str] = set()
    for i, t in enumerate(tiers):
        if t.name in seen:
            raise doc.error(f"tiers[{i}].name", f"duplicate tier name {t.name!r}")
        seen.add(t.name)
    return TierMap(name=name, tiers=tiers, description=description, source=doc.source)


def _tier(s: Section) -> TierSpec:
    name = s.get("name", str)
    kind = s.get("kind", str, "numa", choices=KINDS)
    if kind == "file":
        return _file_tier(s, name)
    if kind == "cuda":
        return _cuda_tier(s, name)
    if kind == "peer":
        return _peer_tier(s, name)
    nodes = s.ints("nodes")
    if not nodes or any(number_problem(n, NODE_IDS) for n in nodes):
        raise s.error("nodes", f"{show(list(nodes))}: give one or more node ids ({NODE_IDS.describe()})")
    if len(set(nodes)) != len(nodes):
        raise s.error("nodes", f"{list(nodes)}: a node is listed twice; list each node once")
    policy = Policy.from_name(s.get("policy", str, "bind", choices=POLICIES))
    weights = s.ints("weights", None)
    if policy == Policy.WEIGHTED_INTERLEAVE:
        if weights is None or len(weights) != len(nodes) or any(not 1 <= w <= 255 for w in weights):
            raise s.error("weights", f"{show(weights)}: weighted_interleave needs one weight (1..255) per node of "
                                     f"{list(nodes)}")
    elif weights is not None:
        raise s.error("weights", f"only valid with policy weighted_interleave, not {policy.name.lower()}")
    if policy == Policy.PREFERRED and len(nodes) != 1:
        raise s.error("nodes", f"{list(nodes)}: policy preferred takes exactly one node (use preferred_many)")
    allow = s.get("allow_emulation", bool, False)
    emulate = _timing(s.section("emulate")) if s.has("emulate") else None
    shape = s.get("shape", bool, False)
    if shape and emulate is None:
        raise s.error("shape", "shaping a real node needs emulate targets (latency_ratio, bandwidth_ratio, ...)")
    description = s.get("description", str, "")
    capacity_mib = s.get("capacity_mib", int, None, valid=CAPACITY_MIB)
    compression = _compression(s)
    s.done()
    return replace(TierSpec(name, kind, nodes, policy, weights, allow, emulate, description, shape, capacity_mib),
                   compression=compression)


def _file_tier(s: Section, name: str) -> TierSpec:
    """A directory on a storage device: no nodes, no memory policy, no timing model (its speed is the device's)."""
    path = s.relative_path(s.get("path", str))
    capacity_mib = s.get("capacity_mib", int, None, valid=CAPACITY_MIB)
    description = s.get("description", str, "")
    compression = _compression(s)
    s.done()
    return TierSpec(name, "file", (), Policy.DEFAULT, None, False, None, description, False, capacity_mib, path,
                    compression=compression)


def _cuda_tier(s: Section, name: str) -> TierSpec:
    """A GPU's memory: no nodes and no memory policy of its own. Its speed is the device's when it is real; when
    it is emulated it lives on the nearest NUMA node with the bind policy (as any emulated tier) and `emulate`
    may only slow it down from there, so no node list or policy is taken here."""
    device = s.get("device", int, 0, valid=DEVICE_IDS)
    allow = s.get("allow_emulation", bool, False)
    emulate = _timing(s.section("emulate"), link=True) if s.has("emulate") else None
    capacity_mib = s.get("capacity_mib", int, None, valid=CAPACITY_MIB)
    description = s.get("description", str, "")
    compression = _compression(s)
    s.done()
    return TierSpec(name, "cuda", (), Policy.BIND, None, allow, emulate, description, False, capacity_mib,
                    device=device, compression=compression)


def _peer_tier(s: Section, name: str) -> TierSpec:
    """Other instances' tiers, reached over a link (tieremu.cluster): no nodes or memory of its own here."""
    link = None
    if s.has("link"):
        ls = s.section("link")
        link = PeerLink(latency_us=ls.get("latency_us", float, valid=LINK_LATENCY_US),
                        gbps=ls.get("gbps", float, valid=LINK_GBPS),
                        jitter_us=ls.get("jitter_us", float, 0.0, valid=LINK_LATENCY_US),
                        loss=ls.get("loss", float, 0.0, valid=LINK_LOSS))
        ls.done()
    description = s.get("description", str, "")
    s.done()
    return TierSpec(name, "peer", (), Policy.DEFAULT, None, False, None, description, link=link)


def _compression(s: Section) -> Compression:
    """`compression: int8`, or `compression: {format: int4, layout: kivi}`; `none` when absent."""
    if not s.has("compression"):
        return Compression()
    value = s.data["compression"]
    if isinstance(value, dict):
        c = s.section("compression")
        out = Compression(c.get("format", str, choices=COMPRESSIONS),
                          c.get("layout", str, "block", choices=COMPRESSION_LAYOUTS))
        c.done()
        return out
    if not isinstance(value, str):
        raise s.error("compression", f"{show(value)} is not valid; valid: {', '.join(COMPRESSIONS)}, or a mapping "
                                     f"{{format: ..., layout: {' | '.join(COMPRESSION_LAYOUTS)}}}")
    return Compression(s.get("compression", str, "none", choices=COMPRESSIONS))


def _timing(s: Section, *, link: bool = False) -> TimingTarget:
    """`link` is taken only from a cuda tier's block (a NUMA tier's memory is reached without a PCIe hop)."""
    if s.has("link") and not link:
        raise s.error("link", "a host link model is only for kind: cuda tiers (an emulated GPU's PCIe link); "
                              "a NUMA tier's speed is its latency and bandwidth targets")
    target = TimingTarget(
        latency_ns=s.get("latency_ns", float, None, valid=LATENCY_NS),
        latency_ratio=s.get("latency_ratio", float, None, valid=RATIO),
        bandwidth_gbps=s.get("bandwidth_gbps", float, None, valid=GBPS),
        bandwidth_ratio=s.get("bandwidth_ratio", float, None, valid=RATIO),
        write_bandwidth_gbps=s.get("write_bandwidth_gbps", float, None, valid=GBPS),
        write_bandwidth_ratio=s.get("write_bandwidth_ratio", float, None, valid=RATIO),
        access_overhead_ns=s.get("access_overhead_ns", float, 0.0, valid=Range(0, MAX_NS)),
        link=_link(s.section("link")) if s.has("link") else None,
    )
    s.done()
    if target.latency_ns is not None and target.latency_ratio is not None:
        raise s.error("latency_ns", "give latency_ns or latency_ratio, not both")
    if target.bandwidth_gbps is not None and target.bandwidth_ratio is not None:
        raise s.error("bandwidth_gbps", "give bandwidth_gbps or bandwidth_ratio, not both")
    if target.write_bandwidth_gbps is not None and target.write_bandwidth_ratio is not None:
        raise s.error("write_bandwidth_gbps", "give write_bandwidth_gbps or write_bandwidth_ratio, not both")
    return target


def _link(s: Section) -> LinkTarget:
    target = LinkTarget(gbps=s.get("gbps", float, valid=GBPS),
                        latency_us=s.get("latency_us", float, 0.0, valid=Range(0, MAX_NS / 1e3)))
    s.done()
    return target
