"""The reference of every experiment-spec key and tier-map key, taken from the validators themselves.

The spec reader (tieremu.runner.spec), every job's `parse` and the tier-map reader (tieremu.tiers.config) read
their keys through a `Section`. Here each of them is given examples through a recording Section that notes every
key it asks for, with the type, default, choices and range it asks with; the examples cover each branch (a trace
file or a generator, each tier kind). So the key list, types, defaults and valid values come from the code that
validates them, and cannot drift from it. What each key means is written in `HELP` below; `reference()` refuses
a key the validators ask for that has no meaning written, and a meaning for a key they no longer ask for
(tests/test_reference.py also checks that docs/reference.md is what `tieremu reference` writes now).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tieremu.configfile import _REQUIRED, Section
from tieremu.errors import ConfigError
from tieremu.numbers import Range

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_SOURCE = REPO / "configs" / "experiments" / "reference-example.yaml"  # relative paths resolve beside it


@dataclass
class KeyInfo:
    """One key as the validators asked for it (merged over every example that asked)."""

    path: str
    types: list[str] = field(default_factory=list)
    default: str = ""
    valid: list[str] = field(default_factory=list)
    asked_by: set[str] = field(default_factory=set)  # the examples (branches) that read it
    optional: bool = False  # asked whether it is there before it is read: never required on its own


class _Recording:
    """Every key asked, in the order first asked, under a group (top level, a job kind, the tier map)."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyInfo] = {}
        self.example = ""

    def note(self, path: str, kind: Any = None, default: Any = _REQUIRED, choices: Iterable[Any] | None = None,
             valid: Range | None = None, check: Callable[[Any], str | None] | None = None) -> None:
        path = re.sub(r"\[\d+\]", "[]", path)
        if re.search(r"(^|\.)sweep\.", path):
            return  # a sweep's axes are keys of the jobs (documented there), not keys of their own
        info = self.keys.setdefault(path, KeyInfo(path))
        if kind is None:
            info.optional = True
        info.asked_by.add(self.example)
        if kind is not None:
            for k in kind if isinstance(kind, tuple) else (kind,):
                name = {"str": "text", "int": "integer", "float": "number", "bool": "true/false", "list": "list",
                        "dict": "mapping"}.get(k.__name__, k.__name__)
                if name not in info.types:
                    info.types.append(name)
            if not info.default:
                info.default = _show_default(default)
        for text in _valid_text(choices, valid, check):
            if text not in info.valid:
                info.valid.append(text)


class _Recorder(Section):
    """A Section that tells the recording about every key read through it (and through its sub-sections)."""

    def __init__(self, data: Mapping[str, Any], path: str, source: str | Path, recording: _Recording) -> None:
        super().__init__(data, path, source)
        self.recording = recording

    def get(self, key: str, kind: Any, default: Any = _REQUIRED, *, choices: Iterable[Any] | None = None,
            check: Callable[[Any], str | None] | None = None, valid: Range | None = None) -> Any:
        self.recording.note(self.key_path(key), kind, default, choices, valid, check)
        return super().get(key, kind, default, choices=choices, check=check, valid=valid)

    def has(self, key: str) -> bool:
        self.recording.note(self.key_path(key))
        return super().has(key)

    def section(self, key: str, default_empty: bool = False) -> Section:
        value = self.get(key, dict, {} if default_empty else _REQUIRED)
        return _Recorder(value, self.key_path(key), self.source, self.recording)

    def sections(self, key: str) -> list[Section]:
        return [_Recorder(s.data, s.path, s.source, self.recording) for s in super().sections(key)]


def _show_default(default: Any) -> str:
    if default is _REQUIRED:
        return "required"
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, dict) and not default:
        return "{}"
    if isinstance(default, (list, tuple)):
        return "[" + ", ".join(map(str, default)) + "]"
    return f"{default:g}" if isinstance(default, float) else str(default)


def _valid_text(choices: Iterable[Any] | None, valid: Range | None,
                check: Callable[[Any], str | None] | None) -> list[str]:
    out = []
    if choices is not None:
        out.append("one of: " + ", ".join(map(str, choices)))
    if valid is not None:
        out.append(valid.describe())
    if check is not None and getattr(check, "__name__", "") == "positive":
        out.append("positive")
    return out


