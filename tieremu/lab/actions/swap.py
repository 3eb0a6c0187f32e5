"""Swap off, so that memory pressure in an experiment shows up as reclaim and demotion, not paging to disk.

Restore must give each area its priority back. Explicit priorities are passed to swapon(2) again.
Automatic (negative) ones cannot be asked for: the kernel hands out -2, -3, ... in swapon order and
renumbers when an area goes away, so the automatic areas must come back in descending priority order.
/proc/swaps lists areas by slot, and a swapon takes the lowest free slot, so coming back in listing order
also restores the listing; that is the order used when it agrees with the priorities (it does when the
areas were enabled once at boot), else descending priority. Areas go off in the reverse of that order.
Discard options are not visible in /proc/swaps and come back as the kernel's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.lab import paths, values
from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import Step, SwapOff


@dataclass(frozen=True, kw_only=True)
class Swap(Action):
    kind: ClassVar[str] = "swap"
    params: ClassVar[tuple[str, ...]] = ("enabled",)
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Swap:
        sec.get("enabled", bool, check=lambda v: None if v is False else
                "a profile can only turn swap off; teardown turns it back on")
        return cls(required=required)

    def describe(self) -> str:
        return "swap off"

    def areas(self, fs: KernelFS) -> list[values.SwapArea]:
        return values.parse_swaps(fs.read(paths.PROC_SWAPS) or "")

    def unsupported(self, fs: KernelFS) -> str | None:
        return None if fs.exists(paths.PROC_SWAPS) else "no /proc/swaps (kernel without swap support)"

    def read(self, fs: KernelFS) -> list[Reading]:
        if not fs.exists(paths.PROC_SWAPS):
            return [Reading("swap", "off", None)]
        active = ", ".join(a.device for a in self.areas(fs))
        return [Reading("swap", "off", f"on: {active}" if active else "off")]

    def plan(self, fs: KernelFS) -> list[Step]:
        listed = self.areas(fs)
        automatic = [a.priority for a in listed if a.priority < 0]
        back_on = listed if automatic == sorted(automatic, reverse=True) else \
            sorted(listed, key=lambda a: a.priority, reverse=True)
        return [SwapOff(a.device, a.priority if a.priority >= 0 else None) for a in reversed(back_on)]
