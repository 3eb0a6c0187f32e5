"""The KV cache against its bounds, side by side in one run (alternating rounds, medians):

- paged, all blocks in local DRAM, against the same model decoding from contiguous KV tensors (goal: within 1.3x);
- attention's effective KV read bandwidth (decode attention reading K/V in place through the block tables) against
  the probe's read bandwidth of the node;
- with emulated tiers: TPOT with all KV local, split local/CXL, and all CXL (goal: strictly increasing), with each
  tier's bytes per token and the emulation audit;
- the emulation's bookkeeping on an all-local run (an emulated tier asked for no slowdown; goal: under 2%).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from tieremu.kv.cache import TieredKVCache
from tieremu.kv.layout import KVLayout
from tieremu.kv.placement import Vector
from tieremu.record.stats import LoadMeter, MachineLoad, Summary
from tieremu.tiers.config import TimingTarget
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap
from tieremu.tiers.timing import Calibration, timing_model
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.decode import DecodeResult, DecodeSpec, build_prompts, run_decode
from tieremu.workloads.llama import LlamaModel, ModelConfig


@dataclass(frozen=True)
class PlacementPoint:
    name: str
    fractions: dict[str, float]
    tpot_ms: Summary
    kv_bytes_per_token: dict[str, float]
    injected_s: float
    audit: list[dict[str, object]]


@dataclass(frozen=True)
class KVBench:
    model: str
    spec: DecodeSpec
    layout: str
    paged_tpot_ms: Summary
    contiguous_tpot_ms: Summary
    attention_gbps: Summary  # KV bytes / time of decode attention over the paged blocks (the C kernel for fp32)
    gather_gbps: Summary  # KV bytes / time of gathering them into contiguous tensors (the non-fp32 path)
    probe_read_gbps: float
    placements: list[PlacementPoint]
    overhead: float  # all-local run with a no-slowdown emulated tier over the same run without emulation (median)
    overhead_range: tuple[float, float]  # its min and max over the rounds: how much of it is the machine's noise
    accounting_share: float  # the injector's bookkeeping time / run time, in that run
    load: MachineLoad

    @property
    def paged_ratio(self) -> float:
        return self.paged_tpot_ms.median / self.contiguous_tpot_ms.median


def bench_kv(config: ModelConfig, resolved: ResolvedTierMap, cal: Calibration | None, spec: DecodeSpec, *,
             block_tokens: int = 16, layout: str = "all-layers", rounds: int = 5) -> KVBench:
    meter = LoadMeter()
    model = LlamaModel(config, seed=spec.seed)
    lay = KVLayout(config.layers, config.kv_heads, config.head_dim, block_tokens, torch.float32, layout)
    blocks_needed = spec.batch * lay.blocks_for(spec.prompt_tokens * 5 // 4 + spec.decode_steps + 1) + 8
    # Host-memory tiers only: this model runs on the CPU (file and GPU tiers are reached by copies, not reads).
    memory = [t.name for t in resolved.tiers if t.nodes]
    capacities = {t.name: (blocks_needed if t.name in memory else 0) for t in resolved.tiers}
    local = memory[0]
    injector = _injector(resolved, cal)

    def paged(fractions: Mapping[str, float], inj: DelayInjector | None) -> tuple[list[float], DecodeResult]:
        cache = TieredKVCache(resolved, lay, capacities=capacities, placement=Vector(dict(fractions)), injector=inj)
        with cache:
            result = run_decode(model, cache, spec)
        return [t * 1e3 for t in result.tpot_s], result

    def contiguous() -> list[float]:
        store = ContiguousKV.for_model(config, max_len=spec.prompt_tokens * 2 + spec.decode_steps + 1)
        prompts = build_prompts(spec, config.vocab)
        seqs = list(range(len(prompts)))
        logits = model.prefill(store, seqs, prompts)
        tokens, lengths, out = logits.argmax(-1), [p.numel() for p in prompts], []
        for step in range(spec.decode_steps):
            t0 = time.perf_counter()
            tokens = model.decode_step(store, seqs, tokens, [n + step for n in lengths]).argmax(-1)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    # 1. paged all-local vs contiguous, alternating
    paged_ms, contig_ms = [], []
    for _ in range(rounds):
        paged_ms.append(statistics.median(paged({local: 1.0}, None)[0]))
        contig_ms.append(statistics.median(contiguous()))
    # 2. attention's effective read bandwidth
    attention, gather = _attention_bandwidth(model, lay, resolved, capacities, local, spec, rounds)
    from tieremu.probe import bandwidth

    node = resolved.tier(local).nodes[0]
    probe_read = bandwidth.measure("read", (0,), node, working_set=256 << 20, repeats=3).gb_per_s.median
    # 3. placements across emulated (or real) tiers, alternating
    shapes = _placement_shapes(memory)
    samples: dict[str, list[float]] = {name: [] for name in shapes}
    last = {}
    for _ in range(rounds):
        for name, fractions in shapes.items():
            if injector is not None:
                injector = _injector(resolved, cal)
            ms, result = paged(fractions, injector)
            samples[name].append(statistics.median(ms))
            last[name] = (result, [a.to_dict() for a in injector.audits.values()] if injector else [])
    points = [PlacementPoint(name, shapes[name], Summary.of(samples[name]), last[name][0].kv_bytes_per_token,
                             last[name][0].injected_s, last[name][1]) for name in shapes]
    # 4. bookkeeping of emulation that asks for no slowdown
    overhead, overhead_range, share = _no_slowdown_overhead(paged, resolved, cal, local, rounds)
    return KVBench(config.name, spec, layout, Summary.of(paged_ms), Summary.of(contig_ms), attention, gather,
                   probe_read, points, overhead, overhead_range, share, meter.stop())


def _placement_shapes(memory: list[str]) -> dict[str, dict[str, float]]:
    if len(memory) < 2:
        return {f"all {memory[0]}": {memory[0]: 1.0}}
    fast, slow = memory[0], memory[1]
    return {f"all {fast}": {fast: 1.0}, f"{fast}/{slow} split": {fast: 0.5, slow: 0.5}, f"all {slow}": {slow: 1.0}}


def _injector(resolved: ResolvedTierMap, cal: Calibration | None) -> DelayInjector | None:
    models = [t.timing for t in resolved.tiers if t.timing is not None]
    return DelayInjector(models, cal) if models and cal is not None else None


def _attention_bandwidth(model: LlamaModel, lay: KVLayout, resolved: ResolvedTierMap, capacities: dict[str, int],
                         local: str, spec: DecodeSpec, rounds: int) -> tuple[Summary, Summary]:
    """KV bytes a decode step's attention reads over the time it takes, all blocks local; and over the time of
    gathering them into contiguous tensors instead."""
    prompts = build_prompts(spec, model.config.vocab)
    c = model.config
    with TieredKVCache(resolved, lay, capacities=capacities, placement=Vector({local: 1.0}),
                       log_accesses=False) as cache:
        seqs = list(range(len(prompts)))
        for s in seqs:
            cache.add_sequence(s)
        model.prefill(cache, seqs, prompts)
        q = torch.randn(c.heads, c.head_dim)
        scale = c.head_dim ** -0.5
        nbytes = sum(cache.length(s) for s in seqs) * lay.layer_token_bytes * c.layers
        both, alone = [], []
        for _ in range(rounds * 3):
            t0 = time.perf_counter()
            for layer in range(c.layers):
                for s in seqs:
                    if cache.attend(s, layer, q, scale) is None:  # not fp32: what the model does instead
                        k, v = cache.read(s, layer)
                        model._attend(q.unsqueeze(0), k, v, k.shape[0] - 1)
            both.append(nbytes / (time.perf_counter() - t0) / 1e9)
            t0 = time.perf_counter()
            for layer in range(c.layers):
                for s in seqs:
                    cache.read(s, layer)
            alone.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return Summary.of(both), Summary.of(alone)


def _no_slowdown_overhead(paged: Callable[[Mapping[str, float], DelayInjector | None], tuple[list[float], object]],
                          resolved: ResolvedTierMap, cal: Calibration | None, local: str,
                          rounds: int) -> tuple[float, tuple[float, float], float]:
    """The local tier declared emulated with targets equal to its own speed: the injector charges every read and
    write and settles every layer, but owes nothing. Its run time over the plain run's, the two run in ABBA order
    (which one goes first swaps every round: a run after another is not in the same state as the first)."""
    if cal is None:
        return float("nan"), (float("nan"), float("nan")), float("nan")
    tier = resolved.tier(local)
    spec = replace(tier.spec, emulate=TimingTarget(latency_ratio=1.0, bandwidth_ratio=1.0))
    model = timing_model(spec, "emulated", tier.nodes[0], cal)
    ratios, shares = [], []

    def emulated(injector: DelayInjector) -> tuple[float, float]:
        t0 = time.perf_counter()
        ms, _ = paged({local: 1.0}, injector)
        return sum(ms), time.perf_counter() - t0

    for i in range(rounds):
        injector = DelayInjector([model], cal)
        if i % 2:
            (total, wall), plain = emulated(injector), sum(paged({local: 1.0}, None)[0])
        else:
            plain, (total, wall) = sum(paged({local: 1.0}, None)[0]), emulated(injector)
        ratios.append(total / plain - 1)
        shares.append(injector.audits[local].accounting_ns / 1e9 / wall)
    return statistics.median(ratios), (min(ratios), max(ratios)), statistics.median(shares)
