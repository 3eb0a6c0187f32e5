"""A Llama-style decoder in plain torch whose attention reads K and V through a store.

The model is the workload of the KV experiments: RMSNorm, rotary positions (theta 500000), grouped-query
attention and a SwiGLU MLP, with random weights drawn from a fixed seed, so that runs are reproducible without
downloading a checkpoint. Every forward pass writes the K and V of its new positions into a `KVStore` and reads a
sequence's whole history back from it before attending, so the same model runs over contiguous reference
tensors (`ContiguousKV`) and over the paged, tiered cache, with one attention kernel
(`scaled_dot_product_attention`) in both.

Llama 3's long-context rope scaling is left out: with random weights it changes no cost and no figure.

The model runs on one torch device (`device`, default the CPU): weights, activations and the logits it returns live
there, and a store must return K and V on it (the tiered cache stages host blocks to a GPU for this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from tieremu.errors import WorkloadError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# enable_gqa arrived in torch 2.5; older builds get the KV heads expanded instead.
_SDPA_HAS_GQA = torch.__version__ >= "2.5"


class KVStore(Protocol):
    """Where the model keeps K and V: the contiguous reference and the paged tiered cache both implement this."""

    def write(self, seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, kv_heads, head_dim] for positions start .. start+n-1 of sequence seq."""

    def read(self, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every position written so far: [length, kv_heads, head_dim] each (may be a gathered copy),
        on the model's device."""

    def layer_start(self, layer: int) -> None:
        """Called before each layer's attention in every forward pass (hook for access logging, prefetch and
        settling emulated delay); may do nothing."""

    # Optional: attend(seq, layer, q [heads, head_dim], scale) -> [heads, head_dim] | None attends one decode token
    # over the stored K/V in place (None: not possible here, read() is used instead).


@dataclass(frozen=True)
class ModelConfig:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = True
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    max_positions: int = 131072

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_positions"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise WorkloadError(f"model {self.name}: {key}={value!r} must be a positive integer")
        if self.heads % self.kv_heads:
            raise WorkloadError(f"model {self.name}: heads={self.heads} must be a multiple of "
                                f"kv_heads={self.kv_heads} (grouped-query attention shares each KV head)")
        if self.head_dim % 2:
            raise WorkloadError(f"model {self.name}: head_dim={self.head_dim} must be even for rotary positions")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def parameter_count(self) -> int:
        """Parameters implied by the shapes (no allocation), embedding counted once when tied."""
        attention = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim \
            + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attention + mlp + norms) + self.hidden + embeddings

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V one token holds across all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * _itemsize(dtype)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=1024,
                        vocab=1024, max_positions=8192),
    "small": ModelConfig(name="small", layers=8, hidden=1024, heads=16, kv_heads=4, head_dim=64, intermediate=4096,
                         vocab=32000, tied_embeddings=False),
    # Llama-3.2-1B's shapes.
    "1b": ModelConfig(name="1b", layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                      vocab=128256),
}


def preset(name: str) -> ModelConfig:
    """The model shape called name; WorkloadError naming the valid presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise WorkloadError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def parse_dtype(name: str) -> torch.dtype:
    """'float32', 'bfloat16' or 'float16' (or fp32, bf16, fp16) as a torch dtype."""
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise WorkloadError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)} (or {', '.join(_DTYPE_ALIASES)})")
    return DTYPES[key]


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) head_dim, hidden]: one matmul for all three projections
    o: torch.Tensor  # [hidden, heads head_dim]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 intermediate, hidden]: gate rows first, then up
    down: torch.Tensor  # [hidden, intermediate]


@dataclass(frozen=True)
class _Span:
    """One sequence's rows in a packed forward pass: count new tokens from position start, at row offset."""

    seq: int
    start: int
    offset: int
    count: int


