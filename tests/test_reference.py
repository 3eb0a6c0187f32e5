"""The generated reference of spec and tier-map keys: docs/reference.md is exactly what `tieremu reference` writes
now, every key a validator reads has a meaning written and no meaning is stale, and keys come from the validators
(a key added to a parser appears, with its default)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tieremu.cli.reference import reference as reference_cmd
from tieremu.configfile import Section
from tieremu.errors import ConfigError
from tieremu.runner import reference
from tieremu.runner.reference import groups, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_reference_is_what_the_generator_writes() -> None:
    committed = (REPO / "docs" / "reference.md").read_text()
    assert committed == reference_markdown(), "docs/reference.md is stale: run `tieremu reference --out docs/`"


def test_the_command_writes_and_checks(tmp_path: Path) -> None:
    stale = CliRunner().invoke(reference_cmd, ["--out", str(tmp_path), "--check"])
    assert stale.exit_code == 1 and "out of date" in stale.output
    wrote = CliRunner().invoke(reference_cmd, ["--out", str(tmp_path / "docs")])
    assert wrote.exit_code == 0 and Path(wrote.output.strip()) == tmp_path / "docs" / "reference.md"
    assert CliRunner().invoke(reference_cmd, ["--out", str(tmp_path / "docs"), "--check"]).exit_code == 0


def test_keys_types_and_defaults_come_from_the_validators() -> None:
    by_title = {g.title: {k.path: k for k in g.keys} for g in groups()}
    replay = by_title["Job `replay`"]
    assert replay["epoch_ms"].default == "50" and "epoch_s" not in replay  # one epoch unit: ms
    assert replay["mode"].valid == ["one of: simulate, execute"]
    assert replay["generate.requests"].default == "required"
    assert replay["trace"].optional and replay["generate"].optional  # exactly one of them, neither alone required
    tiers = by_title["Tier map"]
    assert tiers["tiers[].path"].asked_by == {"file"} and tiers["tiers[].device"].asked_by == {"cuda"}
    assert "tiers[].emulate.latency_ratio" in tiers and tiers["tiers[].kind"].default == "numa"
    spec = by_title["Experiment spec"]
    assert {"name", "tiers", "jobs", "jobs[].kind", "jobs[].policies", "backend"} <= set(spec)
    assert not any(".sweep." in k or k.startswith("sweep.") for k in spec)  # axes are job params, not keys


def test_a_key_without_a_meaning_or_a_stale_meaning_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from tieremu.runner.jobs import ProbeJob

    original = ProbeJob.parse

    def parse_with_a_new_key(section: Section) -> object:
        section.get("new_knob", int, 1)
        return original(section)

    monkeypatch.setattr(ProbeJob, "parse", staticmethod(parse_with_a_new_key))
    with pytest.raises(ConfigError, match="Job `probe`: keys the validator reads with no meaning written: new_knob"):
        groups()
    monkeypatch.setattr(ProbeJob, "parse", original)
    monkeypatch.setitem(reference.JOB_HELP["probe"], "gone", "a key no validator reads")
    with pytest.raises(ConfigError, match="meanings for keys it no longer reads: gone"):
        groups()


def test_the_command_still_writes_when_a_meaning_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """After a merge that adds a key, `tieremu reference` still writes (the key marked as lacking its meaning);
    the strict check above is what fails until the meaning is written."""
    monkeypatch.delitem(reference.TIER_MAP_HELP, "tiers[].device")
    text = reference_markdown()
    row = "| `tiers[].device` | integer | 0 | an integer >= 0 and <= 1023 | (cuda only) "
    assert f"{row}{reference.UNWRITTEN} |" in text
    with pytest.raises(ConfigError, match=r"Tier map: keys the validator reads with no meaning written: "
                                          r"tiers\[\]\.device"):
        groups()
