"""What a tier's `compression` does to a replay's accounting: blocks per tier and the rate a hit is read at.

A replay's blocks are abstract (`--block-mib` of KV each), so a tier's ratio is its format's on the reference block
(compress.REFERENCE_SHAPE). A tier given in bytes (capacity_mib) holds ratio-times more blocks when compressed; a hit
there reads the compressed bytes at the tier's rate and then pays the dequantization, measured by the compiled kernel
(compress.decompress_gbps), so its effective read rate is 1 / (1 / (ratio x rate) + 1 / decompress rate).
"""

from __future__ import annotations

from collections.abc import Mapping

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