# ---- the examples: every branch of every validator, minimal ----

TIER_MAP_EXAMPLES: dict[str, dict[str, Any]] = {
    "numa": {"name": "m", "description": "d", "tiers": [
        {"name": "dram", "kind": "numa", "nodes": [0], "policy": "bind", "description": "d", "capacity_mib": 64},
        {"name": "cxl", "nodes": [0, 1], "policy": "weighted_interleave", "weights": [1, 2], "allow_emulation": True,
         "shape": False, "emulate": {"latency_ratio": 2.0, "bandwidth_ratio": 0.5, "write_bandwidth_ratio": 0.4,
                                     "access_overhead_ns": 10}},
        {"name": "far", "nodes": [0], "compression": {"format": "int4", "layout": "kivi"},
         "emulate": {"latency_ns": 300, "bandwidth_gbps": 10, "write_bandwidth_gbps": 8}}]},
    "file": {"name": "m", "tiers": [{"name": "nvme", "kind": "file", "path": "/tmp", "capacity_mib": 64,
                                     "description": "d"}]},
    "cuda": {"name": "m", "tiers": [{"name": "hbm", "kind": "cuda", "device": 0, "capacity_mib": 64,
                                     "allow_emulation": True, "description": "d",
                                     "emulate": {"latency_ratio": 1.0, "link": {"gbps": 16, "latency_us": 2}}}]},
    "peer": {"name": "m", "tiers": [{"name": "dram", "nodes": [0]},
                                    {"name": "peers", "kind": "peer", "description": "d",
                                     "link": {"latency_us": 10, "gbps": 10, "jitter_us": 1, "loss": 0}}]},
}
SPEC_EXAMPLE: dict[str, Any] = {
    "name": "example", "description": "d", "tiers": "../tiers/single-node.yaml", "lab_profile": "p", "probe": True,
    "repetitions": 1, "seed": 0, "run_timeout_s": 60, "backend": "local",
    "jobs": [{"kind": "synthetic", "policies": ["lru"], "repetitions": 1, "requires": ["cxl"],
              "sweep": {"tokens": [4, 8]}}],
    "sweep": {"tiers": ["../tiers/single-node.yaml"]},
}
# Per job kind, the params of each branch its parse takes (the runner keys are the spec's, above).
JOB_EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "probe": {"default": {}},
    "roundtrip": {"default": {"route": ["dram"]}},
    "decode": {"default": {}},
    "replay": {"trace file": {"trace": "../traces/small.jsonl", "fast_capacity": "10%"},
               "generator": {"generate": {"kind": "mix", "requests": 1}, "fast_capacity_blocks": 10}},
    "engine": {"default": {"trace": "../traces/small.jsonl", "model": "m"}},
    "cluster": {"default": {"trace": "../traces/small.jsonl"}},
    "synthetic": {"default": {}},
}


def _record_tier_map() -> _Recording:
    from tieremu.tiers.config import parse_tier_map

    recording = _Recording()
    for name, data in TIER_MAP_EXAMPLES.items():
        recording.example = name
        parse_tier_map(_Recorder(data, "", EXAMPLE_SOURCE, recording))
    return recording


def _record_spec() -> _Recording:
    from tieremu.runner.spec import parse_experiment

    recording = _Recording()
    recording.example = "spec"
    parse_experiment(_Recorder(SPEC_EXAMPLE, "", EXAMPLE_SOURCE, recording))
    return recording


VALIDATE_EXAMPLE = {"tiers": "../tiers/cluster-peer.yaml", "trace": "../traces/small.jsonl", "max_requests": 10}


def _record_validate() -> _Recording:
    from tieremu.cluster.validate import parse_validate_spec

    recording = _Recording()
    recording.example = "validate"
    section = _Recorder(VALIDATE_EXAMPLE, "", EXAMPLE_SOURCE, recording)
    parse_validate_spec(section)
    section.done()
    return recording


