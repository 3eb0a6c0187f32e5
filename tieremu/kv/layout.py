"""The shape of KV blocks: how many tokens, which layers, and so how many bytes a block moves as one unit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tieremu.errors import KVError
from tieremu.numa.pages import PAGE_SIZE

LAYOUTS = ("all-layers", "per-layer")


@dataclass(frozen=True)
class KVLayout:
    """A block holds K and V of `block_tokens` tokens of one sequence: for every layer (`all-layers`, as vLLM
    and Mooncake transfer them) or for one layer (`per-layer`, as layer-wise offload and prefetch move them).
    The layout decides transfer sizes, which is why it is an experiment parameter."""

    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: torch.dtype = torch.float32
    layout: str = "all-layers"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise KVError(f"KV layout {self.layout!r} is unknown; valid: {', '.join(LAYOUTS)}")
        for name in ("layers", "kv_heads", "head_dim", "block_tokens"):
            if getattr(self, name) <= 0:
                raise KVError(f"KV layout {name} must be positive, got {getattr(self, name)}")
        if self.block_bytes % PAGE_SIZE:
            unit = PAGE_SIZE // _gcd(PAGE_SIZE, self.block_bytes // self.block_tokens)
            raise KVError(
                f"a block of {self.block_tokens} tokens is {self.block_bytes} bytes, not a multiple of the "
                f"{PAGE_SIZE}-byte page, so blocks could not move by page migration; use block_tokens that is a "
                f"multiple of {unit}"
            )

    @property
    def per_layer(self) -> bool:
        return self.layout == "per-layer"

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize  # not torch.empty(0).element_size(): read per block on hot paths

    @property
    def layer_token_bytes(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.itemsize

    @property
    def block_layers(self) -> int:
        return 1 if self.per_layer else self.layers

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.layer_token_bytes * self.block_layers

    @property
    def layer_slice_bytes(self) -> int:
        """What one layer's attention reads of one block: its K and V for every token slot."""
        return self.block_tokens * self.layer_token_bytes

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.block_layers, 2, self.block_tokens, self.kv_heads, self.head_dim)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def describe(self) -> str:
        return (f"{self.layout}, {self.block_tokens} tokens x {self.layers} layers x {self.kv_heads} KV heads x "
                f"{self.head_dim} ({str(self.dtype).removeprefix('torch.')}): {self.block_bytes >> 10} KiB per block")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
