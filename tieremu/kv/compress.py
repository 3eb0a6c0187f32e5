"""KV block compression: fp8 (e4m3fn), int8 and int4 (two codes per byte), each with one scale per group.

One layer's slice of a KV block, K and V of `block_tokens` tokens ([2, block_tokens, kv_heads, head_dim]), is
compressed as two parts. How each part is cut into groups (each group gets one scale) is the `layout`:

- `block`: every token's head row of head_dim values is a group, for K and V alike (FlexGen's group-wise
  quantization along the hidden dimension);
- `kivi`: keys per channel (one group per (head, dim) channel across the block's tokens, since key outliers sit in
  fixed channels) and values per token (as `block`), as KIVI quantizes them.

Every format is symmetric: a group's scale is its absolute maximum over the largest code (int8 127, int4 7, e4m3
448), rounded up to bfloat16 and stored in 2 bytes. The kernels are C (tieremu/native/compress.c).

Documented error bound, per element x of a group whose absolute maximum is m (s = m / qmax, at most 2^-7 above,
plus 2^-133 for a subnormal scale, once rounded up to bfloat16):

- int8, int4: |x' - x| <= s / 2            (half a code step)
- fp8:        |x' - x| <= 2^-4 |x| + 2^-10 s (e4m3 keeps 3 mantissa bits; below 2^-6 s it steps by 2^-9 s)

plus float32 rounding (2^-22 (|x| + s)) and, for a 16-bit KV dtype, the rounding back to that dtype.
`error_bound()` computes it for a block. NaN and Inf are refused (NonFiniteError naming the element): a
non-finite K or V is a bug upstream, and one would poison its group's scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from tieremu.errors import KVError
from tieremu.native.build import compress_kernels
from tieremu.tiers.config import COMPRESSION_LAYOUTS, COMPRESSIONS

KINDS = COMPRESSIONS
LAYOUTS = COMPRESSION_LAYOUTS
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # compress.c's `dtype`
MAX_GROUP = 4096  # compress.c's MAX_GROUP
BF16_ROUND = 1 + 2.0 ** -7  # a scale rounded up to bfloat16 grows by at most one bf16 ulp
BF16_SUBNORMAL_STEP = 2.0 ** -133  # ... or, for a subnormal scale (a group below ~1e-36), by one subnormal step
SCALE_BYTES = 2
ALIGN = 8  # each part's scales start 8-byte aligned in the packed bytes

# The KV block a replay's abstract block is taken to hold when its compression ratio is needed (no model runs in a
# replay): Llama-3.2-1B's KV heads in bfloat16, 16 tokens per block, as the `1b` preset of workloads/llama.py.
REFERENCE_SHAPE = {"block_tokens": 16, "kv_heads": 8, "head_dim": 64, "dtype": torch.bfloat16}


class NonFiniteError(KVError):
    """A KV block to compress holds NaN or Inf."""


@dataclass(frozen=True)
class Part:
    """One of K and V as the kernels see it: n_groups contiguous groups of `group` values."""

    n_groups: int
    group: int
    code_bytes: int
    code_offset: int
    scale_offset: int

    @property
    def scale_bytes(self) -> int:
        return self.n_groups * SCALE_BYTES


@dataclass(frozen=True)
class CompressedBlock:
    """A compressed layer slice: `data` holds [K codes | K scales | V codes | V scales] (uint8)."""

    codec: Codec
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.codec.compressed_bytes

    def scales(self, part: int) -> torch.Tensor:
        """The part's scales as float32 (bfloat16 stored)."""
        p = self.codec.parts[part]
        raw = self.data[p.scale_offset:p.scale_offset + p.scale_bytes].view(torch.int16)
        return raw.view(torch.bfloat16).float()


