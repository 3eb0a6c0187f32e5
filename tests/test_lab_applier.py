"""Apply is all or nothing: failures, Ctrl-C, SIGTERM and crashes leave (or let teardown make) the tree as before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fixtures.lab.fakekernel import Lab, fail_at, make_lab

from tieremu.errors import LabError, LabNotRootError, LabStateError, LabUnsupportedError
from tieremu.lab.applier import Applier, Terminated, teardown
from tieremu.lab.journal import Journal, process_start
from tieremu.lab.profile import Profile, load_profile, resolve_profile
from tieremu.lab.status import active_profiles, profile_status

# Every action kind at once, in an order where later actions depend on earlier ones (governor and
# resctrl see node 1 offline; the cgroup needs controllers enabled before its directory exists).
EVERYTHING = """\
name: everything
actions:
  - {kind: node_cpus, node: 1, online: false}
  - {kind: uncore_freq, package: 1, min_khz: lowest, max_khz: lowest}
  - {kind: uncore_freq, package: 0, min_khz: 1200000, max_khz: 2000000}
  - {kind: resctrl_mba, group: tieremu-test, node: 0, percent: 50}
  - {kind: numa_balancing, value: 2}
  - {kind: demotion, enabled: true}
  - {kind: thp, enabled: never, defrag: defer}
  - {kind: hugepages, node: 1, pages: 64}
  - {kind: nmi_watchdog, enabled: false}
  - {kind: aslr, value: 0}
  - {kind: ksm, run: 2}
  - {kind: smt, control: "off"}
  - {kind: turbo, enabled: false}
  - {kind: governor, governor: performance}
  - {kind: swap, enabled: false}
  - {kind: cgroup, name: tieremu-test, memory_max: 8G, memory_high: 6G, cpus: 0-3, mems: 0}
