"""`tieremu lab plan|apply|status|teardown` end to end on a fixture tree, and the manifest's view of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fixtures.lab.fakekernel import FakeKernel, Lab, make_lab, snapshot

import tieremu.cli.lab as lab_cli
from tieremu.cli import main
from tieremu.lab import active_profiles


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lab:
    lab = make_lab(tmp_path)
    # The CLI's kernel view, over the fixture copy with kernel semantics.
    monkeypatch.setattr(lab_cli, "KernelFS", FakeKernel)
    monkeypatch.setenv("TIEREMU_LAB_STATE", str(lab.state))
    monkeypatch.setenv("TIEREMU_SYSFS_ROOT", str(lab.root))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return lab


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["lab", *args], catch_exceptions=False)


def test_plan_shows_each_write_with_path_old_and_new_and_needs_no_root(lab: Lab,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = run("plan", "cxl-cpuless-node1", "--sysfs-root", str(lab.root))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if "cpu5/online" in line)
    assert [cell.strip() for cell in row.split("│")[3:5]] == ["1", "0"]
    assert any("no_turbo" in line and " 0 " in line and " 1 " in line for line in lines)
    assert "21 write(s)" in result.output
    assert lab.changes() == [] and not lab.state.exists()


def test_apply_status_teardown_round_trip(lab: Lab) -> None:
    result = run("apply", "kernel-tiering")
    assert result.exit_code == 0, result.output
    assert "applied kernel-tiering: 2 write(s)" in result.output
    assert (lab.root / "proc/sys/kernel/numa_balancing").read_text() == "2\n"

    result = run("status", "kernel-tiering")
    assert result.exit_code == 0, result.output
    assert "active since" in result.output and "every knob holds the profile's value" in result.output

    result = run("status")
    assert result.output.startswith("kernel-tiering: applied since ")

    result = run("teardown", "kernel-tiering")
    assert result.exit_code == 0, result.output
    assert "tore down kernel-tiering: 2 step(s) undone" in result.output
    assert lab.changes() == []
    assert run("status").output == "no lab profile is active\n"


def test_status_detects_drift_after_an_out_of_band_change(lab: Lab) -> None:
    assert run("apply", "kernel-tiering").exit_code == 0
    (lab.root / "proc/sys/kernel/numa_balancing").write_text("1\n")  # someone else's sysctl -w
    result = run("status", "kernel-tiering", "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["active"] is True
    drift = [k for k in data["knobs"] if not k["ok"]]
    assert drift == [{"action": "actions[0] numa_balancing", "knob": "proc/sys/kernel/numa_balancing",
                      "profile": "2", "now": "1", "ok": False}]
    table = run("status", "kernel-tiering")
    assert table.exit_code == 1 and "DRIFT" in table.output and "1 knob(s) drifted" in table.output


def test_status_of_a_profile_that_is_not_applied(lab: Lab) -> None:
    result = run("status", "kernel-tiering", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["active"] is False and data["journal"] is None
    assert {k["knob"]: k["now"] for k in data["knobs"]} == {"proc/sys/kernel/numa_balancing": "1",
                                                          "sys/kernel/mm/numa/demotion_enabled": "false"}


def test_apply_without_root_refuses_with_a_message_and_writes_nothing(lab: Lab,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["lab", "apply", "cxl-cpuless-node1"])
    assert result.exit_code == 2
    assert "must run as root" in result.output and "nothing was written" in result.output
    assert lab.changes() == [] and not lab.state.exists()


def test_apply_dry_run_writes_nothing_even_as_root(lab: Lab) -> None:
    result = run("apply", "cxl-cpuless-node1", "--dry-run")
    assert result.exit_code == 0 and "dry run: nothing written" in result.output
    assert "cpu4/online" in result.output
    assert lab.changes() == [] and not lab.state.exists()


def test_apply_of_an_unsupported_required_profile_fails_before_any_write(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lab = make_lab(tmp_path, "minimal-vm")
    monkeypatch.setattr(lab_cli, "KernelFS", FakeKernel)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    result = CliRunner().invoke(main, ["lab", "apply", "remote-throttled", "--sysfs-root", str(lab.root),
                                       "--state-dir", str(lab.state)])
    assert result.exit_code == 2
    assert "cannot be applied on this machine" in result.output and "intel_uncore_frequency" in result.output
    assert lab.changes() == [] and not lab.state.exists()


def test_ctrl_c_during_cli_apply_rolls_back_and_says_so(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    class Interrupting(FakeKernel):
        """Ctrl-C arrives as demotion is switched on (the rollback's own write to it goes through)."""

        def _do_write(self, path: Path, value: str) -> None:
            if "numa/demotion_enabled" in str(path) and value == "true":
                raise KeyboardInterrupt
            super()._do_write(path, value)

    monkeypatch.setattr(lab_cli, "KernelFS", Interrupting)
    result = CliRunner().invoke(main, ["lab", "apply", "kernel-tiering"])
    assert result.exit_code == 130
    assert "every write made so far was rolled back" in result.output
    assert lab.changes() == [] and list(lab.state.iterdir()) == []


def test_teardown_dry_run_shows_what_it_would_restore(lab: Lab) -> None:
    assert run("apply", "cxl-cpuless-node1").exit_code == 0
    applied = snapshot(lab.root)
    result = run("teardown", "cxl-cpuless-node1", "--dry-run")
    assert result.exit_code == 0 and "would restore" in result.output
    assert "swap /var/swap file" in result.output and "on, priority 5" in result.output
    assert snapshot(lab.root) == applied


def test_teardown_by_name_of_an_active_profile_without_its_file(lab: Lab) -> None:
    path = lab.profile_file("name: adhoc\nactions:\n  - {kind: aslr, value: 1}\n")
    assert run("apply", str(path)).exit_code == 0
    path.unlink()
    result = run("teardown", "adhoc")
    assert result.exit_code == 0, result.output
    assert lab.changes() == []


def test_teardown_of_nothing_applied_is_a_clear_error(lab: Lab) -> None:
    result = CliRunner().invoke(main, ["lab", "teardown", "hygiene"])
    assert result.exit_code == 2
    assert "profile hygiene is not applied here" in result.output


def test_active_profiles_reports_recorded_and_current_values(lab: Lab) -> None:
    assert active_profiles(lab.root, state=lab.state) == []
    assert run("apply", "cxl-cpuless-node1").exit_code == 0
    (lab.root / "proc/sys/kernel/randomize_va_space").write_text("1\n")
    [active] = active_profiles(lab.root, state=lab.state)
    assert active["name"] == "cxl-cpuless-node1" and active["state"] == "applied"
    assert active["applied_utc"] is not None and active["skipped"] == []
    knobs = {k["path"]: k for k in active["knobs"]}
    assert knobs["sys/devices/system/cpu/cpu4/online"] == {
        "action": "actions[0] node_cpus", "path": "sys/devices/system/cpu/cpu4/online", "old": "1", "set": "0",
        "now": "0"}
    assert knobs["proc/sys/kernel/randomize_va_space"]["old"] == "2"
    assert knobs["proc/sys/kernel/randomize_va_space"]["now"] == "1"
    assert knobs["swap /swapfile"]["now"] == "off"
    json.dumps(active)  # a manifest stores it as JSON


def test_active_profiles_never_raises_on_a_broken_journal(lab: Lab) -> None:
    lab.state.mkdir()
    (lab.state / "broken.json").write_text("{not json")
    [entry] = active_profiles(lab.root, state=lab.state)
    assert entry["name"] == "broken" and "unreadable" in entry["error"]
    assert active_profiles(lab.root, state=lab.root / "no-such-dir") == []


def test_active_profiles_says_so_when_the_state_dir_is_unreadable(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("apply", "kernel-tiering").exit_code == 0
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    [entry] = active_profiles(lab.root, state=lab.state)
    assert entry["name"] is None and "cannot read the lab state dir" in entry["error"]


def test_run_manifest_records_the_active_profile(lab: Lab) -> None:
    from tieremu.numa.topology import discover
    from tieremu.runner import manifest

    assert run("apply", "kernel-tiering").exit_code == 0
    [active] = manifest.collect(discover(lab.root)).lab_profiles
    assert active["name"] == "kernel-tiering" and active["applied_utc"]
    knobs = {k["path"].rsplit("/", 1)[-1]: k for k in active["knobs"]}
    assert knobs["numa_balancing"]["now"] == "2" and knobs["numa_balancing"]["set"] == "2"


def test_plan_apply_and_teardown_print_json(lab: Lab) -> None:
    plan = run("plan", "kernel-tiering", "--json")
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.stdout)
    assert data["profile"] == "kernel-tiering" and data["writes"] == 2 and data["blocking"] == []
    assert any(s["path"].endswith("numa_balancing") and s["new"] == "2" for a in data["actions"] for s in a["steps"])
    dry = run("apply", "kernel-tiering", "--dry-run", "--json")
    assert json.loads(dry.stdout) == data | {"dry_run": True} and lab.changes() == []
    applied = run("apply", "kernel-tiering", "--json")
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.stdout)["writes"] == 2
    down = run("teardown", "kernel-tiering", "--json")
    assert down.exit_code == 0, down.output
    restored = json.loads(down.stdout)
    assert len(restored["restored"]) == 2 and restored["failed"] == [] and lab.changes() == []
