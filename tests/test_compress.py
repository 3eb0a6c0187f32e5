"""KV compression kernels: round trips within the documented bound, adversarial blocks, refusals, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tieremu.errors import KVError
from tieremu.kv.compress import Codec, NonFiniteError, compress, decompress, ratio_of
from tieremu.native.build import compress_kernels

KINDS = ("fp8", "int8", "int4")
SHAPE = dict(block_tokens=16, kv_heads=2, head_dim=64)


def roundtrip(codec: Codec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = codec.decompress(codec.compress(x))
    return (y.float() - x.float()).abs(), codec.error_bound(x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["block", "kivi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_blocks_round_trip_within_bound(kind: str, layout: str, dtype: torch.dtype) -> None:
    codec = Codec(kind, layout, dtype=dtype, **SHAPE)
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 50.0):
        x = (torch.randn(codec.shape, generator=gen) * scale).to(dtype)
        err, bound = roundtrip(codec, x)
        assert (err <= bound).all(), f"{kind}/{layout}/{dtype}: max err/bound {(err / bound).max():.3f}"
        # The bound is not vacuous: it is a small fraction of the values' spread.
        assert bound.max() < 0.2 * x.float().abs().max()


def adversarial() -> dict[str, torch.Tensor]:
    shape = (2, 16, 2, 64)
    gen = torch.Generator().manual_seed(2)
    small = torch.randn(shape, generator=gen) * 0.01
    outliers = small.clone()
    outliers[0, 3, 1, 7] = 1e4  # a key outlier channel, as KIVI observes
    outliers[1, 5, 0, 0] = -3e3
    alternating = torch.ones(shape)
    alternating[..., 1::2] = -1
    return {
        "zeros": torch.zeros(shape),
        "constant": torch.full(shape, 3.25),
        "negative constant": torch.full(shape, -7.0),
        "outliers": outliers,
        "tiny": torch.randn(shape, generator=gen) * 1e-30,
        "subnormal": torch.randn(shape, generator=gen) * 1e-40,
        "huge": torch.randn(shape, generator=gen) * 1e30,
        "near float max": torch.full(shape, 3.0e38) * torch.sign(torch.randn(shape, generator=gen)),
        "alternating signs": alternating,
        "one nonzero": torch.zeros(shape).index_put_((torch.tensor([1]), torch.tensor([15]), torch.tensor([1]),
                                                      torch.tensor([63])), torch.tensor([2.5])),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["block", "kivi"])
def test_adversarial_blocks_round_trip_within_bound(kind: str, layout: str) -> None:
    codec = Codec(kind, layout, **SHAPE)
    for name, x in adversarial().items():
        err, bound = roundtrip(codec, x)
        assert torch.isfinite(codec.decompress(codec.compress(x))).all(), name
        assert (err <= bound).all(), f"{kind}/{layout} {name}: max err/bound {(err / bound).max():.3f}"
    zeros = adversarial()["zeros"]
    assert torch.equal(codec.decompress(codec.compress(zeros)), zeros)


@pytest.mark.parametrize("kind", KINDS)
def test_outliers_cost_only_their_own_group(kind: str) -> None:
    # Per-group scales: an outlier coarsens its own group only, every other group keeps its precision.
    codec = Codec(kind, "block", **SHAPE)
    x = adversarial()["outliers"]
    err, _ = roundtrip(codec, x)
    clean = torch.ones(codec.shape, dtype=torch.bool)
    clean[0, 3, 1] = False
    clean[1, 5, 0] = False
    assert err[clean].max() <= 0.2 * x[clean].abs().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_values_are_refused_naming_the_element(kind: str, bad: float) -> None:
    codec = Codec(kind, "kivi", **SHAPE)
    x = torch.randn(codec.shape)
    x[1, 4, 1, 9] = bad
    out = torch.zeros(codec.compressed_bytes, dtype=torch.uint8)
    with pytest.raises(NonFiniteError, match=r"holds (nan|-?inf) at V\[token 4, head 1, dim 9\].*refuses NaN"):
        codec.compress(x, out)
    assert not out.any(), "nothing is written for a refused block"
    # The kernel refuses on its own (its scan does not rely on any Python check) and says where: the flat index of
    # V[4, 1, 9] after K's values.
    x2 = torch.stack([x, torch.randn(codec.shape)]).flip(0)  # the bad value in the second block
    addrs = np.array([out.data_ptr(), out.data_ptr()], dtype=np.int64)
    at = compress_kernels().compress_blocks(x2.data_ptr(), 0, 2, 16 * 2 * 64, {"fp8": 0, "int8": 8, "int4": 4}[kind],
                                            codec._geom.ctypes.data, addrs.ctypes.data)
    assert at - 1 == x2[0].numel() + x2[0, 0].numel() + (4 * 2 + 1) * 64 + 9
    assert not out.any()
    with pytest.raises(NonFiniteError, match=r"block 1 holds .* at V\[token 4, head 1, dim 9\]"):
        codec.compress_many(x2, addrs)


def test_fp8_codes_match_torch_float8_e4m3fn() -> None:
    # An independent implementation: torch's own float32 -> float8_e4m3fn conversion (round to nearest even).
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(20000, generator=gen) * s for s in (1e-3, 0.02, 1.0, 30.0, 200.0)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -6,
                                    1.0625, 1.1875, 240.0, 464.0 - 1e-3])])
    x = x.clamp(-448, 448)
    mine = torch.empty(x.numel(), dtype=torch.uint8)
    compress_kernels().e4m3_encode(x.data_ptr(), x.numel(), mine.data_ptr())
    theirs = x.to(torch.float8_e4m3fn).view(torch.uint8)
    same_value = mine.view(torch.float8_e4m3fn).float() == theirs.view(torch.float8_e4m3fn).float()
    assert same_value.all(), x[~same_value][:5]


def test_int8_codes_match_textbook_symmetric_quantization() -> None:
    codec = Codec("int8", "block", **SHAPE)
    x = torch.randn(codec.shape) * 4
    block = codec.compress(x)
    scales = block.scales(0)  # one per (token, head) row of K
    rows = x[0].reshape(-1, 64)
    textbook = torch.round(rows / scales[:, None]).clamp(-127, 127) * scales[:, None]
    assert torch.equal(codec.decompress(block)[0].reshape(-1, 64), textbook)
    # The stored scale is the row's absmax / 127 rounded up to bfloat16, never below.
    exact = rows.abs().amax(dim=1) / 127
    assert (scales >= exact).all() and (scales <= exact * (1 + 2 ** -7)).all()


def test_compressed_sizes_meet_the_ratios_scales_included() -> None:
    for dtype, int8_min, int4_min in ((torch.bfloat16, 1.8, 3.5), (torch.float16, 1.8, 3.5),
                                      (torch.float32, 3.6, 7.0)):
        int8 = Codec("int8", "block", dtype=dtype, **SHAPE)
        int4 = Codec("int4", "block", dtype=dtype, **SHAPE)
        assert int8.ratio >= int8_min and int4.ratio >= int4_min, (dtype, int8.ratio, int4.ratio)
        assert int8.compressed_bytes == len(int8.compress(torch.randn(int8.shape).to(dtype)).data)
    # Sizes by hand: 2 x 16 x 2 x 64 values, a 2-byte scale per 64 (block) and per 16 tokens (kivi keys).
    assert Codec("int8", "block", **SHAPE).compressed_bytes == 2 * (2048 + 32 * 2)
    assert Codec("int4", "block", **SHAPE).compressed_bytes == 2 * (1024 + 32 * 2)
    assert Codec("int4", "kivi", **SHAPE).compressed_bytes == 1024 + 128 * 2 + 1024 + 32 * 2
    assert Codec("int8", "kivi", block_tokens=32, kv_heads=2, head_dim=64, dtype=torch.bfloat16).ratio >= 1.8
    assert ratio_of("none") == 1.0 and ratio_of("int8") >= 1.8 and ratio_of("int4") >= 3.5


def test_module_interface_and_bad_input() -> None:
    x = torch.randn(2, 16, 2, 64)
    block = compress(x, "int4", "kivi")
    assert block.nbytes < x.numel() and decompress(block).shape == x.shape
    with pytest.raises(KVError, match="valid: fp8, int8, int4"):
        Codec("int3", "block", **SHAPE)
    with pytest.raises(KVError, match="valid: block, kivi"):
        Codec("int8", "channel", **SHAPE)
    with pytest.raises(KVError, match="even size"):
        Codec("int4", "kivi", block_tokens=15, kv_heads=2, head_dim=64)
    with pytest.raises(KVError, match="takes"):
        Codec("int8", "block", **SHAPE).compress(torch.randn(2, 8, 2, 64))
    with pytest.raises(KVError, match="nothing to compress"):
        compress(x, "none")
