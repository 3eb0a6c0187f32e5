"""Delay injection on the testbed's own access paths: what an emulated or shaped tier costs, paid in time.

Callers charge work as it happens (bytes moved through a tier, dependent accesses to it); the injector turns
the charges into nanoseconds with each tier's timing model and pays them in one busy-wait at `settle()`,
once per step or per operation, so the bookkeeping stays cheap. The spin is C (no GIL held), accurate to well
under a microsecond, and never a sleep. Every tier's audit says what was charged, what was injected and what
the bookkeeping itself cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from tieremu.errors import ResolutionError
from tieremu.native.build import kernels, tsc_ticks_per_ns
from tieremu.tiers.timing import Calibration, TimingModel


@dataclass
class TierAudit:
    tier: str
    mode: str  # emulated | shaped
    target_latency_ns: float
    target_bandwidth_gbps: dict[str, float]
    charged_bytes: int = 0
    charged_accesses: int = 0
    owed_ns: float = 0.0  # what the model says these charges cost beyond the host memory's own time
    injected_ns: float = 0.0  # what was actually spun
    accounting_ns: float = 0.0  # time spent in the bookkeeping itself

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class DelayInjector:
    def __init__(self, models: Iterable[TimingModel], calibration: Calibration) -> None:
        self.models = {m.tier: m for m in models}
        self.calibration = calibration
        self.audits = {m.tier: TierAudit(m.tier, m.mode, m.target_latency_ns, dict(m.target_bandwidth_gbps))
                       for m in self.models.values()}
        self._owed: dict[str, float] = {}  # charged since the last settle, per tier

    def emulates(self, tier: str) -> bool:
        return tier in self.models

    def transfer(self, tier: str, nbytes: int, kind: str = "read") -> None:
        """Charge nbytes streamed through tier: the time at its target bandwidth beyond the host's own."""
        t0 = time.perf_counter_ns()
        model = self._model(tier)
        owed = nbytes * (1 / model.target_bandwidth_gbps[kind] - 1 / model.host_bandwidth_gbps[kind])
        self._charge(tier, max(0.0, owed), nbytes=nbytes)
        self.audits[tier].accounting_ns += time.perf_counter_ns() - t0

    def accesses(self, tier: str, count: int) -> None:
        """Charge count dependent accesses (each waits for the one before): extra latency apiece."""
        t0 = time.perf_counter_ns()
        model = self._model(tier)
        self._charge(tier, count * max(0.0, model.extra_latency_ns), accesses=count)
        self.audits[tier].accounting_ns += time.perf_counter_ns() - t0

    def read(self, tier: str, blocks: int, nbytes: int) -> None:
        """Charge a read of `blocks` blocks (`nbytes` in all) from tier: each block one dependent access at the
        tier's extra latency, then the bytes at its bandwidth deficit. accesses() and transfer() in one call: it
        runs for every block-table read of a decode step, so its own cost counts."""
        t0 = time.perf_counter_ns()
        model = self._model(tier)
        owed = blocks * max(0.0, model.extra_latency_ns) + max(0.0, nbytes * (
            1 / model.target_bandwidth_gbps["read"] - 1 / model.host_bandwidth_gbps["read"]))
        self._charge(tier, owed, nbytes=nbytes, accesses=blocks)
        self.audits[tier].accounting_ns += time.perf_counter_ns() - t0

    def owe(self, tier: str, nbytes: int, kind: str = "read") -> float:
        """What one operation's transfer through tier costs beyond the host's own time, in ns, charged to the
        audit but kept out of the shared debt: the caller pays it itself with pay(), e.g. a migration thread
        that must not settle the workload's reads, nor hold a lock while it waits."""
        t0 = time.perf_counter_ns()
        model = self._model(tier)
        owed = max(0.0, nbytes * (1 / model.target_bandwidth_gbps[kind] - 1 / model.host_bandwidth_gbps[kind]))
        audit = self.audits[tier]
        audit.charged_bytes += nbytes
        audit.owed_ns += owed
        audit.accounting_ns += time.perf_counter_ns() - t0
        return owed

    def pay(self, owed: dict[str, float]) -> float:
        """Busy-wait what owe() returned (per tier); returns the ns spun."""
        total = sum(owed.values())
        if total <= 0:
            return 0.0
        spun = float(kernels().wait_ticks(round(total * tsc_ticks_per_ns())))
        for tier, ns in owed.items():
            self.audits[tier].injected_ns += spun * ns / total
        return spun

    def settle(self) -> float:
        """Pay what is owed by busy-waiting; returns the ns spun. Call once per step or operation."""
        total = sum(self._owed.values())
        if total <= 0:
            return 0.0
        spun = float(kernels().wait_ticks(round(total * tsc_ticks_per_ns())))
        for tier, owed in self._owed.items():  # the spin pays every tier's debt in proportion
            self.audits[tier].injected_ns += spun * owed / total
        self._owed = {}
        return spun

    def _charge(self, tier: str, ns: float, *, nbytes: int = 0, accesses: int = 0) -> None:
        audit = self.audits[tier]
        audit.charged_bytes += nbytes
        audit.charged_accesses += accesses
        audit.owed_ns += ns
        if ns > 0:
            self._owed[tier] = self._owed.get(tier, 0.0) + ns

    def _model(self, tier: str) -> TimingModel:
        try:
            return self.models[tier]
        except KeyError:
            raise ResolutionError(f"tier {tier!r} has no timing model; emulated or shaped tiers: "
                                  f"{', '.join(self.models) or 'none'}") from None
