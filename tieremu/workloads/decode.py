"""A real decode run over the tiered KV cache: prompts with a shared prefix prefilled one request at a time (the
time to first token of each), then batched decode steps (the time per output token), with every KV byte read
counted per tier (per decode step and in all), the emulated delay paid and audited, what file tiers really read and
wrote (bytes and seconds of real I/O), and the kernel asked where the blocks are at start and end.

The model and the cache share one device: on a GPU, K/V of host tiers are staged across every step (counted per tier
in `kv_bytes_staged`), and every timed region ends by waiting for the GPU, so a time is the work's, not its launch's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from tieremu.errors import WorkloadError
from tieremu.kv.arena import FileIO
from tieremu.kv.cache import TieredKVCache, TierPlacement
from tieremu.workloads.llama import LlamaModel


@dataclass(frozen=True)
class DecodeSpec:
    batch: int = 4
    prompt_tokens: int = 512  # mean prompt length; each differs by up to +-25% (seeded)
    shared_prefix_tokens: int = 256  # a system prompt every request starts with (prefix reuse)
    decode_steps: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_tokens", "decode_steps"):
            if getattr(self, name) < 1:
                raise WorkloadError(f"decode: {name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.shared_prefix_tokens < self.prompt_tokens * 3 // 4:
            raise WorkloadError(f"decode: shared_prefix_tokens={self.shared_prefix_tokens} must be 0 or more and "
                                f"below 3/4 of prompt_tokens ({self.prompt_tokens * 3 // 4}) so every prompt "
                                "keeps tokens of its own")


@dataclass
class DecodeResult:
    ttft_s: list[float]  # per request: its prefill, computed after reusing any resident prefix
    tpot_s: list[float]  # per decode step of the whole batch (each sequence gains one token per step)
    prefix_tokens: list[int]  # per request: prompt tokens served from resident blocks
    prefix_blocks_by_tier: dict[str, int]
    kv_bytes_read: dict[str, int]  # during decode, per tier
    kv_bytes_per_token: dict[str, float]  # during decode, per generated token, per tier
    injected_s: float  # emulated delay paid during the whole run
    accounting_s: float  # the injector's own bookkeeping time
    placement_start: list[TierPlacement]
    placement_end: list[TierPlacement]
    generated: torch.Tensor  # [batch, decode_steps + 1] greedy tokens
    wall_s: float = 0.0
    moves: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    kv_bytes_staged: dict[str, int] = field(default_factory=dict)  # during decode, per source tier: host -> device
    kv_bytes_read_by_step: list[dict[str, int]] = field(default_factory=list)  # per decode step, per tier
    file_io: dict[str, FileIO] = field(default_factory=dict)  # during decode, per file tier: the real I/O

    @property
    def tokens_per_s(self) -> float:
        return len(self.ttft_s) * len(self.tpot_s) / sum(self.tpot_s) if self.tpot_s else 0.0


def build_prompts(spec: DecodeSpec, vocab: int) -> list[torch.Tensor]:
    """Seeded prompts: one shared prefix, then each request's own tokens, lengths within +-25% of the mean."""
    g = torch.Generator().manual_seed(spec.seed)
    prefix = torch.randint(0, vocab, (spec.shared_prefix_tokens,), generator=g)
    prompts = []
    for _ in range(spec.batch):
        jitter = int(torch.randint(-spec.prompt_tokens // 4, spec.prompt_tokens // 4 + 1, (1,), generator=g))
        own = max(1, spec.prompt_tokens + jitter - spec.shared_prefix_tokens)
        prompts.append(torch.cat([prefix, torch.randint(0, vocab, (own,), generator=g)]))
    return prompts


def run_decode(model: LlamaModel, cache: TieredKVCache, spec: DecodeSpec, *,
               on_step: Callable[[int], None] | None = None) -> DecodeResult:
    """Prefill every request (sequentially, reusing resident prefixes), then decode the batch for decode_steps.
    `on_step(step)` runs between steps, outside the timed region (for tests that migrate blocks mid-decode)."""
    if model.device != cache.device:
        raise WorkloadError(f"the model runs on {model.device} but the KV cache returns K/V on {cache.device}; "
                            "build both for one device")
    sync = _synchronizer(model.device)
    prompts = build_prompts(spec, model.config.vocab)
    seqs = list(range(len(prompts)))
    audits0 = _audit_totals(cache)
    t_start = time.perf_counter()
    ttft, reused, first = [], [], []
    for seq, prompt in zip(seqs, prompts, strict=True):
        t0 = time.perf_counter()
        hit = cache.add_sequence(seq, prompt.tolist())
        start = min(hit.tokens, prompt.numel() - 1)
        if start < hit.tokens:  # the whole prompt was resident: recompute its last token (it owns no block)
            raise WorkloadError("a prompt made only of reused full blocks is not supported; add own tokens")
        logits = model.prefill(cache, [seq], [prompt], start=[start])
        cache.end_step()
        sync()
        ttft.append(time.perf_counter() - t0)
        reused.append(hit.tokens)
        first.append(int(logits.argmax(-1)[0]))
    placement_start = cache.verify()
    read0 = _bytes_read(cache)
    staged0 = {t: s.bytes_staged for t, s in cache.stats.traffic.items()}
    io0 = cache.file_io()
    by_step, before = [], read0
    tokens = torch.tensor(first)
    generated = [tokens]
    lengths = [p.numel() for p in prompts]
    tpot = []
    for step in range(spec.decode_steps):
        if on_step is not None:
            on_step(step)
        t0 = time.perf_counter()
        logits = model.decode_step(cache, seqs, tokens, [n + step for n in lengths])
        cache.end_step()
        sync()
        tpot.append(time.perf_counter() - t0)
        now = _bytes_read(cache)
        by_step.append({t: b - before[t] for t, b in now.items()})
        before = now
        tokens = logits.argmax(-1).cpu()  # the generated tokens are kept on the host (a no-op on CPU)
        generated.append(tokens)
    wall = time.perf_counter() - t_start
    read = {t: s.bytes_read - read0[t] for t, s in cache.stats.traffic.items()}
    injected, accounting = (a - b for a, b in zip(_audit_totals(cache), audits0, strict=True))
    out_tokens = spec.decode_steps * len(seqs)
    return DecodeResult(
        ttft_s=ttft, tpot_s=tpot, prefix_tokens=reused,
        prefix_blocks_by_tier={t: s.prefix_blocks for t, s in cache.stats.traffic.items()},
        kv_bytes_read=read, kv_bytes_per_token={t: b / out_tokens for t, b in read.items()},
        injected_s=injected, accounting_s=accounting, placement_start=placement_start,
        placement_end=cache.verify(), generated=torch.stack(generated, dim=1), wall_s=wall,
        moves=len(cache.pool.moves),
        kv_bytes_staged={t: s.bytes_staged - staged0[t] for t, s in cache.stats.traffic.items()},
        kv_bytes_read_by_step=by_step,
        file_io={t: _io_delta(io, io0[t]) for t, io in cache.file_io().items()},
    )


def _bytes_read(cache: TieredKVCache) -> dict[str, int]:
    return {t: s.bytes_read for t, s in cache.stats.traffic.items()}


def _io_delta(after: FileIO, before: FileIO) -> FileIO:
    delta = FileIO(direct=after.direct)
    for f in fields(FileIO):
        if f.name != "direct":
            setattr(delta, f.name, getattr(after, f.name) - getattr(before, f.name))
    return delta


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """What ends a timed region: waiting for the GPU's queued work there; nothing on the CPU (work is done when
    the call returns)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _audit_totals(cache: TieredKVCache) -> tuple[float, float]:
    if cache.injector is None:
        return 0.0, 0.0
    audits = cache.injector.audits.values()
    return sum(a.injected_ns for a in audits) / 1e9, sum(a.accounting_ns for a in audits) / 1e9
