"""What a tier's `compression` does to a replay's accounting: blocks per tier and the rate a hit is read at.

A replay's blocks are abstract (`--block-mib` of KV each), so a tier's ratio is its format's on the reference block
(compress.REFERENCE_SHAPE). A tier given in bytes (capacity_mib) holds ratio-times more blocks when compressed; a hit
there reads the compressed bytes at the tier's rate and then pays the dequantization, measured by the compiled kernel
(compress.decompress_gbps), so its effective read rate is 1 / (1 / (ratio x rate) + 1 / decompress rate).

A move into or out of a compressed tier (a demotion into it, a promotion out of it: `TierCodec`, `move_cost`) carries
the block's compressed bytes over the tier pair's bandwidth (the tiers' raw read rates, not the effective ones above)
and pays the measured compression (moving in) or decompression (moving out) of the whole block, as the KV pool's moves
do (kv/pool.py): what crosses between the tiers is compressed, the codec runs at the uncompressed end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tieremu.tiers.config import TierSpec

MIB = 1 << 20


def compressed_block_bytes(spec: TierSpec, block_bytes: int) -> int:
    """Bytes one block takes in this tier (its compressed size, rounded up to a byte)."""
    c = spec.compression
    if not c.enabled:
        return block_bytes
    # Imported here: the replay CLI loads this module and must start without torch when no tier is compressed.
    from tieremu.kv.compress import reference_codec

    codec = reference_codec(c.format, c.layout)
    assert codec is not None
    return -(-block_bytes * codec.compressed_bytes // codec.raw_bytes)


def capacity_blocks(spec: TierSpec, block_bytes: int) -> int | None:
    """Blocks of block_bytes (uncompressed) that the tier's capacity_mib holds at its compressed size; None when
    the tier has no capacity_mib (unlimited)."""
    if spec.capacity_mib is None:
        return None
    return (spec.capacity_mib * MIB) // compressed_block_bytes(spec, block_bytes)


def effective_read_gbps(specs: Mapping[str, TierSpec], read_gbps: Mapping[str, float | None]) -> dict[str,
                                                                                                      float | None]:
    """Each tier's rate in GB/s of uncompressed KV delivered to attention: compressed bytes at the tier's read rate,
    then the measured dequantization. Uncompressed tiers (and tiers with no rate) keep theirs."""
    out: dict[str, float | None] = {}
    for name, gbps in read_gbps.items():
        spec = specs.get(name)
        if spec is None or gbps is None or not spec.compression.enabled:
            out[name] = gbps
            continue
        from tieremu.kv.compress import decompress_gbps, ratio_of

        c = spec.compression
        out[name] = 1.0 / (1.0 / (ratio_of(c.format, c.layout) * gbps) + 1.0 / decompress_gbps(c.format, c.layout))
    return out


@dataclass(frozen=True)
class TierCodec:
    """A compressed tier's figures for a replay's moves: its format's sizes on the reference block and the measured
    rates of its kernels (GB/s of uncompressed KV), and the tier's raw read rate (None: not given)."""

    format: str
    layout: str
    raw_bytes: int
    compressed_bytes: int
    compress_gbps: float
    decompress_gbps: float
    read_gbps: float | None

    def block_bytes(self, block_bytes: int) -> int:
        """One block of block_bytes (uncompressed) as this tier holds it, rounded up to a byte."""
        return -(-block_bytes * self.compressed_bytes // self.raw_bytes)


def tier_codecs(specs: Mapping[str, TierSpec], read_gbps: Mapping[str, float | None]) -> dict[str, TierCodec]:
    """The compressed tiers' codecs (none for a map that compresses nothing: torch is not imported then), with each
    tier's raw read rate from read_gbps."""
    out: dict[str, TierCodec] = {}
    for name, spec in specs.items():
        c = spec.compression
        if not c.enabled:
            continue
        from tieremu.kv.compress import compress_gbps, decompress_gbps, reference_codec

        codec = reference_codec(c.format, c.layout)
        assert codec is not None
        out[name] = TierCodec(c.format, c.layout, codec.raw_bytes, codec.compressed_bytes,
                              compress_gbps(c.format, c.layout), decompress_gbps(c.format, c.layout),
                              read_gbps.get(name))
    return out


def move_cost(block_bytes: int, source: TierCodec | None, target: TierCodec | None) -> tuple[int, float]:
    """A move's (bytes crossing between the tiers, seconds of (de)compression) for one block of block_bytes: the
    block at its compressed size where either end holds it compressed (the smaller where both do), decompressed when
    it leaves a compressed tier and compressed when it enters one (a change of format does both; the same format
    neither: its compressed bytes are copied as they are)."""
    if source is None and target is None:
        return block_bytes, 0.0
    if source is not None and target is not None and (source.format, source.layout) == (target.format,
                                                                                          target.layout):
        return source.block_bytes(block_bytes), 0.0
    sizes = [c.block_bytes(block_bytes) for c in (source, target) if c is not None]
    seconds = 0.0
    if source is not None:
        seconds += block_bytes / (source.decompress_gbps * 1e9)
    if target is not None:
        seconds += block_bytes / (target.compress_gbps * 1e9)
    return min(sizes), seconds
