"""Apply a profile with a durable journal and roll back on any failure; tear a profile down from its journal.

The order of events for every step is: journal on disk, then the write. A failure, Ctrl-C, SIGTERM or SIGHUP
(a closed terminal or dropped ssh session) mid-apply undoes the journalled steps in reverse order with those
signals held off, so the machine is left as it was. A process killed outright leaves its journal behind;
`teardown` finds it and undoes it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tieremu.errors import LabError, LabNotRootError, LabStateError, LabUnsupportedError, TieremuError
from tieremu.lab.journal import Entry, Journal, journal_path, journals, state_dir
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.plan import Plan, action_label, make_plan
from tieremu.lab.profile import Profile
from tieremu.lab.steps import Step

# Signals that end a shell session or ask a process to stop: each rolls an apply back (SIGINT is Ctrl-C).
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while a profile was being applied; like KeyboardInterrupt, it triggers a rollback."""

    def __init__(self, name: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(name)
        self.signum = signum


def require_root(what: str) -> None:
    uid = os.geteuid()
    if uid != 0:
        raise LabNotRootError(f"{what} changes kernel settings and must run as root (this is uid {uid}); "
                              "nothing was written. Run it with sudo; `tieremu lab plan` shows what it would "
                              "do and needs no root")


@dataclass(frozen=True)
class ApplyReport:
    profile: str
    journal: Path
    writes: int
    skipped: list[tuple[str, str]]  # (action, why it is unsupported here)


@dataclass(frozen=True)
class UndoReport:
    undone: list[Entry] = field(default_factory=list)
    failures: list[tuple[Entry, str]] = field(default_factory=list)
    not_restored: list[tuple[Entry, str | None]] = field(default_factory=list)  # undone, but reads back otherwise


class Applier:
    def __init__(self, profile: Profile, fs: KernelFS, state: str | os.PathLike[str] | None = None) -> None:
        self.profile = profile
        self.fs = fs
        self.state = state_dir(state, fs.root)

    def plan(self) -> Plan:
        return make_plan(self.profile, self.fs)

    def begin(self) -> Journal:
        """Check root and support, then create the journal; nothing is written before both checks pass."""
        require_root(f"applying lab profile {self.profile.name}")
        plan = self.plan()
        if plan.blocking:
            reasons = "; ".join(f"{a.label} ({a.action.describe()}): {a.unsupported}" for a in plan.blocking)
            raise LabUnsupportedError(f"profile {self.profile.name} cannot be applied on this machine, nothing "
                                      f"was written: {reasons}. Mark an action `required: false` to skip it "
                                      "where it is unsupported")
        skipped = [f"{a.label} ({a.action.describe()}): {a.unsupported}" for a in plan.skipped]
        return Journal.create(self.state, self.profile.name, self.profile.source, str(self.fs.root), skipped)

    def run(self, journal: Journal) -> Iterator[Step]:
        """Do every supported action's steps, journalling each first; yields after each step."""
        for i, action in enumerate(self.profile.actions):
            label = action_label(i, action)
            reason = action.unsupported(self.fs)
            if reason is not None:
                if action.required:
                    # Supported when planned, not any more: an earlier action took away what it needs.
                    raise LabUnsupportedError(f"{label} ({action.describe()}): {reason}")
                continue
            yield from action.apply(self.fs, lambda step, label=label: journal.record(label, step))
            mismatches = action.verify(self.fs)
            if mismatches:
                raise LabError(action.verify_message(mismatches))

    def apply(self) -> ApplyReport:
        journal = self.begin()
        writes = 0
        try:
            with _sigterm_raises():
                for _ in self.run(journal):
                    writes += 1
                journal.mark_applied()
        except BaseException as exc:
            report = undo(journal, self.fs)
            if report.failures:
                failed = "; ".join(msg for _, msg in report.failures)
                raise LabError(f"applying {self.profile.name} failed ({exc or type(exc).__name__}) and the "
                               f"rollback could not undo everything: {failed}. The rest is in {journal.path}; "
                               f"fix the cause and run `tieremu lab teardown {self.profile.name}`") from exc
            raise
        skipped = [(a.label, a.unsupported or "") for a in self.plan().skipped]
        return ApplyReport(self.profile.name, journal.path, writes, skipped)


def undo(journal: Journal, fs: KernelFS) -> UndoReport:
    """Undo the journal's steps newest first, saving progress after each; remove it when all are undone.

    Ctrl-C, SIGTERM and SIGHUP are ignored meanwhile: stopping half-way would leave the machine in a state
    nobody asked for. A step that fails stays in the journal, and later (older) steps are still tried.
    """
    report = UndoReport()
    with _signals_ignored():
        remaining = list(journal.entries)
        failed: list[Entry] = []
        while remaining:
            entry = remaining.pop()
            try:
                entry.step.revert(fs)
            except (TieremuError, OSError) as exc:
                failed.insert(0, entry)
                report.failures.append((entry, f"{entry.action}: {exc}"))
            else:
                report.undone.append(entry)
            journal.entries = remaining + failed
            journal.save()
        if not failed:
            journal.remove()
    for entry in report.undone:
        try:
            ok = entry.step.restored(fs)
        except (TieremuError, OSError):
            ok = False
        if not ok:
            report.not_restored.append((entry, entry.step.now(fs)))
    return report


def load_journal(name: str, fs: KernelFS, state: str | os.PathLike[str] | None = None) -> Journal:
    path = journal_path(state_dir(state, fs.root), name)
    if not path.exists():
        active = ", ".join(p.stem for p in journals(state_dir(state, fs.root))) or "none"
        raise LabStateError(f"profile {name} is not applied here: no journal at {path} (active: {active})")
    journal = Journal.load(path)
    if Path(journal.root) != fs.root:
        raise LabStateError(f"the journal of {name} was written for sysfs root {journal.root}, not {fs.root}; "
                            f"pass --sysfs-root {journal.root}")
    if journal.applying_elsewhere:
        raise LabStateError(f"profile {name} is being applied right now by pid {journal.pid}; wait for it, "
                            "or stop it (it rolls back on SIGTERM)")
    return journal


def teardown(name: str, fs: KernelFS, state: str | os.PathLike[str] | None = None) -> UndoReport:
    """Restore every knob the journal of profile `name` recorded, newest first."""
    require_root(f"tearing down lab profile {name}")
    return undo(load_journal(name, fs, state), fs)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signal.Signals(signum).name, signum)

    previous = {sig: signal.signal(sig, handler) for sig in ENDING_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *ENDING_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
