"""A lab profile held for the length of one run: a baseline that needs kernel knobs (the kernel's own tiering:
numa_balancing=2 and demotion) turns them on through the profile's journalled, reversible actions and restores them
when the run ends, however it ends. A worker killed outright leaves the journal behind, and `tieremu lab teardown`
restores from it, as after any apply.

A profile that is active already (applied by hand, or by a run that was killed) is left as found: the run uses it
and restores nothing, and says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tieremu.errors import LabError
from tieremu.lab.applier import Applier, teardown
from tieremu.lab.journal import journal_path, state_dir
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.profile import resolve_profile


@dataclass(frozen=True)
class HeldProfile:
    name: str
    applied: bool  # False: it was active before the run and is left as found
    writes: int  # knob writes the apply made (0: every knob was at its value already)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (action, why unsupported here)
    note: str = ""


@contextmanager
def profile_held(name: str, fs: KernelFS | None = None,
                 state: str | os.PathLike[str] | None = None) -> Iterator[HeldProfile]:
    """Apply lab profile `name` (a shipped name or a file) on `fs` (the machine's kernel by default), yield, then
    tear it down from its journal."""
    fs = fs or KernelFS()
    profile = resolve_profile(name)
    if journal_path(state_dir(state, fs.root), profile.name).exists():
        yield HeldProfile(profile.name, False, 0, note=f"lab profile {profile.name} was active before the run: "
                          "used as found, not restored")
        return
    report = Applier(profile, fs, state).apply()
    try:
        yield HeldProfile(profile.name, True, report.writes, list(report.skipped))
    finally:
        undone = teardown(profile.name, fs, state)
        if undone.failures:
            failed = "; ".join(msg for _, msg in undone.failures)
            raise LabError(f"restoring lab profile {profile.name} after the run failed: {failed}; run `tieremu lab "
                           f"teardown {profile.name}` once the cause is fixed")