def _record_job(kind: str) -> _Recording:
    from tieremu.runner.jobs import default_registry

    job = default_registry().lookup(kind)
    if job is None:
        raise ConfigError(f"reference: no job kind {kind!r}")
    recording = _Recording()
    for branch, params in JOB_EXAMPLES.get(kind, {"default": {}}).items():
        recording.example = branch
        section = _Recorder(params, "", EXAMPLE_SOURCE, recording)
        job.parse(section)
        section.done()
    return recording


# ---- what each key means (checked against what the validators ask: no key without its meaning, none stale) ----

SPEC_HELP = {
    "name": "The experiment's name: letters, digits, `.`, `_`, `-`; results land in `OUT/<name>/<timestamp>/`.",
    "description": "One line about the experiment, shown at the start of `tieremu run` and in the report.",
    "tiers": "The default tier map (a path relative to the spec file; see the tier map below).",
    "lab_profile": "The lab profile the figures expect (`configs/lab/`); the manifest warns when it is not active.",
    "probe": "Run a quick per-tier probe first; its local figures anchor the emulated tiers' timing models.",
    "repetitions": "Every run this many times (arms interleaved ABBA). Unset: each job's own (3 for timing jobs: "
                   "decode, roundtrip; 1 for accounting ones: replay).",
    "seed": "Added to each run's repetition number to seed it.",
    "run_timeout_s": "A run still going after this many seconds is killed and recorded failed.",
    "backend": "Where runs execute: `local` (one after another here) or `ray` (Ray tasks on a cluster); "
               "`tieremu run --backend` wins.",
    "sweep": "Axes for every job that takes them: `{KEY: [v1, v2], ...}` over any job param (the job reference "
             "below), plus `policy` and `tiers` (tier map paths); the cartesian product is run.",
    "jobs": "The jobs, each a mapping with `kind:` and its params.",
    "jobs[].kind": "A job kind (the sections below), or `package.module:Class` of your own Job (imported: trust "
                   "the spec like code; the module must be importable, e.g. from the directory you run in).",
    "jobs[].policies": "Placement policies (names, `package.module:Class`, or `{name: hotcold, quota: 8}`) for the "
                       "jobs that take them; all-fastest and all-slowest (and a job's own bounds) run beside them.",
    "jobs[].sweep": "Axes for this job only (its own params, `policy`, `tiers`); they win over the top-level ones.",
    "jobs[].repetitions": "This job's repetitions (else the spec's `repetitions`, else the job's own).",
    "jobs[].requires": "`--backend ray`: resource names a host must declare (`tieremu ray-node --resource NAME`).",
}
DEFAULTS = {("spec", "repetitions"): "the job's own", ("spec", "jobs[].repetitions"): "the spec's, else the job's",
            ("spec", "jobs[].policies"): "required where the kind takes policies",
            ("cluster validate", "name"): "the file's stem", ("cluster validate", "max_requests"): "required"}