@dataclass(frozen=True)
class Codec:
    """A compression format for layer slices of one block shape (K and V of block_tokens tokens)."""

    kind: str
    layout: str
    block_tokens: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.kind == "none":
            raise KVError(f"compression {self.kind!r} is not a format; valid: {', '.join(KINDS[1:])}")
        if self.layout not in LAYOUTS:
            raise KVError(f"compression layout {self.layout!r} is unknown; valid: {', '.join(LAYOUTS)}")
        if self.dtype not in DTYPE_CODES:
            raise KVError(f"KV dtype {self.dtype} cannot be compressed; valid: float32, bfloat16, float16")
        if any(p.group > MAX_GROUP for p in self.parts):
            raise KVError(f"compression groups of {max(p.group for p in self.parts)} values exceed {MAX_GROUP}; use "
                          "fewer block_tokens or a smaller head_dim")
        if self.kind == "int4" and any(p.group % 2 for p in self.parts):
            raise KVError(f"int4 packs two codes per byte, so its groups need an even size; {self.layout} layout "
                          f"groups here are {[p.group for p in self.parts]} values (head_dim {self.head_dim}, "
                          f"block_tokens {self.block_tokens})")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, self.block_tokens, self.kv_heads, self.head_dim)

    @property
    def parts(self) -> tuple[Part, Part]:
        return _parts(self.kind, self.layout, self.block_tokens, self.kv_heads, self.head_dim)

    @property
    def compressed_bytes(self) -> int:
        """Bytes of one compressed layer slice, scales and alignment included."""
        last = self.parts[1]
        return _align(last.scale_offset + last.scale_bytes)

    @property
    def raw_bytes(self) -> int:
        return 2 * self.block_tokens * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def ratio(self) -> float:
        """Uncompressed over compressed bytes."""
        return self.raw_bytes / self.compressed_bytes

    def describe(self) -> str:
        return f"{self.kind} ({self.layout} scales): {self.compressed_bytes} of {self.raw_bytes} bytes, " \
               f"{self.ratio:.2f}x"

    # -- the interface ----------------------------------------------------------------------------------------------

    def compress(self, kv: torch.Tensor, out: torch.Tensor | None = None) -> CompressedBlock:
        """K and V [2, block_tokens, kv_heads, head_dim] compressed, into `out` (uint8, compressed_bytes long,
        contiguous: e.g. a view of an arena slot) when given. NonFiniteError, before anything is written, for NaN or
        Inf."""
        if tuple(kv.shape) != self.shape:
            raise KVError(f"a block to compress has shape {tuple(kv.shape)}; this codec takes {self.shape}")
        data = torch.empty(self.compressed_bytes, dtype=torch.uint8) if out is None else out
        if data.dtype != torch.uint8 or data.numel() < self.compressed_bytes or not data.is_contiguous():
            raise KVError(f"compress: out must be {self.compressed_bytes} contiguous uint8 bytes")
        self.compress_many(kv.unsqueeze(0), np.array([data.data_ptr()], dtype=np.int64))
        return CompressedBlock(self, data[:self.compressed_bytes])

    def compress_many(self, kv: torch.Tensor, addrs: np.ndarray) -> None:
        """n blocks [n, 2, block_tokens, kv_heads, head_dim] compressed in one kernel call, block i written at
        address addrs[i] (compressed_bytes of writable memory each: arena slots, say). Nothing is written when any
        value is NaN or Inf (NonFiniteError naming it)."""
        n = kv.shape[0]
        if tuple(kv.shape[1:]) != self.shape or len(addrs) != n:
            raise KVError(f"compress_many: {tuple(kv.shape)} blocks and {len(addrs)} addresses; want "
                          f"[n, {', '.join(map(str, self.shape))}] and n addresses")
        x = kv.detach().to("cpu", self.dtype).contiguous()
        addrs = np.ascontiguousarray(addrs, dtype=np.int64)
        bad = compress_kernels().compress_blocks(x.data_ptr(), DTYPE_CODES[self.dtype], n, self._part_elements,
                                                 _kind_code(self.kind), self._geom.ctypes.data, addrs.ctypes.data)
        if bad:
            raise NonFiniteError(self._where(bad - 1, x))

    def decompress(self, block: CompressedBlock | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """K and V [2, block_tokens, kv_heads, head_dim] in the codec's dtype, into `out` when given."""
        data = block.data if isinstance(block, CompressedBlock) else block
        if data.dtype != torch.uint8 or data.numel() < self.compressed_bytes or not data.is_contiguous():
            raise KVError(f"decompress: want {self.compressed_bytes} contiguous uint8 bytes, got "
                          f"{data.numel()} {data.dtype}")
        result = torch.empty(self.shape, dtype=self.dtype) if out is None else out
        self.decompress_many(np.array([data.data_ptr()], dtype=np.int64), result.unsqueeze(0))
        return result

    def decompress_many(self, addrs: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """The blocks compressed at addrs, decompressed in one kernel call into out [n, 2, block_tokens, kv_heads,
        head_dim] (any float dtype, e.g. a staging buffer's host side)."""
        n = len(addrs)
        if tuple(out.shape) != (n, *self.shape):
            raise KVError(f"decompress_many: out has shape {tuple(out.shape)}; want [{n}, "
                          f"{', '.join(map(str, self.shape))}]")
        if out.dtype not in DTYPE_CODES or not out.is_contiguous():
            raise KVError(f"decompress_many: out must be contiguous float32, bfloat16 or float16; got {out.dtype}")
        addrs = np.ascontiguousarray(addrs, dtype=np.int64)
        compress_kernels().decompress_blocks(addrs.ctypes.data, n, _kind_code(self.kind), self._geom.ctypes.data,
                                             out.data_ptr(), DTYPE_CODES[out.dtype], self._part_elements)
        return out

    def error_bound(self, kv: torch.Tensor) -> torch.Tensor:
        """The documented bound on |decompress(compress(kv)) - kv|, per element, as float32 of kv's shape."""
        x = kv.detach().to("cpu", torch.float32)
        bounds = []
        for i in range(2):
            grouped = self._part_groups(x[i], i)
            scale = grouped.abs().amax(dim=1, keepdim=True) / QMAX[self.kind] * BF16_ROUND + BF16_SUBNORMAL_STEP
            mag = grouped.abs()
            # fp8: 3 mantissa bits (half an ulp is 2^-4 relative), subnormal steps of 2^-9 s; ints: half a step.
            bound = 2.0 ** -4 * mag + 2.0 ** -10 * scale if self.kind == "fp8" else 0.5 * scale.expand_as(grouped)
            bound = bound + 2.0 ** -22 * (mag + scale) + 2.0 ** -148
            if self.dtype != torch.float32:
                bound = bound + torch.finfo(self.dtype).eps * (mag + bound)
            bounds.append(self._ungrouped(bound, i))
        return torch.stack(bounds)

    # -- internals --------------------------------------------------------------------------------------------------

    @property
    def _part_elements(self) -> int:
        return self.block_tokens * self.kv_heads * self.head_dim

    @property
    def _geom(self) -> np.ndarray:
        return _geometry(self.kind, self.layout, self.block_tokens, self.kv_heads, self.head_dim)

    def _part_groups(self, part: torch.Tensor, index: int) -> torch.Tensor:
        """One part of one block [bt, h, d] as its groups [n_groups, group]."""
        if index == 0 and self.layout == "kivi":
            return part.permute(1, 2, 0).reshape(self.parts[0].n_groups, -1)
        return part.reshape(self.parts[index].n_groups, -1)

    def _ungrouped(self, groups: torch.Tensor, index: int) -> torch.Tensor:
        bt, h, d = self.block_tokens, self.kv_heads, self.head_dim
        if index == 0 and self.layout == "kivi":
            return groups.reshape(h, d, bt).permute(2, 0, 1)
        return groups.reshape(bt, h, d)

    def _where(self, flat: int, x: torch.Tensor) -> str:
        """Where a flat index into blocks [n, 2, bt, h, d] falls: which block, K or V, token, head, dim."""
        block, part, token, head, dim = np.unravel_index(flat, (x.shape[0], *self.shape))
        which = f"block {block} " if x.shape[0] > 1 else ""
        return (f"KV {which}holds {float(x.view(-1)[flat])} at {'KV'[part]}[token {token}, head {head}, dim {dim}]; "
                f"{self.kind} compression refuses NaN and Inf (a non-finite K or V is a bug upstream)")


def codec_for(kind: str, layout: str, *, block_tokens: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype = torch.float32) -> Codec | None:
    """The codec of a tier's compression setting; None for `none`."""
    if kind not in KINDS:
        raise KVError(f"compression {kind!r} is unknown; valid: {', '.join(KINDS)}")
    if kind == "none":
        return None
    return Codec(kind, layout, block_tokens, kv_heads, head_dim, dtype)


def compress(kv: torch.Tensor, kind: str = "int8", layout: str = "block") -> CompressedBlock:
    """One layer slice [2, block_tokens, kv_heads, head_dim] compressed with a codec made for its shape."""
    if kv.dim() != 4 or kv.shape[0] != 2:
        raise KVError(f"a block to compress is [2, block_tokens, kv_heads, head_dim] (K and V); got {tuple(kv.shape)}")
    codec = codec_for(kind, layout, block_tokens=kv.shape[1], kv_heads=kv.shape[2], head_dim=kv.shape[3],
                      dtype=kv.dtype)
    if codec is None:
        raise KVError("compression 'none' has nothing to compress; valid formats: fp8, int8, int4")
    return codec.compress(kv)


def decompress(block: CompressedBlock, out: torch.Tensor | None = None) -> torch.Tensor:
    return block.codec.decompress(block, out)


def reference_codec(kind: str, layout: str = "block") -> Codec | None:
    """The codec of the reference KV block (REFERENCE_SHAPE) a replay's blocks stand for."""
    return codec_for(kind, layout, **REFERENCE_SHAPE)  # type: ignore[arg-type]


def ratio_of(kind: str, layout: str = "block") -> float:
    """Compression ratio of a tier setting on the reference block (1.0 for `none`)."""
    codec = reference_codec(kind, layout)
    return 1.0 if codec is None else codec.ratio


def decompress_gbps(kind: str, layout: str = "block") -> float:
    """Measured rate of the decompression kernel on the reference block, in GB/s of uncompressed output (the
    median of 5 runs of ~2 ms each; measured once per process and format). Infinite for `none`."""
    return _decompress_gbps(kind, layout)


@cache
def _decompress_gbps(kind: str, layout: str) -> float:
    codec = reference_codec(kind, layout)
    if codec is None:
        return float("inf")
    block = codec.compress(torch.randn(codec.shape))
    out = torch.empty(codec.shape, dtype=codec.dtype)
    codec.decompress(block, out)
    reps, rates = 64, []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            codec.decompress(block, out)
        rates.append(reps * codec.raw_bytes / max(1, time.perf_counter_ns() - t0))
    return sorted(rates)[2]


def compress_gbps(kind: str, layout: str = "block") -> float:
    """Measured rate of the compression kernel on the reference block, in GB/s of uncompressed input (the median of
    5 runs of ~2 ms each; measured once per process and format). Infinite for `none`."""
    return _compress_gbps(kind, layout)


@cache
def _compress_gbps(kind: str, layout: str) -> float:
    codec = reference_codec(kind, layout)
    if codec is None:
        return float("inf")
    kv = torch.randn(codec.shape)
    out = torch.empty(codec.compressed_bytes, dtype=torch.uint8)
    codec.compress(kv, out)
    reps, rates = 64, []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            codec.compress(kv, out)
        rates.append(reps * codec.raw_bytes / max(1, time.perf_counter_ns() - t0))
    return sorted(rates)[2]


def _kind_code(kind: str) -> int:
    """The kernels' name for a format: bits of an integer code, 0 for fp8."""
    return {"int8": 8, "int4": 4, "fp8": 0}[kind]


@cache
def _geometry(kind: str, layout: str, bt: int, h: int, d: int) -> np.ndarray:
    """Per part (compress.c's `geom`): codes offset, scales offset, groups, group size, and where value i of group g
    lies in the part [bt, h, d]: g * group stride + i * element stride (a KIVI key group is a channel across tokens)."""
    parts = _parts(kind, layout, bt, h, d)
    strides = [(1, h * d) if layout == "kivi" else (d, 1), (d, 1)]
    return np.array([v for p, (gs, es) in zip(parts, strides, strict=True)
                     for v in (p.code_offset, p.scale_offset, p.n_groups, p.group, gs, es)], dtype=np.int64)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@cache
def _parts(kind: str, layout: str, bt: int, h: int, d: int) -> tuple[Part, Part]:
    shapes = [(h * d, bt) if layout == "kivi" else (bt * h, d), (bt * h, d)]
    parts, offset = [], 0
    for n_groups, group in shapes:
        code_bytes = n_groups * group // 2 if kind == "int4" else n_groups * group
        scale_offset = _align(offset + code_bytes)
        parts.append(Part(n_groups, group, code_bytes, offset, scale_offset))
        offset = scale_offset + n_groups * SCALE_BYTES
    return parts[0], parts[1]
