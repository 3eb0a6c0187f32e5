"""Every block read, per decode step and layer: what policies learn from and what per-tier metrics count.

Appends are whole arrays per read (one call per sequence and layer), so leaving the log on costs a few
microseconds per layer, not per block. The log keeps three lists: per chunk (one read of a sequence's blocks at one
layer) its step, layer, sequence and length as four ints in one flat list, its block ids, and its tier indexes; a
reader takes a range of chunks as lists it can concatenate in one call (the migration daemon packs them for its
compiled counter, tieremu/native/counts.c, every epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Accesses:
    """A slice of the log as columns."""

    step: np.ndarray  # int64
    layer: np.ndarray  # int32
    seq: np.ndarray  # int64
    block: np.ndarray  # int64, Block.id
    tier: np.ndarray  # int16, index into the cache's tier order

    def __len__(self) -> int:
        return len(self.block)


@dataclass(frozen=True)
class Chunks:
    """A range of the log's chunks as they are kept: `meta` is (step, layer, seq, length) of each chunk in turn,
    flat; `block` and `tier` are the chunks' arrays of block ids and tier indexes."""

    meta: list[int]
    block: list[np.ndarray]
    tier: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.block)


class AccessLog:
    def __init__(self) -> None:
        self._meta: list[int] = []  # per chunk: step, layer, seq, length
        self._block: list[np.ndarray] = []
        self._tier: list[np.ndarray] = []
        self._count = 0

    def record(self, step: int, layer: int, seq: int, blocks: np.ndarray, tiers: np.ndarray) -> None:
        # Some reads record outside the cache's lock (its attention kernel): a reader in another thread may come
        # between these lines. The tier list is appended last and is what `mark` counts, so a chunk is seen only
        # once it is whole; `len()` may lag a chunk behind `mark` for a moment.
        n = len(blocks)
        self._meta += (step, layer, seq, n)
        self._block.append(blocks)
        self._tier.append(tiers)
        self._count += n

    def __len__(self) -> int:
        return self._count

    @property
    def mark(self) -> int:
        """A position to read from later with since() or chunks(): the chunks recorded whole so far."""
        return len(self._tier)

    def chunks(self, start: int = 0, end: int | None = None) -> Chunks:
        """Chunks start..end (end: the log's mark now). The lists only grow and a chunk's tiers are appended last,
        so a range up to a mark is whole even while another thread records."""
        mark = len(self._tier)
        end = mark if end is None else min(end, mark)
        return Chunks(self._meta[4 * start:4 * end], self._block[start:end], self._tier[start:end])

    def since(self, mark: int = 0, end: int | None = None) -> Accesses:
        """The reads of chunks mark..end (end: the log's mark now), one row per block read."""
        chunks = self.chunks(mark, end)
        if not len(chunks):
            empty = np.empty(0, dtype=np.int64)
            return Accesses(empty, empty.astype(np.int32), empty, empty, empty.astype(np.int16))
        meta = np.array(chunks.meta, dtype=np.int64).reshape(-1, 4)
        sizes = meta[:, 3]
        return Accesses(
            step=np.repeat(meta[:, 0], sizes),
            layer=np.repeat(meta[:, 1].astype(np.int32), sizes),
            seq=np.repeat(meta[:, 2], sizes),
            block=np.concatenate(chunks.block).astype(np.int64, copy=False),
            tier=np.concatenate(chunks.tier).astype(np.int16, copy=False),
        )