TIER_MAP_HELP = {
    "name": "The tier map's name (shown with every tier).",
    "description": "One line about the map.",
    "tiers": "The tiers, fastest first: the order is the demotion order.",
    "tiers[].name": "The tier's name (unique in the map), used in capacities, routes and every result row.",
    "tiers[].kind": "`numa`: memory on NUMA node(s); `file`: blocks in files of a directory (an NVMe tier); "
                    "`cuda`: a GPU's memory; `peer`: other serving instances' tiers, reached over a link "
                    "(`tieremu cluster replay` only).",
    "tiers[].compression": "How the tier stores KV blocks: `none`, `fp8` (e4m3), `int8` or `int4` with per-group "
                           "scales; a string, or a mapping with `format` and `layout`.",
    "tiers[].compression.format": "`none`, `fp8`, `int8` or `int4`.",
    "tiers[].compression.layout": "How scales are grouped: `block` (per token row) or `kivi` (keys per channel, "
                                  "values per token).",
    "tiers[].emulate.link": "`kind: cuda` only: the host link (PCIe) of an emulated GPU tier, charged per transfer "
                            "and per byte for KV crossing between host tiers and the GPU.",
    "tiers[].emulate.link.gbps": "The link's bandwidth, GB/s.",
    "tiers[].emulate.link.latency_us": "The link's cost per transfer, us.",
    "tiers[].link": "`kind: peer`: the link to the other instances (unset: `--link` on the command line).",
    "tiers[].link.latency_us": "One-way latency, us (applied by the transport: this kernel has no netem).",
    "tiers[].link.gbps": "Bandwidth, Gb/s (tbf in the kernel when in namespaces, else paced by the transport).",
    "tiers[].link.jitter_us": "Uniform jitter added to each message's delay, us.",
    "tiers[].link.loss": "Probability a message is lost (0-1); a lost pull falls back to recompute.",
    "tiers[].nodes": "The node id(s) the memory is on (a node missing here needs `allow_emulation`).",
    "tiers[].policy": "The memory policy the region is bound with.",
    "tiers[].weights": "`weighted_interleave` only: one weight (1..255) per node.",
    "tiers[].allow_emulation": "A missing node (or GPU) becomes an emulated tier on the nearest real node, labelled "
                               "`emulated`; without it a missing node is an error.",
    "tiers[].emulate": "The timing model of an emulated (or shaped) tier: absolute targets or ratios to local memory.",
    "tiers[].shape": "Slow a real node down to its `emulate` targets (only the difference is injected).",
    "tiers[].description": "One line about the tier.",
    "tiers[].capacity_mib": "How much KV the tier may hold, MiB (unset: as much as there is).",
    "tiers[].emulate.latency_ns": "Target idle load latency, ns (or `latency_ratio`, not both).",
    "tiers[].emulate.latency_ratio": "Target latency as a multiple of the local node's (calibrated).",
    "tiers[].emulate.bandwidth_gbps": "Target read bandwidth, GB/s (or `bandwidth_ratio`, not both).",
    "tiers[].emulate.bandwidth_ratio": "Target read bandwidth as a share of the local node's.",
    "tiers[].emulate.write_bandwidth_gbps": "Target write bandwidth, GB/s (unset: as the read bandwidth).",
    "tiers[].emulate.write_bandwidth_ratio": "Target write bandwidth as a share of the local node's.",
    "tiers[].emulate.access_overhead_ns": "A fixed cost per access on top of latency, ns (a protocol or software "
                                          "layer per block).",
    "tiers[].path": "The directory blocks are stored in (relative to the tier map).",
    "tiers[].device": "The CUDA device index whose memory holds the tier.",
}
JOB_HELP: dict[str, dict[str, str]] = {
    "probe": {
        "kernels": "Bandwidth kernels per tier: read, write, copy.",
        "size_mib": "Pointer-chase working set per tier, MiB.",
        "repeats": "Repeats per measurement (median, min, max and spread reported).",
        "loaded": "Also bandwidth-latency curves of the real nodes (needs 2+ CPUs on the initiator node).",
    },
    "roundtrip": {
        "route": "Tier names to migrate through hop by hop, then back to the first (unset: every tier in order).",
        "size_mib": "Region migrated, MiB.",
        "seed": "Seed of the data written and checked after every hop.",
        "check_mib": "Per tier: a region this big allocated, bound and asked where its pages are.",
    },
    "decode": {
        "budget_gbps": "Migration budget of the daemon, GB/s (unset: none).",
        "preset": "Model size of the Llama-style decode model (random weights).",
        "batch": "Sequences decoded together.",
        "prompt_tokens": "Prompt length per sequence, tokens.",
        "shared_prefix_tokens": "Tokens of prompt every sequence shares (below 3/4 of prompt_tokens).",
        "decode_steps": "Tokens generated per sequence.",
        "block_tokens": "Tokens per KV block.",
        "layout": "A KV block holds every layer of its tokens (`all-layers`) or one layer (`per-layer`).",
        "fast_capacity_mib": "KV the fastest tier may hold under an online policy, MiB (bounds are unlimited).",
        "epoch_ms": "The migration daemon's epoch, ms.",
        "seed": "Seed of weights and prompts (added to the run's seed).",
        "threads": "torch intra-op threads (1 leaves a core to the daemon).",
        "device": "Where the model runs: `auto` (a real cuda tier's GPU, else the CPU), `cpu` or `cuda`.",
    },
    "replay": {
        "trace": "A Mooncake JSONL trace (relative to the spec); give `trace` or `generate`, exactly one.",
        "generate": "Generate the requests in each run from a seed instead of reading a file.",
        "generate.kind": "Generator: mix (chat 40%, agent 30%, rag 20%, long 10%) or one kind.",
        "generate.requests": "Requests generated.",
        "generate.seed": "Generator seed (the same seed gives the same trace).",
        "generate.rate": "Requests per second.",
        "max_requests": "Replay only the first N requests.",
        "mode": "`simulate`: accounting only (origin `simulated`, runs in the warm worker); `execute`: real KV blocks "
                "in the tier arenas, the migration daemon, measured TTFT.",
        "fast_capacity": "The fastest tier's capacity: blocks, or a share of the trace's distinct blocks (`10%`); "
                         "the slower tiers are unlimited. Give this or `fast_capacity_blocks`, not both.",
        "fast_capacity_blocks": "The fastest tier's capacity in blocks (the older spelling of `fast_capacity`).",
        "block_mib": "KV a trace block stands for, MiB (simulate's byte figures; execute's label).",
        "epoch_ms": "The policy's epoch, ms of trace time.",
        "time_scale": "execute: wall seconds per trace second.",
        "block_kib": "execute: memory a block really takes here, KiB (a multiple of 4).",
        "budget_gbps": "Migration budget, GB/s (unset: none; every move still costs its bytes over the tier pair's "
                       "bandwidth).",
        "pin": "simulate: pin a request's blocks while it is served.",
    },
    "engine": {
        "trace": "A Mooncake JSONL trace replayed against the engine (relative to the spec).",
        "model": "A local Hugging Face model directory (unset: a tiny Llama built from a fixed seed).",
        "max_requests": "Replay only the first N requests.",
        "block_tokens": "Tokens per hash id of the trace, and vLLM's KV block size.",
        "kv_tier": "The tier vLLM's own KV tensor is placed on.",
        "dtype": "The model's dtype.",
        "time_scale": "Wall seconds per trace second of arrivals.",
        "timeout_s": "The engine run is killed after this many seconds.",
        "max_output_tokens": "Cap on each request's output tokens (unset: the trace's).",
        "serve": "Run on vLLM's OpenAI server, started for each run and stopped after it (else offline, in "
                 "process).",
    },
    "cluster": {
        "trace": "A Mooncake JSONL trace (relative to the spec), spread round-robin over the instances.",
        "max_requests": "Replay only the first N requests.",
        "instances": "Serving instances, each its own process with its own tiers and policy.",
        "sharing": "`none` recomputes every block missing locally; `p2p` pulls it from a peer that holds it.",
        "pull": "`estimate` pulls a peer-held block only when the estimate says it beats recomputing it; `always` "
                "pulls whenever a peer holds it.",
        "index": "`broadcast` (every instance keeps a replica fed by ZeroMQ events) or `hash` (each block's home "
                 "instances know its holders).",
        "transport": "`tcp` (namespaces joined by veth pairs when root, else loopback) or `shm` (a shared-memory "
                     "pool bound to `shm_node`, mapped by every instance: a CXL pool, emulated by a node with CPUs; "
                     "instances on loopback, rate paced by the transport) or `mooncake` (payloads read by Mooncake's "
                     "Transfer Engine, TCP, P2P handshake, over the veths or loopback like tcp; needs "
                     "`bash scripts/setup-mooncake.sh`).",
        "link": "Every link: `LATENCY_US,GBPS` or `{latency_us, gbps, jitter_us, loss}`.",
        "faults": "Faults as `KIND@N` (kill-peer, restart-peer, drop-events, reorder-events, partition) at request N.",
        "policy": "Each instance's placement policy.",
        "capacity_blocks": "Blocks each local tier of each instance holds.",
        "block_kib": "Memory one block takes here, KiB (the trace's 512-token block, scaled down).",
        "time_scale": "Wall seconds per trace second.",
        "namespaces": "Run in network namespaces (root) or on loopback (unset: namespaces when root).",
        "shm_node": "`transport: shm`: the memory node the shared pool is bound to (mbind, checked with "
                    "move_pages).",
        "pd": "`P:D`: P prefill and D decode instances (P + D = `instances`): each request is prefilled on a prefill "
              "instance, which hands every block to a decode instance over the tcp block transport (checksummed); "
              "the decode instance runs its decode steps (TTFT, TPOT, `pd_bytes`, `handoff_ms`). tcp only, no "
              "faults.",
    },
    "synthetic": {
        "tokens": "TPOT samples per run.",
        "requests": "TTFT samples per run.",
        "base_ms": "TPOT with all KV in the fastest tier, ms.",
        "slow_factor": "TPOT multiplier with all KV in the slowest tier (1 or more).",
        "working_set_mib": "KV working set, MiB.",
        "fast_capacity_mib": "The fastest tier's capacity, MiB.",
        "crash": "For tests of the runner: how a run dies (none, raise, exit, signal, hang).",
        "crash_policy": "Only runs of this policy crash.",
        "crash_unless": "...unless this file exists.",
    },
}
VALIDATE_ABOUT = ("`tieremu cluster validate SPEC` (`configs/cluster/validate-*.yaml`): the executed cluster, then the "
                  "cluster simulator on the same requests and arrival times, TTFT p50/p99 and throughput errors "
                  "printed (pass: |p50| < 10%, |p99| < 20%, the median over `repeats` executed runs of each run's "
                  "error against its simulation from the model fitted to it). The keys of a `cluster` job, plus "
                  "`name`, `tiers` and `repeats`; no faults, no pd.")