class LlamaModel:
    """Random-weight Llama-style decoder; all entry points run under torch.inference_mode."""

    def __init__(self, config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if dtype not in DTYPES.values():
            raise WorkloadError(f"dtype {dtype} is not supported; valid: {', '.join(DTYPES)}")
        self.device = _usable_device(device)
        if self.device.type == "cpu":
            _check_cpu_supports(dtype)
        self.config = config
        self.dtype = dtype
        generator = torch.Generator().manual_seed(seed)
        c = config
        # Scales keep every activation near unit RMS (embedding rows, projections 1/sqrt(fan_in)) and shrink the
        # residual branches by 1/sqrt(2 layers), so deep presets stay finite in bfloat16 and float16.
        branch = 1.0 / math.sqrt(2 * c.layers)
        self.embed = self._random((c.vocab, c.hidden), 1.0 / math.sqrt(c.hidden), generator)
        self.layers = [
            LayerWeights(
                attn_norm=torch.ones(c.hidden, dtype=dtype, device=self.device),
                qkv=self._random(((c.heads + 2 * c.kv_heads) * c.head_dim, c.hidden), c.hidden ** -0.5, generator),
                o=self._random((c.hidden, c.heads * c.head_dim), branch * (c.heads * c.head_dim) ** -0.5, generator),
                mlp_norm=torch.ones(c.hidden, dtype=dtype, device=self.device),
                gate_up=self._random((2 * c.intermediate, c.hidden), c.hidden ** -0.5, generator),
                down=self._random((c.hidden, c.intermediate), branch * c.intermediate ** -0.5, generator),
            )
            for _ in range(c.layers)
        ]
        self.final_norm = torch.ones(c.hidden, dtype=dtype, device=self.device)
        self.lm_head = self.embed if c.tied_embeddings else \
            self._random((c.vocab, c.hidden), c.hidden ** -0.5, generator)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        self._inv_freq = inv_freq.to(self.device, torch.float32)

    def _random(self, shape: tuple[int, int], std: float, generator: torch.Generator) -> torch.Tensor:
        # Drawn in float32 whatever the dtype, so models of one seed differ only by rounding across dtypes; drawn on
        # the CPU whatever the device, so a seed gives the same weights on every device.
        return (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(self.device, self.dtype)

    def parameter_count(self) -> int:
        """Parameters actually allocated (a tied embedding counted once)."""
        tensors = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        tensors += [w for layer in self.layers for w in vars(layer).values()]
        return sum(t.numel() for t in tensors)

    # ---- public entry points -------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, store: KVStore, seqs: Sequence[int], tokens: Sequence[torch.Tensor], *,
                start: Sequence[int] | None = None) -> torch.Tensor:
        """Run each sequence's prompt causally, writing K/V of every computed position; last-position logits.

        tokens[i] is sequence i's whole prompt (1-D LongTensor). With start[i] = P the store already holds the
        first P positions of that sequence (a reused prefix): only positions P.. are computed, attending to the
        stored prefix, and P must leave at least one token to compute. Returns [batch, vocab].
        """
        starts = [0] * len(seqs) if start is None else list(start)
        if not (len(seqs) == len(tokens) == len(starts)) or not seqs:
            raise WorkloadError(f"prefill: seqs ({len(seqs)}), tokens ({len(tokens)}) and start ({len(starts)}) "
                                "must be non-empty and of one length")
        _check_unique(seqs)
        spans, pieces, positions, offset = [], [], [], 0
        for seq, prompt, first in zip(seqs, tokens, starts, strict=True):
            if prompt.dim() != 1:
                raise WorkloadError(f"prefill: sequence {seq}'s tokens have shape {tuple(prompt.shape)}; "
                                    "a prompt is a 1-D LongTensor")
            if not 0 <= first < prompt.numel():
                raise WorkloadError(f"prefill: sequence {seq} start={first} must be in 0..{prompt.numel() - 1} "
                                    f"(its prompt has {prompt.numel()} tokens and one must be left to compute)")
            count = prompt.numel() - first
            spans.append(_Span(seq=seq, start=first, offset=offset, count=count))
            pieces.append(prompt[first:])
            positions.append(torch.arange(first, prompt.numel()))
            offset += count
        return self._forward(store, spans, torch.cat(pieces), torch.cat(positions))

    @torch.inference_mode()
    def decode_step(self, store: KVStore, seqs: Sequence[int], tokens: torch.Tensor,
                    positions: Sequence[int]) -> torch.Tensor:
        """One new token per sequence at its position (= its length so far); returns logits [batch, vocab]."""
        if tokens.dim() != 1 or not (tokens.numel() == len(seqs) == len(positions)) or not seqs:
            raise WorkloadError(f"decode_step: tokens of shape {tuple(tokens.shape)}, {len(seqs)} seqs and "
                                f"{len(positions)} positions; want one token and one position per sequence")
        _check_unique(seqs)
        spans = [_Span(seq=seq, start=int(p), offset=i, count=1) for i, (seq, p) in enumerate(zip(seqs, positions,
                                                                                                  strict=True))]
        return self._forward(store, spans, tokens, torch.tensor([int(p) for p in positions]))

    @torch.inference_mode()
    def greedy(self, store: KVStore, seqs: Sequence[int], prompts: Sequence[torch.Tensor],
               steps: int) -> torch.Tensor:
        """Prefill, then pick the most likely token steps times; the generated tokens [batch, steps]."""
        if steps < 1:
            raise WorkloadError(f"greedy: steps={steps} must be at least 1")
        logits = self.prefill(store, seqs, prompts)
        generated = [logits.argmax(dim=-1)]
        lengths = [prompt.numel() for prompt in prompts]
        for step in range(steps - 1):
            logits = self.decode_step(store, seqs, generated[-1], [n + step for n in lengths])
            generated.append(logits.argmax(dim=-1))
        return torch.stack(generated, dim=1)

    @torch.inference_mode()
    def reference_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of every position [len, vocab] from one causal pass with no store and textbook attention."""
        self._check_tokens(tokens)
        c = self.config
        positions = torch.arange(tokens.numel())
        self._check_positions(positions)
        cos, sin = self._rope(positions)
        x = F.embedding(tokens.to(self.device), self.embed)
        causal = torch.ones(tokens.numel(), tokens.numel(), dtype=torch.bool, device=self.device).tril()
        for layer in self.layers:
            q, k, v = self._project_qkv(layer, x, cos, sin)
            # Explicit softmax(QK^T)V with KV heads repeated: independent of the kernel paths under test.
            k = k.repeat_interleave(c.group, dim=1)
            v = v.repeat_interleave(c.group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(c.head_dim)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            attended = torch.einsum("hqk,khd->qhd", weights, v.float()).to(self.dtype)
            x = x + F.linear(attended.flatten(1), layer.o)
            x = x + self._mlp(layer, x)
        return F.linear(self._norm(x, self.final_norm), self.lm_head).float()

    # ---- the forward pass ----------------------------------------------------------------------------------

    def _forward(self, store: KVStore, spans: list[_Span], tokens: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """All spans' new tokens packed in rows: projections and MLP batched, attention per sequence."""
        self._check_tokens(tokens)
        self._check_positions(positions)
        cos, sin = self._rope(positions)
        x = F.embedding(tokens.to(self.device), self.embed)
        # A store may attend for a decode token itself, over its K/V where they lie (the paged cache's C kernel).
        attend = getattr(store, "attend", None)
        scale = 1 / math.sqrt(self.config.head_dim)
        for index, layer in enumerate(self.layers):
            q, k, v = self._project_qkv(layer, x, cos, sin)
            store.layer_start(index)
            attended = torch.empty_like(q)
            for span in spans:
                rows = slice(span.offset, span.offset + span.count)
                store.write(span.seq, index, span.start, k[rows], v[rows])
                if span.count == 1 and attend is not None:
                    out = attend(span.seq, index, q[span.offset], scale)
                    if out is not None:
                        attended[span.offset] = out
                        continue
                keys, values = store.read(span.seq, index)
                if keys.device != q.device:
                    raise WorkloadError(f"sequence {span.seq} layer {index}: the store returned K/V on {keys.device}, "
                                        f"the model runs on {q.device}; give the store the model's device")
                if keys.shape[0] != span.start + span.count:
                    raise WorkloadError(
                        f"sequence {span.seq} layer {index}: the store holds {keys.shape[0]} positions after "
                        f"{span.count} written at position {span.start}; the position of a sequence's first new "
                        f"token must equal its length so far")
                attended[rows] = self._attend(q[rows], keys, values, span.start)
            x = x + F.linear(attended.flatten(1), layer.o)
            x = x + self._mlp(layer, x)
        last = torch.tensor([span.offset + span.count - 1 for span in spans], device=self.device)
        return F.linear(self._norm(x[last], self.final_norm), self.lm_head).float()

    def _project_qkv(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, heads, head_dim] and k, v [n, kv_heads, head_dim], rotary positions applied to q and k."""
        c = self.config
        qkv = F.linear(self._norm(x, layer.attn_norm), layer.qkv).unflatten(1, (-1, c.head_dim))
        q, k, v = qkv.split([c.heads, c.kv_heads, c.kv_heads], dim=1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """q [n, heads, d] for positions start.. against keys/values [start+n, kv_heads, d]; [n, heads, d]."""
        c = self.config
        n = q.shape[0]
        k = keys.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, length, d]
        v = values.transpose(0, 1).unsqueeze(0)
        if n == 1:
            # One query sees every key, so each KV head's query group can ride as rows of one head: no KV
            # expansion and no mask (about twice as fast on CPU as enable_gqa for decode).
            grouped = q.reshape(1, c.kv_heads, c.group, c.head_dim)
            return F.scaled_dot_product_attention(grouped, k, v).reshape(1, c.heads, c.head_dim)
        if not _SDPA_HAS_GQA:
            k = k.repeat_interleave(c.group, dim=1)
            v = v.repeat_interleave(c.group, dim=1)
        gqa = {"enable_gqa": True} if _SDPA_HAS_GQA else {}
        query = q.transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if start == 0:
            out = F.scaled_dot_product_attention(query, k, v, is_causal=True, **gqa)
        else:
            # is_causal aligns the mask top-left; with a stored prefix, query i sits at position start + i.
            rows, cols = torch.arange(n, device=q.device), torch.arange(start + n, device=q.device)
            visible = cols <= (start + rows).unsqueeze(1)
            out = F.scaled_dot_product_attention(query, k, v, attn_mask=visible, **gqa)
        return out.squeeze(0).transpose(0, 1)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(self._norm(x, layer.mlp_norm), layer.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # In float32 as Llama does: the mean of squares loses too much in 16-bit types.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.config.norm_eps)
        return normed.to(self.dtype) * weight

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, 1, head_dim] (half-split layout, as Hugging Face Llama) in float32."""
        angles = positions.to(self.device, torch.float32).unsqueeze(1) * self._inv_freq
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        first, second = x32.chunk(2, dim=-1)
        return (x32 * cos + torch.cat([-second, first], dim=-1) * sin).to(self.dtype)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dtype != torch.long or tokens.dim() != 1 or tokens.numel() == 0:
            raise WorkloadError(f"tokens must be a non-empty 1-D LongTensor, got {tokens.dtype} of shape "
                                f"{tuple(tokens.shape)}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab:
            raise WorkloadError(f"token ids {low}..{high} fall outside the vocabulary 0..{self.config.vocab - 1}")

    def _check_positions(self, positions: torch.Tensor) -> None:
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= self.config.max_positions:
            raise WorkloadError(f"positions {low}..{high} fall outside 0..{self.config.max_positions - 1} "
                                f"(model {self.config.name}'s max_positions)")


def with_overrides(config: ModelConfig, **changes: object) -> ModelConfig:
    """A preset with some shapes changed (e.g. layers=4), validated like any config."""
    unknown = set(changes) - set(vars(config))
    if unknown:
        raise WorkloadError(f"unknown model keys {sorted(unknown)}; valid: {', '.join(vars(config))}")
    return replace(config, **changes)


def _check_unique(seqs: Sequence[int]) -> None:
    if len(set(seqs)) != len(seqs):
        raise WorkloadError(f"sequence ids {list(seqs)} repeat; each sequence may appear once per forward pass")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _usable_device(device: torch.device | str) -> torch.device:
    """The device as torch names it, refused with what is available when this machine has no such device."""
    try:
        dev = torch.device(device)
    except RuntimeError as error:
        raise WorkloadError(f"device {device!r} is not a torch device ({error}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise WorkloadError(f"device {device!r}: no CUDA device here (torch.cuda.is_available() is False); "
                                "use cpu")
        if dev.index is not None and dev.index >= count:
            raise WorkloadError(f"device {device!r}: this machine has CUDA devices 0..{count - 1}")
        if dev.index is None:  # `cuda` is the current device; named, so it compares equal to its tensors' device
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise WorkloadError(f"device {device!r}: only cpu and cuda devices are supported")
    return dev


def _check_cpu_supports(dtype: torch.dtype) -> None:
    """Refuse a dtype whose matmul or attention this torch build cannot run on CPU (float16 on old builds)."""
    try:
        x = torch.ones(2, 4, dtype=dtype)
        F.linear(x, torch.ones(4, 4, dtype=dtype))
        q = torch.ones(1, 1, 2, 4, dtype=dtype)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as error:
        raise WorkloadError(f"dtype {dtype} is not supported by this torch build on CPU ({error}); "
                            "use float32 or bfloat16") from None
