"""Every block read, per decode step and layer: what policies learn from and what per-tier metrics count.

Appends are whole arrays per read (one call per sequence and layer), so leaving the log on costs a few
microseconds per layer, not per block.
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
    """A range of the log's chunks (each one read of a sequence's blocks at one layer) as three arrays: `meta` is
    (step, layer, seq, length) per chunk (int64, shape [chunks, 4]); `block` (int64) and `tier` (int16) are the
    chunks' reads back to back in log order. What a compiled reader takes (tieremu/native/counts.c)."""

    meta: np.ndarray
    block: np.ndarray
    tier: np.ndarray


class AccessLog:
    def __init__(self) -> None:
        self._chunks: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []
        self._count = 0

    def record(self, step: int, layer: int, seq: int, blocks: np.ndarray, tiers: np.ndarray) -> None:
        self._chunks.append((step, layer, seq, blocks, tiers))
        self._count += len(blocks)

    def __len__(self) -> int:
        return self._count

    @property
    def mark(self) -> int:
        """A position to read from later with since()."""
        return len(self._chunks)

    def chunks(self, start: int = 0, end: int | None = None) -> Chunks:
        """Chunks start..end (end: the log's mark now) as contiguous arrays (see Chunks)."""
        chunks = self._chunks[start:end]
        if not chunks:
            return Chunks(np.empty((0, 4), dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int16))
        return Chunks(np.array([(c[0], c[1], c[2], len(c[3])) for c in chunks], dtype=np.int64),
                      np.concatenate([c[3] for c in chunks]).astype(np.int64, copy=False),
                      np.concatenate([c[4] for c in chunks]).astype(np.int16, copy=False))

    def since(self, mark: int = 0) -> Accesses:
        chunks = self._chunks[mark:]
        if not chunks:
            empty = np.empty(0, dtype=np.int64)
            return Accesses(empty, empty.astype(np.int32), empty, empty, empty.astype(np.int16))
        sizes = [len(c[3]) for c in chunks]
        return Accesses(
            step=np.repeat(np.array([c[0] for c in chunks], dtype=np.int64), sizes),
            layer=np.repeat(np.array([c[1] for c in chunks], dtype=np.int32), sizes),
            seq=np.repeat(np.array([c[2] for c in chunks], dtype=np.int64), sizes),
            block=np.concatenate([c[3] for c in chunks]).astype(np.int64, copy=False),
            tier=np.concatenate([c[4] for c in chunks]).astype(np.int16, copy=False),
        )