VALIDATE_HELP = {
    **{k: v for k, v in JOB_HELP["cluster"].items() if k not in ("max_requests", "faults", "pd")},
    "name": "The validation's name, shown in its report (unset: the file's stem).",
    "tiers": "One instance's tier map (relative to the spec); a peer tier in it is ignored (the link is `link`).",
    "max_requests": "The trace prefix both sides replay (required: the executed cluster runs in real time).",
    "faults": "Refused if given: the simulator injects no faults.",
    "pd": "Refused if given: a validation serves round-robin without disaggregation.",
    "repeats": "Executed runs (`--repeats` overrides): each is simulated from the model fitted to it and the check "
               "is the median of the runs' errors; the executed median is shown with a distribution-free "
               "confidence interval of it (95% from 6 runs; fewer: min..max and its coverage).",
}
JOB_ABOUT = {
    "probe": "A quick per-tier probe (latency, bandwidth, loaded latency) through each tier's own path. "
             "`probe: true` at the top level adds it; as a job it takes these params.",
    "roundtrip": "A KV-sized region migrated tier to tier and back, verified page by page. A timing job (3 "
                 "repetitions).",
    "decode": "Real decode of a Llama-style model whose attention reads K/V from the tier arenas, the migration "
              "daemon running each policy. A timing job (3 repetitions); takes policies.",
    "replay": "Trace replay under each policy, the fastest tier limited; `belady` runs beside every policy, and the "
              "static bounds run once across the axes they do not depend on. Takes policies.",
    "engine": "A trace against vLLM's CPU build whose KV connector keeps blocks in tieremu's tiers. Takes policies.",
    "cluster": "Several instance processes sharing KV blocks peer to peer (`tieremu cluster replay --mode "
               "execute`); the spec's tier map is each instance's own tiers (no peer tier: the link is the job's).",
    "synthetic": "Figures computed, not measured (origin `simulated`): for tests of the runner. Takes policies "
                 "(lru, lfu, hotcold).",
}