"""


def _count_mutations() -> int:
    """How many kernel mutations applying EVERYTHING makes on a fresh fixture (the parametrization range)."""
    saved = os.geteuid
    os.geteuid = lambda: 0  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lab = make_lab(Path(tmp))
            Applier(load_profile(lab.profile_file(EVERYTHING)), lab.fs, lab.state).apply()
            return len(lab.fs.log)
    finally:
        os.geteuid = saved  # type: ignore[assignment]


STEPS = _count_mutations()


@pytest.fixture(autouse=True)
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return make_lab(tmp_path)


def everything(lab: Lab) -> Profile:
    return load_profile(lab.profile_file(EVERYTHING))


def test_everything_applies_and_tears_down_exactly(lab: Lab) -> None:
    assert STEPS >= 30
    report = Applier(everything(lab), lab.fs, lab.state).apply()
    assert report.writes == STEPS
    assert report.skipped == []
    assert len(lab.changes()) > 20
    result = teardown("everything", lab.fs, lab.state)
    assert len(result.undone) == STEPS and not result.failures and not result.not_restored
    assert lab.changes() == []
    assert not (lab.state / "everything.json").exists()


@pytest.mark.parametrize("step", range(STEPS))
def test_failure_at_any_step_rolls_back_to_exactly_before(lab: Lab, step: int) -> None:
    lab.fs.hook = hook = fail_at(step, OSError(5, "Input/output error"))
    with pytest.raises(LabError, match="Input/output error"):
        Applier(everything(lab), lab.fs, lab.state).apply()
    assert hook.fired  # type: ignore[attr-defined]
    assert lab.changes() == []
    assert list(lab.state.iterdir()) == []


@pytest.mark.parametrize("step", [0, 7, STEPS // 2, STEPS - 1])
def test_ctrl_c_mid_apply_rolls_back(lab: Lab, step: int) -> None:
    lab.fs.hook = fail_at(step, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        Applier(everything(lab), lab.fs, lab.state).apply()
    assert lab.changes() == []
    assert list(lab.state.iterdir()) == []


def test_sigterm_mid_apply_rolls_back_and_restores_the_handler(lab: Lab) -> None:
    before = signal.getsignal(signal.SIGTERM)
    count = 0

    def hook(op: str, target: str, value: str) -> None:
        nonlocal count
        count += 1
        if count == 12:
            os.kill(os.getpid(), signal.SIGTERM)

    lab.fs.hook = hook
    with pytest.raises(Terminated):
        Applier(everything(lab), lab.fs, lab.state).apply()
    assert count > 12  # the rollback ran through the same kernel
    assert lab.changes() == []
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("done", [0, 1, 4, 9, STEPS // 2, STEPS - 1, STEPS])
def test_crash_then_teardown_restores_exactly(lab: Lab, done: int) -> None:
    applier = Applier(everything(lab), lab.fs, lab.state)
    journal = applier.begin()
    run = applier.run(journal)
    for _ in range(done):
        next(run)
    del run, applier, journal  # the process "dies": no rollback, no mark_applied

    fs = lab.fresh_fs()  # a new process reads the journal it left
    assert profile_status(everything(lab), fs, lab.state).journal is not None
    [active] = active_profiles(lab.root, state=lab.state)
    assert active["applied_utc"] is None and len(active["knobs"]) == done
    result = teardown("everything", fs, lab.state)
    assert not result.failures
    assert lab.changes() == []
    assert not (lab.state / "everything.json").exists()


def test_a_journal_left_by_a_killed_process_is_used(lab: Lab) -> None:
    # A real separate process that applies part of a profile and is killed outright (SIGKILL).
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
os.geteuid = lambda: 0
from fixtures.lab.fakekernel import FakeKernel
from tieremu.lab.applier import Applier
from tieremu.lab.profile import load_profile
fs = FakeKernel({str(lab.root)!r})
def hook(op, target, value):
    if len(fs.log) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
fs.hook = hook
Applier(load_profile({str(lab.profile_file(EVERYTHING))!r}), fs, {str(lab.state)!r}).apply()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert lab.changes() != []
    journal = Journal.load(lab.state / "everything.json")
    assert journal.applied_utc is None and len(journal.entries) == 7  # the 7th was journalled, not done
    assert journal.state == "incomplete (the applying process died)"
    teardown("everything", lab.fresh_fs(), lab.state)
    assert lab.changes() == []


def test_teardown_refuses_while_another_live_process_is_applying(lab: Lab) -> None:
    applier = Applier(everything(lab), lab.fs, lab.state)
    journal = applier.begin()
    journal.pid, journal.pid_start = 1, process_start(1)
    journal.save()
    with pytest.raises(LabStateError, match="being applied right now by pid 1"):
        teardown("everything", lab.fs, lab.state)


def test_each_old_value_is_on_disk_before_its_write(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    journal_file = lab.state / "everything.json"
    seen = 0

    def hook(op: str, target: str, value: str) -> None:
        nonlocal seen
        entries = json.loads(journal_file.read_text())["entries"]
        assert len(entries) == seen + 1, f"{op} {target}: journal holds {len(entries)} entries"
        step = entries[-1]["step"]
        assert target == step.get("path", step.get("device")), (op, target, step)
        # Since the previous mutation: the journal's data and then its directory reached the disk.
        since = events[events.index(("mutation", str(seen - 1))) + 1:] if seen else events
        fsynced = [p for kind, p in since if kind == "fsync"]
        assert any(p.startswith(str(lab.state / ".everything.json")) for p in fsynced), fsynced
        assert fsynced[-1] == str(lab.state), fsynced
        events.append(("mutation", str(seen)))
        seen += 1

    lab.fs.hook = hook
    Applier(everything(lab), lab.fs, lab.state).apply()
    assert seen == STEPS


def test_required_but_unsupported_fails_before_anything_is_written(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, "minimal-vm")
    with pytest.raises(LabUnsupportedError) as exc:
        Applier(resolve_profile("remote-throttled"), lab.fs, lab.state).apply()
    assert "intel_uncore_frequency" in str(exc.value) and "nothing was written" in str(exc.value)
    assert lab.fs.log == []
    assert lab.changes() == []
    assert not lab.state.exists()


def test_optional_unsupported_actions_are_skipped_and_reported(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, "minimal-vm")
    report = Applier(resolve_profile("hygiene"), lab.fs, lab.state).apply()
    skipped = {label.split()[1] for label, _ in report.skipped}
    assert skipped == {"numa_balancing", "ksm", "nmi_watchdog", "turbo", "governor", "smt"}
    assert report.writes == 2  # THP enabled and ASLR; swap has no areas, defrag is already madvise
    teardown("hygiene", lab.fs, lab.state)
    assert lab.changes() == []


def test_without_root_apply_refuses_and_writes_nothing(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabNotRootError, match="must run as root") as exc:
        Applier(everything(lab), lab.fs, lab.state).apply()
    assert "uid 1000" in str(exc.value)
    assert lab.fs.log == []
    assert lab.changes() == []
    assert not lab.state.exists()


def test_without_root_teardown_refuses(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    Applier(everything(lab), lab.fs, lab.state).apply()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabNotRootError, match="root"):
        teardown("everything", lab.fs, lab.state)
    assert (lab.state / "everything.json").exists()


def test_applying_an_active_profile_again_is_refused(lab: Lab) -> None:
    Applier(everything(lab), lab.fs, lab.state).apply()
    writes = len(lab.fs.log)
    with pytest.raises(LabStateError, match="already has a journal"):
        Applier(everything(lab), lab.fs, lab.state).apply()
    assert len(lab.fs.log) == writes


def test_teardown_of_a_profile_that_is_not_applied_names_the_active_ones(lab: Lab) -> None:
    Applier(everything(lab), lab.fs, lab.state).apply()
    with pytest.raises(LabStateError, match=r"profile hygiene is not applied here.*active: everything"):
        teardown("hygiene", lab.fs, lab.state)


def test_teardown_refuses_another_sysfs_root(lab: Lab, tmp_path: Path) -> None:
    Applier(everything(lab), lab.fs, lab.state).apply()
    other = make_lab(tmp_path / "other")
    with pytest.raises(LabStateError, match="written for sysfs root"):
        teardown("everything", other.fs, lab.state)


def test_failed_rollback_keeps_the_journal_and_teardown_finishes_later(lab: Lab) -> None:
    failing = fail_at(20, OSError(5, "Input/output error"))

    def hook(op: str, target: str, value: str) -> None:
        failing(op, target, value)
        if op == "write" and target.endswith("randomize_va_space") and value == "2":
            raise OSError(16, "Device or resource busy")  # the undo of ASLR fails once

    lab.fs.hook = hook
    with pytest.raises(LabError, match=r"rollback could not undo everything.*teardown everything"):
        Applier(everything(lab), lab.fs, lab.state).apply()
    journal = Journal.load(lab.state / "everything.json")
    assert [e.step.target for e in journal.entries] == ["proc/sys/kernel/randomize_va_space"]
    assert lab.changes() == ["proc/sys/kernel/randomize_va_space: b'2\\n' -> b'0\\n'"]
    lab.fs.hook = None
    teardown("everything", lab.fs, lab.state)
    assert lab.changes() == []


def test_teardown_with_a_busy_cgroup_keeps_what_failed_and_resumes(lab: Lab) -> None:
    Applier(everything(lab), lab.fs, lab.state).apply()
    procs = lab.root / "sys/fs/cgroup/tieremu-test/cgroup.procs"
    procs.write_text("4242\n")
    result = teardown("everything", lab.fs, lab.state)
    assert [e.step.target for e, _ in result.failures] == ["sys/fs/cgroup/tieremu-test"]
    assert "EBUSY" in result.failures[0][1]
    procs.write_text("")
    result = teardown("everything", lab.fs, lab.state)
    assert not result.failures
    assert lab.changes() == []
