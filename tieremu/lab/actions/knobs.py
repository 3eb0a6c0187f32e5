"""Knobs that are one file holding one value: NUMA balancing, demotion, NMI watchdog, ASLR, KSM, SMT, turbo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tieremu.configfile import Section
from tieremu.lab import paths
from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.kernelfs import KernelFS
from tieremu.lab.steps import Step, Write


class FileKnob(Action):
    """One file, one value: unsupported when the file is absent."""

    absent_reason: ClassVar[str]

    def file(self, fs: KernelFS) -> str | None:
        """The file to write on this machine, or None when there is none."""
        return self.fixed_path if fs.exists(self.fixed_path) else None

    fixed_path: ClassVar[str]

    def wanted(self) -> str:
        raise NotImplementedError

    def unsupported(self, fs: KernelFS) -> str | None:
        return None if self.file(fs) is not None else self.absent_reason

    def read(self, fs: KernelFS) -> list[Reading]:
        rel = self.file(fs)
        if rel is None:
            return [Reading(self.fixed_path, self.wanted(), None)]
        return [Reading(rel, self.wanted(), fs.value(rel))]

    def plan(self, fs: KernelFS) -> list[Step]:
        rel = self.file(fs)
        if rel is None:
            return []
        now = fs.value(rel)
        return [] if now == self.wanted() or now is None else [Write(rel, now, self.wanted())]


@dataclass(frozen=True, kw_only=True)
class NumaBalancing(FileKnob):
    """kernel.numa_balancing: 0 off, 1 classic NUMA balancing, 2 memory-tiering promotion, 3 both."""

    kind: ClassVar[str] = "numa_balancing"
    params: ClassVar[tuple[str, ...]] = ("value",)
    fixed_path: ClassVar[str] = paths.NUMA_BALANCING
    absent_reason: ClassVar[str] = "no kernel.numa_balancing (kernel built without CONFIG_NUMA_BALANCING, or one node)"
    value: int
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> NumaBalancing:
        return cls(value=sec.get("value", int, choices=(0, 1, 2, 3)), required=required)

    def describe(self) -> str:
        return f"numa_balancing={self.value}"

    def wanted(self) -> str:
        return str(self.value)


@dataclass(frozen=True, kw_only=True)
class Demotion(FileKnob):
    """Whether reclaim demotes pages to a slower memory tier instead of discarding or swapping them."""

    kind: ClassVar[str] = "demotion"
    params: ClassVar[tuple[str, ...]] = ("enabled",)
    fixed_path: ClassVar[str] = paths.DEMOTION_ENABLED
    absent_reason: ClassVar[str] = "no numa/demotion_enabled (kernel older than 5.15)"
    enabled: bool
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Demotion:
        return cls(enabled=sec.get("enabled", bool), required=required)

    def describe(self) -> str:
        return f"demotion_enabled={str(self.enabled).lower()}"

    def wanted(self) -> str:
        return "true" if self.enabled else "false"


@dataclass(frozen=True, kw_only=True)
class NmiWatchdog(FileKnob):
    kind: ClassVar[str] = "nmi_watchdog"
    params: ClassVar[tuple[str, ...]] = ("enabled",)
    fixed_path: ClassVar[str] = paths.NMI_WATCHDOG
    absent_reason: ClassVar[str] = "no kernel.nmi_watchdog (kernel without the hard-lockup detector)"
    enabled: bool
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> NmiWatchdog:
        return cls(enabled=sec.get("enabled", bool), required=required)

    def describe(self) -> str:
        return f"nmi_watchdog={'on' if self.enabled else 'off'}"

    def wanted(self) -> str:
        return "1" if self.enabled else "0"


@dataclass(frozen=True, kw_only=True)
class Aslr(FileKnob):
    """kernel.randomize_va_space: 0 off, 1 stack/mmap/vdso, 2 also the heap."""

    kind: ClassVar[str] = "aslr"
    params: ClassVar[tuple[str, ...]] = ("value",)
    fixed_path: ClassVar[str] = paths.ASLR
    absent_reason: ClassVar[str] = "no kernel.randomize_va_space"
    value: int
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Aslr:
        return cls(value=sec.get("value", int, choices=(0, 1, 2)), required=required)

    def describe(self) -> str:
        return f"randomize_va_space={self.value}"

    def wanted(self) -> str:
        return str(self.value)


@dataclass(frozen=True, kw_only=True)
class Ksm(FileKnob):
    """KSM: 0 stop merging (merged pages stay merged), 1 run, 2 stop and unmerge everything."""

    kind: ClassVar[str] = "ksm"
    params: ClassVar[tuple[str, ...]] = ("run",)
    fixed_path: ClassVar[str] = paths.KSM_RUN
    absent_reason: ClassVar[str] = "no /sys/kernel/mm/ksm (kernel without CONFIG_KSM)"
    run: int
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Ksm:
        return cls(run=sec.get("run", int, choices=(0, 1, 2)), required=required)

    def describe(self) -> str:
        return f"ksm run={self.run}"

    def wanted(self) -> str:
        return str(self.run)


@dataclass(frozen=True, kw_only=True)
class Smt(FileKnob):
    """SMT on/off through the kernel's hotplug control (off offlines every sibling thread)."""

    kind: ClassVar[str] = "smt"
    params: ClassVar[tuple[str, ...]] = ("control",)
    fixed_path: ClassVar[str] = paths.SMT_CONTROL
    absent_reason: ClassVar[str] = "no cpu/smt/control (kernel without CONFIG_HOTPLUG_SMT)"
    # What the file shows when the kernel cannot switch SMT at run time.
    FIXED_STATES: ClassVar[tuple[str, ...]] = ("notsupported", "notimplemented", "forceoff")
    control: str
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Smt:
        # YAML 1.1 reads a bare on/off as a boolean; take it as the word it was meant to be.
        control = sec.get("control", (str, bool))
        control = {True: "on", False: "off"}.get(control, control) if isinstance(control, bool) else control
        if control not in ("on", "off"):
            raise sec.error("control", f"{control!r} is not valid; valid: on, off")
        return cls(control=control, required=required)

    def describe(self) -> str:
        return f"smt={self.control}"

    def wanted(self) -> str:
        return self.control

    def unsupported(self, fs: KernelFS) -> str | None:
        now = fs.value(self.fixed_path)
        if now in self.FIXED_STATES:
            return f"SMT cannot be switched here (cpu/smt/control shows {now})"
        return super().unsupported(fs)