@dataclass(frozen=True)
class Group:
    title: str
    about: str
    keys: list[KeyInfo]
    help: dict[str, str]
    name: str  # the key of DEFAULTS
    branches: tuple[str, ...] = ()  # examples; a key read in only some of them says which


UNWRITTEN = "(no meaning written yet: add it to tieremu/runner/reference.py)"


def groups(*, strict: bool = True) -> list[Group]:
    """Every group of keys, recorded from the validators, with its meanings. Strict: a key without a meaning, or a
    meaning for a key no validator asks for, is refused (ConfigError naming them; tests/test_reference.py is
    strict); otherwise such a key is shown as UNWRITTEN, so that the command still writes the reference."""
    from tieremu.runner.jobs import default_registry

    spec, tier_map = _record_spec(), _record_tier_map()
    out = [Group("Experiment spec", "The top level of `configs/experiments/*.yaml`, and the keys the runner reads "
                 "in every job (the job's own params are in the sections after).", list(spec.keys.values()),
                 dict(SPEC_HELP), "spec"),
           Group("Tier map", "`configs/tiers/*.yaml`: the tiers, fastest first. Keys marked with kinds apply to "
                 "tiers of those kinds only.", list(tier_map.keys.values()), dict(TIER_MAP_HELP), "tier map",
                 tuple(TIER_MAP_EXAMPLES))]
    kinds = default_registry().kinds
    if strict and not (set(kinds) == set(JOB_EXAMPLES) == set(JOB_HELP) == set(JOB_ABOUT)):
        raise ConfigError(f"reference: job kinds {', '.join(kinds)} but examples for {', '.join(JOB_EXAMPLES)}, "
                          f"meanings for {', '.join(JOB_HELP)}, descriptions for {', '.join(JOB_ABOUT)}: update "
                          "tieremu/runner/reference.py")
    for kind in kinds:
        try:
            keys = list(_record_job(kind).keys.values())
        except ConfigError:
            if strict:
                raise
            keys = []  # a new kind whose example is not written yet: its section says so
        out.append(Group(f"Job `{kind}`", JOB_ABOUT.get(kind, UNWRITTEN), keys, dict(JOB_HELP.get(kind, {})), kind))
    out.append(Group("Cluster validation spec", VALIDATE_ABOUT, list(_record_validate().keys.values()),
                     dict(VALIDATE_HELP), "cluster validate"))
    for group in out:
        asked = {k.path for k in group.keys}
        missing, stale = sorted(asked - set(group.help)), sorted(set(group.help) - asked)
        if not strict:
            group.help.update(dict.fromkeys(missing, UNWRITTEN))
        elif missing or stale:
            raise ConfigError(f"reference: {group.title}: "
                              + (f"keys the validator reads with no meaning written: {', '.join(missing)}; "
                                 if missing else "")
                              + (f"meanings for keys it no longer reads: {', '.join(stale)}" if stale else "")
                              + " (edit tieremu/runner/reference.py)")
    return out


