"""The default experiment end to end, its result folder, and what a failed or invalid run leaves behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tieremu.errors import ConfigError
from tieremu.runner import experiment as experiment_mod
from tieremu.runner.experiment import run_experiment
from tieremu.runner.results import ResultDir
from tieremu.runner.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "experiments" / "default.yaml"


def _spec(tmp_path: Path, extra: str = "", size_mib: int = 16) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(f"name: small\ntiers: {REPO / 'configs/tiers/cxl-expander.yaml'}\ncheck:\n  region_mib: 1\n"
                 f"roundtrip:\n  route: [dram, cxl, far]\n  size_mib: {size_mib}\n{extra}")
    return p


def test_default_spec_validates() -> None:
    spec = load_experiment(DEFAULT)
    assert spec.name == "default" and spec.tier_map.name == "cxl-expander"
    assert spec.roundtrip is not None and spec.roundtrip.route == ("dram", "cxl", "far")


def test_run_writes_a_complete_labelled_result_folder(tmp_path: Path, memory_nodes: tuple[int, ...]) -> None:
    result = run_experiment(load_experiment(_spec(tmp_path)), tmp_path / "out")
    folder = result.path
    assert folder.parent == tmp_path / "out" / "small" and not folder.name.endswith((".partial", ".failed"))
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "metrics.jsonl", "summary.csv"]

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["extra"]["experiment"] == "small"
    tiers = {t["tier"]: t for t in manifest["extra"]["tiers"]}
    for name, node in (("dram", 0), ("cxl", 1), ("far", 2)):
        assert tiers[name]["backing"] == ("real" if node in memory_nodes else "emulated")
    assert manifest["kernel"].startswith("Linux") and manifest["packages"]["torch"].startswith("2.")
    assert isinstance(manifest["lab_profiles"], list)  # active lab profiles, empty when none is applied

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    hops = [r for r in rows if r["kind"] == "migration"]
    assert [(h["source"], h["target"]) for h in hops] == [("dram", "cxl"), ("cxl", "far"), ("far", "dram")]
    assert all(h["checksum_ok"] and h["fraction_on_target"] == 1.0 for h in hops)
    assert all(r["origin"] in ("measured", "emulated") for r in rows)
    if len(memory_nodes) == 1:  # every hop touches an emulated tier here, and says so
        assert {h["origin"] for h in hops} == {"emulated"}
        assert all(h["moved"] == 0 and h["already"] == 16 * 256 for h in hops)

    with (folder / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["target"] for r in summary] == ["cxl", "far", "dram"]


def test_a_run_that_fails_is_left_marked_failed_never_complete(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(experiment_mod, "run_roundtrip", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_experiment(load_experiment(_spec(tmp_path)), tmp_path / "out")
    [entry] = (tmp_path / "out" / "small").iterdir()
    assert entry.name.endswith(".failed")
    assert "disk on fire" in (entry / "error.txt").read_text()
    assert not (entry / "metrics.jsonl").exists()


def test_result_dir_is_partial_until_finished(tmp_path: Path) -> None:
    out = ResultDir(tmp_path, "exp", "t1")
    out.write_json("a.json", {"x": 1})
    assert out.path.name == "t1.partial" and not (tmp_path / "exp" / "t1").exists()
    assert not list(out.path.glob(".*.tmp"))
    final = out.finish()
    assert final == tmp_path / "exp" / "t1" and json.loads((final / "a.json").read_text()) == {"x": 1}


@pytest.mark.parametrize(("extra", "message"), [
    ("colour: blue\n", "colour: unknown key; valid keys here: check, description, name, roundtrip, tiers"),
])
def test_unknown_top_level_key_is_an_error(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(_spec(tmp_path, extra))


def test_route_naming_an_unknown_tier_lists_the_tiers(tmp_path: Path) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text(f"name: x\ntiers: {REPO / 'configs/tiers/cxl-expander.yaml'}\n"
                 "roundtrip:\n  route: [dram, hbm]\n")
    with pytest.raises(ConfigError, match=r"roundtrip.route\[1\]: 'hbm' is not a tier of 'cxl-expander'; "
                                          "tiers: dram, cxl, far"):
        load_experiment(p)


def test_tier_map_path_is_relative_to_the_spec_file(tmp_path: Path) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text("name: x\ntiers: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere.yaml'}: file not found"):
        load_experiment(p)
