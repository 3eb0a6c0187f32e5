"""Transparent huge pages: the `enabled` and `defrag` modes.

The files list every mode with the selected one in brackets ("always [madvise] never"); the kernel
takes the bare word. Which words exist depends on the kernel (defer+madvise is 4.11+), so the choices
are checked against the file itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.errors import LabError
from tieremu.lab import paths, values
from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import Step, Write

ENABLED_MODES = ("always", "madvise", "never")
DEFRAG_MODES = ("always", "defer", "defer+madvise", "madvise", "never")


@dataclass(frozen=True, kw_only=True)
class Thp(Action):
    kind: ClassVar[str] = "thp"
    params: ClassVar[tuple[str, ...]] = ("enabled", "defrag")
    enabled: str | None
    defrag: str | None
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Thp:
        enabled = sec.get("enabled", str, None, choices=ENABLED_MODES)
        defrag = sec.get("defrag", str, None, choices=DEFRAG_MODES)
        if enabled is None and defrag is None:
            raise sec.error("enabled", "a thp action sets enabled, defrag or both")
        return cls(enabled=enabled, defrag=defrag, required=required)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("enabled", self.enabled), ("defrag", self.defrag)) if v is not None]
        return "thp " + " ".join(parts)

    def _wanted(self) -> list[tuple[str, str]]:
        return [(f"{paths.THP_DIR}/{name}", mode) for name, mode in (("enabled", self.enabled),
                                                                    ("defrag", self.defrag)) if mode is not None]

    def unsupported(self, fs: KernelFS) -> str | None:
        missing = [rel for rel, _ in self._wanted() if not fs.exists(rel)]
        return f"no {', '.join(missing)} (kernel without transparent huge pages)" if missing else None

    def read(self, fs: KernelFS) -> list[Reading]:
        return [Reading(rel, mode, values.parse(values.SELECTED, fs.read(rel))) for rel, mode in self._wanted()]

    def plan(self, fs: KernelFS) -> list[Step]:
        steps: list[Step] = []
        for rel, mode in self._wanted():
            text = fs.read(rel)
            if text is None:
                continue
            offered = values.options(text)
            if mode not in offered:
                raise LabError(f"{self.describe()}: this kernel's {rel} offers {', '.join(offered)}, not {mode}")
            now = values.parse(values.SELECTED, text)
            if now != mode and now is not None:
                steps.append(Write(rel, now, mode, form=values.SELECTED))
        return steps
