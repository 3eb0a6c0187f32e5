"""The per-tier `compression` key of tier maps: parsed, defaulted, and refused with the valid values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tieremu.errors import ConfigError
from tieremu.tiers.config import Compression, load_tier_map

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiers"


def test_shipped_compressed_map() -> None:
    tiers = load_tier_map(CONFIGS / "cxl-compressed.yaml")
    assert tiers.tier("dram").compression == Compression() and not tiers.tier("dram").compression.enabled
    assert tiers.tier("cxl").compression == Compression("int8", "block")
    assert tiers.tier("far").compression == Compression("int4", "kivi")
    assert tiers.tier("far").compression.describe() == "int4 (kivi scales)"


def _load(tmp_path: Path, tier: str) -> object:
    p = tmp_path / "tiers.yaml"
    p.write_text(f"name: x\ntiers:\n  - {tier}\n")
    return load_tier_map(p)


@pytest.mark.parametrize(("tier", "message"), [
    ("{name: a, nodes: [0], compression: int2}",
     r"tiers\[0\].compression: 'int2' is not valid; valid: none, fp8, int8, int4"),
    ("{name: a, nodes: [0], compression: 8}", r"tiers\[0\].compression: 8 is not valid; valid: none, fp8, int8, int4"),
    ("{name: a, nodes: [0], compression: {format: int8, layout: channel}}",
     r"tiers\[0\].compression.layout: 'channel' is not valid; valid: block, kivi"),
    ("{name: a, nodes: [0], compression: {layout: kivi}}", r"tiers\[0\].compression.format: required key"),
    ("{name: a, nodes: [0], compression: {format: int8, scale: bf16}}",
     r"tiers\[0\].compression.scale: unknown key; valid keys here: format, layout"),
    ("{name: a, kind: file, path: /tmp, compression: fp4}", r"tiers\[0\].compression: 'fp4' is not valid"),
])
def test_bad_compression_is_refused_naming_value_and_valid_ones(tmp_path: Path, tier: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, tier)


def test_every_kind_of_tier_takes_compression(tmp_path: Path) -> None:
    for tier in ("{name: a, nodes: [0], compression: fp8}", "{name: a, kind: file, path: /tmp, compression: int4}",
                 "{name: a, kind: cuda, compression: {format: int8, layout: kivi}}"):
        assert _load(tmp_path, tier).tiers[0].compression.enabled  # type: ignore[attr-defined]
