"""The recompute path: a block's KV really computed by a small Llama-style model's prefill over its 512 tokens.

In execute-mode replay (tieremu.workloads.execute) a missing block is written from seeded noise, a stand-in
for prefill that costs a copy. Between instances that would make recomputing always cheaper than pulling, so here
a missing block is computed: its tokens are drawn from its hash id, the model (tieremu.workloads.llama, random
weights from a fixed seed, one layer) runs a causal prefill over them, and the block holds the K and V it wrote,
in the block layout's dtype. Every instance computes the same bytes for the same hash id (same weights, same
shapes, one torch thread), which is what makes an end-to-end checksum of a pulled block meaningful.

Simplification: each block is prefilled on its own (positions 0..511), not attending to the blocks before it
in its request; the cost per block is then the same wherever it sits in a prompt.
"""

from __future__ import annotations

import torch

from tieremu.cluster.wire import digest
from tieremu.errors import ConfigError
from tieremu.kv.layout import KVLayout
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.llama import LlamaModel, ModelConfig

VOCAB = 256


def prefill_model(layout: KVLayout) -> LlamaModel:
    """The model whose K and V fill exactly one block of `layout` per 512 tokens."""
    if layout.per_layer or layout.head_dim % 2:
        raise ConfigError(f"cluster replay needs an all-layers block layout with an even head size; got "
                          f"{layout.describe()}")
    heads = layout.kv_heads
    config = ModelConfig(name="cluster-prefill", layers=layout.layers, hidden=heads * layout.head_dim, heads=heads,
                         kv_heads=layout.kv_heads, head_dim=layout.head_dim, intermediate=2 * heads * layout.head_dim,
                         vocab=VOCAB, max_positions=layout.block_tokens)
    return LlamaModel(config, seed=0)


class PrefillData:
    """`of(key)`: the block of hash id `key`, computed by the prefill model (real compute, deterministic)."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.model = prefill_model(layout)

    def tokens(self, key: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(key & ((1 << 63) - 1))
        return torch.randint(0, VOCAB, (self.layout.block_tokens,), generator=generator)

    def of(self, key: int) -> torch.Tensor:
        layout = self.layout
        store = ContiguousKV(layout.layers, layout.kv_heads, layout.head_dim, max_len=layout.block_tokens)
        self.model.prefill(store, [0], [self.tokens(key)])
        layers = [torch.stack(store.read(0, layer)) for layer in range(layout.layers)]  # [2, tokens, heads, dim]
        return torch.stack(layers).to(layout.dtype).view(layout.block_shape)


def tensor_digest(data: torch.Tensor) -> bytes:
    """The end-to-end checksum (tieremu.cluster.wire.digest) of a block held as a tensor."""
    return digest(data.contiguous().view(torch.uint8).numpy().tobytes())
