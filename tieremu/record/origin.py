"""Where a figure comes from: every row says it, so an emulated or simulated number is never read as measured."""

from __future__ import annotations

from enum import Enum


class Origin(str, Enum):
    MEASURED = "measured"  # real hardware, this machine
    EMULATED = "emulated"  # a timing model (delay and bandwidth injection) on a real node
    VM = "vm"  # real kernel semantics inside tieremu's QEMU guest; speeds are emulation artefacts
    SIMULATED = "simulated"  # accounting only, no memory touched

    def __str__(self) -> str:
        return self.value


ORIGINS: tuple[str, ...] = tuple(o.value for o in Origin)
