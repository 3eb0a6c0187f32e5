"""The reference KV store: each sequence's K and V in preallocated contiguous tensors.

This is what serving without paging looks like, and what the paged tiered cache is held against: its
attention output must match this store's, and its decode must stay within 1.3x of this store's speed. Reads
return views (no copy), so nothing here costs more than the attention itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tieremu.errors import KVError
from tieremu.workloads.llama import ModelConfig


@dataclass
class _SequenceKV:
    keys: torch.Tensor  # [layers, max_len, kv_heads, head_dim]
    values: torch.Tensor  # [layers, max_len, kv_heads, head_dim]
    lengths: list[int]  # positions held, per layer


class ContiguousKV:
    """A KVStore keeping, per sequence and layer, K and V as [max_len, kv_heads, head_dim] tensors.

    A sequence's tensors are allocated (and zero-filled, so no page fault lands in a timed step) at its first
    write, which must start at position 0. Writing at a position below a layer's length rewinds it: positions
    after the written ones are forgotten.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, max_len: int,
                 dtype: torch.dtype = torch.float32) -> None:
        for key, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim), ("max_len", max_len)):
            if value < 1:
                raise KVError(f"ContiguousKV: {key}={value} must be at least 1")
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self._sequences: dict[int, _SequenceKV] = {}

    @classmethod
    def for_model(cls, config: ModelConfig, *, max_len: int, dtype: torch.dtype = torch.float32) -> ContiguousKV:
        return cls(config.layers, config.kv_heads, config.head_dim, max_len=max_len, dtype=dtype)

    # ---- the KVStore interface ----------------------------------------------------------------------------

    def write(self, seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_layer(layer)
        self._check_block(seq, k, v)
        n = k.shape[0]
        entry = self._sequences.get(seq)
        if entry is None:
            if start != 0:
                raise KVError(f"sequence {seq} is new, so its first write must start at position 0, not {start}")
            entry = self._allocate(seq)
        length = entry.lengths[layer]
        if not 0 <= start <= length:
            raise KVError(f"sequence {seq} layer {layer}: write at position {start} would leave a gap; "
                          f"valid starts are 0..{length} (its length)")
        if start + n > self.max_len:
            raise KVError(f"sequence {seq} layer {layer}: positions {start}..{start + n - 1} exceed "
                          f"max_len={self.max_len}")
        entry.keys[layer, start:start + n].copy_(k)
        entry.values[layer, start:start + n].copy_(v)
        entry.lengths[layer] = start + n

    def read(self, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        entry = self._entry(seq)
        length = entry.lengths[layer]
        return entry.keys[layer, :length], entry.values[layer, :length]

    def layer_start(self, layer: int) -> None:
        """Nothing to log, prefetch or settle: the reference store sits in local memory."""

    # ---- bookkeeping --------------------------------------------------------------------------------------

    @property
    def sequences(self) -> tuple[int, ...]:
        return tuple(self._sequences)

    def length(self, seq: int, layer: int = 0) -> int:
        """Positions held for seq in layer."""
        self._check_layer(layer)
        return self._entry(seq).lengths[layer]

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give target (new or rewound) the first length positions of source in every layer: a shared prefix."""
        entry = self._entry(source)
        shortest = min(entry.lengths)
        if not 0 < length <= shortest:
            raise KVError(f"copy_prefix: length={length} must be in 1..{shortest} (positions sequence {source} "
                          "holds in every layer)")
        destination = self._sequences.get(target) or self._allocate(target)
        destination.keys[:, :length].copy_(entry.keys[:, :length])
        destination.values[:, :length].copy_(entry.values[:, :length])
        destination.lengths = [length] * self.layers

    def free(self, seq: int) -> None:
        self._entry(seq)
        del self._sequences[seq]

    def nbytes(self) -> int:
        """Bytes allocated for K and V over all sequences (at max_len each)."""
        return sum(e.keys.nbytes + e.values.nbytes for e in self._sequences.values())

    def _allocate(self, seq: int) -> _SequenceKV:
        shape = (self.layers, self.max_len, self.kv_heads, self.head_dim)
        entry = _SequenceKV(keys=torch.zeros(shape, dtype=self.dtype), values=torch.zeros(shape, dtype=self.dtype),
                            lengths=[0] * self.layers)
        self._sequences[seq] = entry
        return entry

    def _entry(self, seq: int) -> _SequenceKV:
        try:
            return self._sequences[seq]
        except KeyError:
            known = sorted(self._sequences)
            shown = ", ".join(map(str, known[:10])) + (" ..." if len(known) > 10 else "")
            raise KVError(f"unknown sequence {seq}; sequences held: {shown or 'none'}") from None

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.layers:
            raise KVError(f"layer {layer} out of range; valid layers are 0..{self.layers - 1}")

    def _check_block(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        expected = (self.kv_heads, self.head_dim)
        for name, tensor in (("k", k), ("v", v)):
            if tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected or tensor.shape[0] == 0:
                raise KVError(f"sequence {seq}: {name} has shape {tuple(tensor.shape)}; want [n >= 1, "
                              f"{self.kv_heads}, {self.head_dim}]")
            if tensor.dtype != self.dtype:
                raise KVError(f"sequence {seq}: {name} is {tensor.dtype}, the store holds {self.dtype}")
        if k.shape[0] != v.shape[0]:
            raise KVError(f"sequence {seq}: k holds {k.shape[0]} positions but v holds {v.shape[0]}")
