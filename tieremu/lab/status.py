"""Whether a profile is active and which of its knobs have drifted; the active profiles for run manifests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tieremu.errors import TieremuError
from tieremu.lab.actions.base import Reading
from tieremu.lab.journal import Journal, journal_path, journals, state_dir
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.plan import action_label
from tieremu.lab.profile import Profile


@dataclass(frozen=True)
class KnobStatus(Reading):
    """A knob's reading, with the action of the profile it belongs to."""

    action: str


@dataclass(frozen=True)
class Unsupported:
    action: str
    reason: str
    required: bool


@dataclass(frozen=True)
class ProfileStatus:
    profile: Profile
    journal: Journal | None
    knobs: tuple[KnobStatus, ...]
    unsupported: tuple[Unsupported, ...]

    @property
    def active(self) -> bool:
        return self.journal is not None and self.journal.applied_utc is not None

    @property
    def drift(self) -> list[KnobStatus]:
        """Knobs that no longer hold the profile's value; only meaningful while the profile is active."""
        return [k for k in self.knobs if not k.ok]


def profile_status(profile: Profile, fs: KernelFS, state: str | os.PathLike[str] | None = None) -> ProfileStatus:
    path = journal_path(state_dir(state, fs.root), profile.name)
    journal = Journal.load(path) if path.exists() else None
    knobs: list[KnobStatus] = []
    unsupported: list[Unsupported] = []
    for i, action in enumerate(profile.actions):
        label = action_label(i, action)
        try:
            reason = action.unsupported(fs)
            readings = [] if reason is not None else action.read(fs)
        except TieremuError as exc:
            reason, readings = f"cannot read: {exc}", []
        if reason is not None:
            unsupported.append(Unsupported(label, reason, action.required))
        knobs += [KnobStatus(knob=r.knob, wanted=r.wanted, now=r.now, action=label) for r in readings]
    return ProfileStatus(profile, journal, tuple(knobs), tuple(unsupported))


def active_profiles(root: str | os.PathLike[str] | None = None, *,
                    state: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every profile with a journal, for a run manifest: name, source, when it was applied (None: the apply
    did not finish), the actions skipped as unsupported, and each recorded knob as path, old value (what
    teardown restores), value set and value read now. Never raises: a manifest must not fail a run.
    """
    fs = KernelFS(root)
    out: list[dict[str, Any]] = []
    where = state_dir(state, fs.root)
    if where.exists() and not os.access(where, os.R_OK | os.X_OK):
        # Saying nothing here would record "no profile active" for a machine that has one.
        return [{"name": None, "error": f"cannot read the lab state dir {where} as uid {os.geteuid()}"}]
    for path in journals(where):
        try:
            journal = Journal.load(path)
        except TieremuError as exc:
            out.append({"name": path.stem, "error": str(exc)})
            continue
        knobs = []
        for entry in journal.entries:
            try:
                now = entry.step.now(fs)
            except (TieremuError, OSError):
                now = None
            knobs.append({"action": entry.action, "path": entry.step.target, "old": entry.step.shown_old,
                          "set": entry.step.new, "now": now})
        out.append({"name": journal.profile, "source": journal.source, "root": journal.root,
                    "applied_utc": journal.applied_utc, "state": journal.state, "skipped": journal.skipped,
                    "knobs": knobs})
    return out
