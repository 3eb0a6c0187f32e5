"""What compressed KV costs a decode in accuracy: the error of attention and of the next-token logits against the
same decode over uncompressed K/V.

The decode runs twice in lockstep on one model: over an exact contiguous store (the reference) and over the tiered
cache with its compressed tiers (TierCompression attached). Both are fed the reference's greedy tokens (teacher
forcing), so an error measures what compression did at that step, not a divergence of the generated text that it
compounded; how often the two picked the same next token is reported beside. Every decode step's attention output
(per layer, per sequence) and logits are compared: max and mean absolute error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tieremu.errors import WorkloadError
from tieremu.kv.cache import TieredKVCache
from tieremu.kv.compress_store import TierCompression
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.decode import DecodeSpec, build_prompts
from tieremu.workloads.llama import LlamaModel

if TYPE_CHECKING:
    from tieremu.record.row import MetricRow
    from tieremu.workloads.job import RunContext


@dataclass(frozen=True)
class CompressionAccuracy:
    """Errors against uncompressed attention over one decode run, and how compressed blocks were read."""

    attention_max_abs: float
    attention_mean_abs: float
    logits_max_abs: float
    logits_mean_abs: float
    token_agreement: float  # share of decode steps x sequences whose greedy token equals the reference's
    steps: int
    state: str  # how attention read compressed blocks: `staging` (dequantized into a buffer first)
    slices_compressed: int
    compress_us_per_slice: float
    decompress_us_per_slice: float


@contextmanager
def _recording(model: LlamaModel) -> Iterator[list[torch.Tensor]]:
    """Every attention output the model computes while inside, in call order (one per layer and sequence)."""
    seen: list[torch.Tensor] = []
    attend = model._attend

    def record(*args: object, **kwargs: object) -> torch.Tensor:
        out = attend(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(out.detach().float().clone())
        return out

    model._attend = record  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del model._attend  # back to the class's method


def compression_accuracy(model: LlamaModel, cache: TieredKVCache, spec: DecodeSpec) -> CompressionAccuracy:
    """Decode spec's prompts over `cache` (whose tier map compresses some tier; staged reads forced so that every
    step's attention goes through the model's own kernel, as the reference's does) and over an exact store, in
    lockstep; the errors between them."""
    if not cache.stage:
        raise WorkloadError("compression_accuracy needs a cache built with stage=True: attention must read through "
                            "the staging path at every step for its output to be compared")
    hook = cache.compression if cache.compression is not None else TierCompression.attach(cache)
    if hook is None:
        raise WorkloadError("no tier of this cache's tier map is compressed (compression: fp8, int8 or int4)")
    prompts = build_prompts(spec, model.config.vocab)
    seqs = list(range(len(prompts)))
    reference = ContiguousKV.for_model(model.config, max_len=max(p.numel() for p in prompts) + spec.decode_steps + 1,
                                       dtype=cache.layout.dtype)
    ref_logits = model.prefill(reference, seqs, prompts)
    for seq, prompt in zip(seqs, prompts, strict=True):
        hit = cache.add_sequence(seq, prompt.tolist())  # a shared prefix is reused, compressed, as in run_decode
        model.prefill(cache, [seq], [prompt], start=[min(hit.tokens, prompt.numel() - 1)])
        cache.end_step()
    tokens = ref_logits.argmax(-1)
    lengths = [p.numel() for p in prompts]
    att_max = att_sum = logit_max = logit_sum = 0.0
    att_n = logit_n = agree = 0
    for step in range(spec.decode_steps):
        positions = [n + step for n in lengths]
        with _recording(model) as ref_out:
            want = model.decode_step(reference, seqs, tokens, positions)
        with _recording(model) as got_out:
            got = model.decode_step(cache, seqs, tokens, positions)
        cache.end_step()
        if len(ref_out) != len(got_out):
            raise WorkloadError(f"step {step}: {len(got_out)} attention calls over the cache, {len(ref_out)} over the "
                                "reference; both must attend through the model")
        for a, b in zip(got_out, ref_out, strict=True):
            diff = (a - b).abs()
            att_max, att_sum, att_n = max(att_max, float(diff.max())), att_sum + float(diff.sum()), att_n + diff.numel()
        diff = (got - want).abs()
        logit_max, logit_sum, logit_n = max(logit_max, float(diff.max())), logit_sum + float(diff.sum()), \
            logit_n + diff.numel()
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        tokens = want.argmax(-1)
    stats = hook.stats
    return CompressionAccuracy(att_max, att_sum / max(1, att_n), logit_max, logit_sum / max(1, logit_n),
                               agree / (spec.decode_steps * len(seqs)), spec.decode_steps, hook.state,
                               stats.slices_compressed, stats.compress_us_per_slice, stats.decompress_us_per_slice)


def compression_rows(ctx: RunContext, cache: TieredKVCache, model: LlamaModel, spec: DecodeSpec) -> list[MetricRow]:
    """A decode run's rows about compression, when its cache compressed a tier (none otherwise): how attention read
    compressed blocks (`state`), the kernels' time per layer slice, and the errors against uncompressed KV from one
    lockstep run over a fresh cache with the same tiers, capacities and placement (no emulated delay: it is not
    timed), whose reads are all staged so that every step's attention output can be compared."""
    hook = cache.compression
    if hook is None:
        return []
    with TieredKVCache(cache.resolved, cache.layout, capacities=dict(cache.pool.capacity),
                       placement=cache.pool.placement, device=cache.device, stage=True) as fresh:
        acc = compression_accuracy(model, fresh, spec)
    s = hook.stats
    facets = {"state": hook.state, "formats": s.by_tier}
    return [ctx.row("compress_us_per_slice", s.compress_us_per_slice, "us", "measured", slices=s.slices_compressed,
                    **facets),
            ctx.row("decompress_us_per_slice", s.decompress_us_per_slice, "us", "measured",
                    slices=s.slices_dequantized, restored=s.slices_restored, **facets),
            ctx.row("kv_bytes_saved_on_read", float(s.bytes_saved_on_read), "B", "measured", **facets),
            ctx.row("attention_error_max", acc.attention_max_abs, "abs", "measured", mean=acc.attention_mean_abs,
                    **facets),
            ctx.row("logits_error_max", acc.logits_max_abs, "abs", "measured", mean=acc.logits_mean_abs, **facets),
            ctx.row("token_agreement", acc.token_agreement, "fraction", "measured", steps=acc.steps, **facets)]
