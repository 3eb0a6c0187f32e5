"""The runner's engine job (`kind: engine`): a Mooncake trace replayed against vLLM's CPU build with tieremu's
tiered KV connector, under each policy of the spec, with the all-fastest / all-slowest bounds beside them (the
runner adds those; in the store a bound's tier may hold every block of the map).

    jobs:
      - kind: engine
        trace: ../../traces/mooncake_synthetic_trace.jsonl
        max_requests: 50
        block_tokens: 64
        kv_tier: dram
        policies: [lru]
        serve: false   # true: on vLLM's OpenAI server, started for each run and stopped after it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tieremu.configfile import Section, positive
from tieremu.errors import WorkloadError
from tieremu.record.row import MetricRow
from tieremu.workloads.job import Job, RunContext

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class EngineParams:
    trace: str
    max_requests: int | None
    block_tokens: int
    model: str | None
    kv_tier: str | None
    dtype: str
    time_scale: float
    timeout_s: float
    max_output_tokens: int | None = None
    serve: bool = False


class EngineJob(Job):
    kind = "engine"
    takes_policies = True
    input_files = ("trace",)  # the trace's contents are part of every run id (--resume never reuses a stale run)

    @classmethod
    def parse(cls, section: Section) -> EngineParams:
        trace = section.relative_path(section.get("trace", str))
        if not trace.is_file():
            raise section.error("trace", f"{trace}: no such trace file")
        model = section.get("model", str, None)
        if model is not None:
            model = str(section.relative_path(model))
        params = EngineParams(
            trace=str(trace), max_requests=section.get("max_requests", int, None, check=positive),
            block_tokens=section.get("block_tokens", int, 512, check=positive), model=model,
            kv_tier=section.get("kv_tier", str, None), dtype=section.get("dtype", str, "float32", choices=DTYPES),
            time_scale=section.get("time_scale", float, 0.2, check=positive),
            timeout_s=section.get("timeout_s", float, 900.0, check=positive),
            max_output_tokens=section.get("max_output_tokens", int, None, check=positive),
            serve=section.get("serve", bool, False))
        section.done()
        return params

    @classmethod
    def validate(cls, params: EngineParams, tier_map: object) -> tuple[str, str] | None:
        names = getattr(tier_map, "names", ())
        if params.kv_tier is not None and params.kv_tier not in names:
            return "kv_tier", f"{params.kv_tier!r} is not a tier of the map; tiers: {', '.join(names)}"
        return None

    @classmethod
    def run(cls, params: EngineParams, ctx: RunContext) -> list[MetricRow]:
        from tieremu.engines.replay import EngineReplayConfig, engine_replay
        from tieremu.workloads.trace import read_trace

        source = ctx.resolved.tier_map.source
        if source is None:
            raise WorkloadError("engine job: the tier map has no file, and the engine's connector reads it from one")
        requests = read_trace(params.trace)[:params.max_requests]
        r = engine_replay(EngineReplayConfig(
            trace_requests=requests, tiers=Path(source), policy=ctx.policy or "all-fastest",
            model=None if params.model is None else Path(params.model), kv_tier=params.kv_tier,
            block_tokens=params.block_tokens, dtype=params.dtype, time_scale=params.time_scale,
            timeout_s=params.timeout_s, max_output_tokens=params.max_output_tokens, serve=params.serve))
        rows = [ctx.row("ttft_ms", v, "ms", r.origin, sample=i) for i, v in enumerate(r.ttft_samples_ms)]
        rows += [ctx.row("tpot_ms", v, "ms", r.origin, sample=i) for i, v in enumerate(r.tpot_samples_ms)]
        rows.append(ctx.row("tokens_per_s", r.tokens_per_s, "tokens/s", r.origin))
        rows.append(ctx.row("computed_prompt_tokens", r.computed_prompt_tokens, "tokens", r.origin))
        rows.append(ctx.row("loaded_tokens", r.loaded_tokens, "tokens", r.origin))
        hits = r.connector.get("hits_by_tier", {})
        assert isinstance(hits, dict)
        total = sum(hits.values())
        for tier, n in hits.items():
            rows.append(ctx.row("hit_blocks", n, "blocks", r.origin, tier=tier))
            rows.append(ctx.row("hit_ratio", n / total if total else 0.0, "fraction", r.origin, tier=tier,
                                of="blocks loaded by the connector"))
        for metric in ("stored_blocks", "loaded_blocks"):
            rows.append(ctx.row(metric, float(r.connector.get(metric, 0)), "blocks", r.origin))
        if r.kv_placement is not None:
            rows.append(ctx.row("kv_tensor_on_node", float(r.kv_placement["achieved_fraction"]), "fraction",
                                "measured", tier=params.kv_tier, node=r.kv_placement["requested_node"]))
            reads = r.kv_placement.get("attention_reads")
            if isinstance(reads, dict):  # an emulated KV tier: its attention reads charged by the timing model
                rows.append(ctx.row("kv_tier_attention_owed_ms", float(reads["owed_ms"]), "ms", "emulated",
                                    tier=params.kv_tier, of="vLLM's attention reads of its KV tensor (modelled)"))
        return rows
