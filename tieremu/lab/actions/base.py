"""What every lab action offers: read, plan, apply, verify, restore.

An action is a declared intent ("node 1 has no online CPUs"). `read` compares it with the machine now,
`plan` turns it into steps with the old values read now, `apply` runs the steps (recording each one
first), `verify` re-reads after applying, `restore` undoes recorded steps in reverse. Only `plan`,
`read` and `unsupported` differ between actions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.errors import LabError
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import Step


@dataclass(frozen=True)
class Reading:
    """One knob: what the profile wants and what the kernel shows now (None: the file is absent)."""

    knob: str
    wanted: str
    now: str | None

    @property
    def ok(self) -> bool:
        return self.now == self.wanted


class Action(ABC):
    kind: ClassVar[str]
    params: ClassVar[tuple[str, ...]]  # the keys a profile entry of this kind may have, besides kind and required
    required: bool

    @classmethod
    @abstractmethod
    def from_section(cls, sec: Section, required: bool) -> Action:
        """Read the action's parameters (everything but `kind` and `required`) from its profile entry."""

    @abstractmethod
    def describe(self) -> str:
        """One line for tables: the kind and its parameters."""

    def unsupported(self, fs: KernelFS) -> str | None:
        """Why this machine cannot do the action (missing driver, file, node), or None."""
        return None

    @abstractmethod
    def read(self, fs: KernelFS) -> list[Reading]:
        """Each knob the action sets: wanted value and value now."""

    @abstractmethod
    def plan(self, fs: KernelFS) -> list[Step]:
        """The steps that take the machine from now to wanted; none when it is already there.

        Raises LabError for a value this machine refuses (out of hardware bounds, unknown mode).
        """

    def apply(self, fs: KernelFS, record: Callable[[Step], None]) -> Iterator[Step]:
        """Plan against the live state, then record and do each step; yields after each one."""
        for step in self.plan(fs):
            record(step)
            step.do(fs)
            yield step

    def verify(self, fs: KernelFS) -> list[Reading]:
        """The knobs that are not at the wanted value after applying."""
        return [r for r in self.read(fs) if not r.ok]

    def verify_message(self, mismatches: Sequence[Reading]) -> str:
        shown = "; ".join(f"{r.knob}: wanted {r.wanted}, kernel shows {r.now}" for r in mismatches)
        return f"{self.describe()}: the kernel did not take the change ({shown})"

    def restore(self, fs: KernelFS, steps: Sequence[Step]) -> None:
        for step in reversed(steps):
            step.revert(fs)


def require_value(fs: KernelFS, rel: str, what: str) -> str:
    value = fs.value(rel)
    if value is None:
        raise LabError(f"{what}: {fs.path(rel)} is missing")
    return value
