"""What applying a profile would do on this machine, computed without writing anything."""

from __future__ import annotations

from dataclasses import dataclass

from tieremu.lab.actions import Action, Reading
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.profile import Profile
from tieremu.lab.steps import Step


def action_label(index: int, action: Action) -> str:
    """How tables and the journal name an action: its position in the profile and its kind."""
    return f"actions[{index}] {action.kind}"


@dataclass(frozen=True)
class PlannedAction:
    label: str
    action: Action
    unsupported: str | None
    steps: tuple[Step, ...]
    readings: tuple[Reading, ...]

    @property
    def blocking(self) -> bool:
        """Unsupported and required: the profile cannot be applied here."""
        return self.unsupported is not None and self.action.required


@dataclass(frozen=True)
class Plan:
    profile: Profile
    root: str
    actions: tuple[PlannedAction, ...]

    @property
    def steps(self) -> list[Step]:
        return [s for a in self.actions for s in a.steps]

    @property
    def blocking(self) -> list[PlannedAction]:
        return [a for a in self.actions if a.blocking]

    @property
    def skipped(self) -> list[PlannedAction]:
        return [a for a in self.actions if a.unsupported is not None and not a.action.required]


def make_plan(profile: Profile, fs: KernelFS) -> Plan:
    """Each action's support, its steps against the machine as it is now, and its knobs now.

    Later actions are planned against the current state, not the state earlier actions will leave;
    apply re-plans each action just before running it, so what it records is what it found.
    """
    planned = []
    for i, action in enumerate(profile.actions):
        reason = action.unsupported(fs)
        steps = () if reason is not None else tuple(action.plan(fs))
        readings = () if reason is not None else tuple(action.read(fs))
        planned.append(PlannedAction(action_label(i, action), action, reason, steps, readings))
    return Plan(profile=profile, root=str(fs.root), actions=tuple(planned))