def reference_markdown() -> str:
    """docs/reference.md, generated: `tieremu reference --out docs/`."""
    lines = ["# Reference: experiment specs and tier maps", "",
             "Generated by `tieremu reference --out docs/` from the validators themselves "
             "(`tieremu/runner/reference.py` records every key they read, with its type, default and valid values); "
             "do not edit by hand. `tests/test_reference.py` fails when this file differs from what the command "
             "writes. Every key is checked before any run: an unknown key, a bad value or a missing required key is "
             "an error naming the key path and what is valid.", ""]
    for group in groups(strict=False):
        lines += [f"## {group.title}", "", group.about, "", "| key | type | default | valid | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        for key in group.keys:
            default = DEFAULTS.get((group.name, key.path)) or (
                "unset" if key.optional and key.default in ("required", "") else key.default or "unset")
            meaning = group.help[key.path]
            if group.branches and key.asked_by != set(group.branches):
                meaning = f"({', '.join(sorted(key.asked_by))} only) {meaning}"
            cells = [f"`{key.path}`", " or ".join(key.types) or "-", default, "; ".join(key.valid) or "-", meaning]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += ["## Sweeps", "",
              "A sweep axis is a key of a job's params with a list of values (`sweep: {fast_capacity_blocks: [50, "
              "200]}`), or `policy` (policy entries) or `tiers` (tier map paths). Top-level axes apply to every job "
              "that has that param; a job's own axes win. Each job runs tier maps x the cartesian product of its "
              "axes x repetitions x (its policies + its bounds + all-fastest + all-slowest). A bound whose result "
              "does not depend on an axis runs once for all its values. `tieremu run SPEC --dry-run` lists the "
              "runs.", ""]
    return "\n".join(lines)


def write_reference(folder: Path) -> Path:
    """Write reference.md into `folder` (created if missing); returns its path."""
    from tieremu.safefile import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reference.md"
    atomic_write(path, reference_markdown())
    return path