@dataclass(frozen=True, kw_only=True)
class Turbo(FileKnob):
    """Turbo/boost: intel_pstate's no_turbo (inverted sense) where present, else cpufreq's boost."""

    kind: ClassVar[str] = "turbo"
    params: ClassVar[tuple[str, ...]] = ("enabled",)
    fixed_path: ClassVar[str] = paths.NO_TURBO
    absent_reason: ClassVar[str] = "neither intel_pstate/no_turbo nor cpufreq/boost (no turbo control here)"
    enabled: bool
    required: bool = True

    @classmethod
    def from_section(cls, sec: Section, required: bool) -> Turbo:
        return cls(enabled=sec.get("enabled", bool), required=required)

    def describe(self) -> str:
        return f"turbo={'on' if self.enabled else 'off'}"

    def file(self, fs: KernelFS) -> str | None:
        return next((p for p in (paths.NO_TURBO, paths.BOOST) if fs.exists(p)), None)

    def read(self, fs: KernelFS) -> list[Reading]:
        rel = self.file(fs)
        return [Reading(rel or self.fixed_path, self._wanted_for(rel), None if rel is None else fs.value(rel))]

    def plan(self, fs: KernelFS) -> list[Step]:
        rel = self.file(fs)
        if rel is None:
            return []
        now, want = fs.value(rel), self._wanted_for(rel)
        return [] if now == want or now is None else [Write(rel, now, want)]

    def _wanted_for(self, rel: str | None) -> str:
        on = "0" if rel == paths.NO_TURBO or rel is None else "1"
        return on if self.enabled else str(1 - int(on))
