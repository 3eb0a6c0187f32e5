"""The primitive changes a profile makes, each with its exact inverse.

An action turns into a list of steps; the applier records each step in the journal before doing it and
undoes recorded steps in reverse order. Undo is idempotent (it checks or rewrites state rather than
assuming the step happened), because a step is journalled before it runs and may never have run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from tieremu.errors import LabStateError
from tieremu.lab import values
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.paths import PROC_SWAPS


@dataclass(frozen=True)
class Write:
    """Write `new` to a knob file; undo writes `undo` (default: the old value) back."""

    op: ClassVar[str] = "write"
    path: str
    old: str
    new: str
    undo: str | None = None
    form: str = values.PLAIN
    # The file lives in a directory this profile created: removing the directory undoes it.
    in_new_dir: bool = False

    @property
    def target(self) -> str:
        return self.path

    @property
    def shown_old(self) -> str:
        return "(new group)" if self.in_new_dir else self.old

    @property
    def shown_restore(self) -> str:
        return "(goes with its group)" if self.in_new_dir else self.old if self.undo is None else self.undo

    def do(self, fs: KernelFS) -> None:
        fs.write(self.path, self.new)

    def revert(self, fs: KernelFS) -> None:
        if not self.in_new_dir:
            fs.write(self.path, self.old if self.undo is None else self.undo)

    def now(self, fs: KernelFS) -> str | None:
        return values.parse(self.form, fs.read(self.path))

    def restored(self, fs: KernelFS) -> bool:
        if self.in_new_dir:
            return True
        if self.undo is not None:
            # An undo that is not the old value (cgroup "+memory" / "-memory"): compare word sets.
            return set((self.now(fs) or "").split()) == set(self.old.split())
        return self.now(fs) == self.old


@dataclass(frozen=True)
class MakeDir:
    """Create a resctrl or cgroup group; undo removes it (the kernel removes its files with it)."""

    op: ClassVar[str] = "mkdir"
    path: str

    @property
    def target(self) -> str:
        return self.path

    old: ClassVar[str] = "absent"
    new: ClassVar[str] = "created"
    shown_old: ClassVar[str] = "absent"
    shown_restore: ClassVar[str] = "removed"

    def do(self, fs: KernelFS) -> None:
        fs.mkdir(self.path)

    def revert(self, fs: KernelFS) -> None:
        if fs.is_dir(self.path):
            fs.rmdir(self.path)

    def now(self, fs: KernelFS) -> str | None:
        return "exists" if fs.is_dir(self.path) else "absent"

    def restored(self, fs: KernelFS) -> bool:
        return not fs.is_dir(self.path)


@dataclass(frozen=True)
class SwapOff:
    """swapoff one area; undo swaps it on again with its priority (None: the kernel's automatic one)."""

    op: ClassVar[str] = "swapoff"
    device: str
    priority: int | None

    @property
    def target(self) -> str:
        return f"swap {self.device}"

    @property
    def old(self) -> str:
        return f"on, priority {self.priority}" if self.priority is not None else "on, automatic priority"

    @property
    def shown_old(self) -> str:
        return self.old

    @property
    def shown_restore(self) -> str:
        return self.old

    new: ClassVar[str] = "off"

    def do(self, fs: KernelFS) -> None:
        fs.swapoff(self.device)

    def revert(self, fs: KernelFS) -> None:
        if self._area(fs) is None:
            fs.swapon(self.device, self.priority)

    def now(self, fs: KernelFS) -> str | None:
        area = self._area(fs)
        return "off" if area is None else f"on, priority {area.priority}"

    def restored(self, fs: KernelFS) -> bool:
        area = self._area(fs)
        return area is not None and (self.priority is None or area.priority == self.priority)

    def _area(self, fs: KernelFS) -> values.SwapArea | None:
        areas = values.parse_swaps(fs.read(PROC_SWAPS) or "")
        return next((a for a in areas if a.device == self.device), None)


Step = Write | MakeDir | SwapOff
_KINDS: dict[str, type[Write] | type[MakeDir] | type[SwapOff]] = {k.op: k for k in (Write, MakeDir, SwapOff)}


def step_to_json(step: Step) -> dict[str, Any]:
    return {"op": step.op, **asdict(step)}


def step_from_json(data: dict[str, Any]) -> Step:
    fields = dict(data)
    kind = _KINDS.get(fields.pop("op", None))  # type: ignore[arg-type]
    if kind is None:
        raise LabStateError(f"journal holds an unknown step {data!r}")
    try:
        return kind(**fields)
    except TypeError as exc:
        raise LabStateError(f"journal holds a malformed step {data!r}: {exc}") from None
