"""Delay injection on the testbed's own access paths: what an emulated or shaped tier costs, paid in time.

Callers charge work as it happens (bytes moved through a tier, dependent accesses to it); the injector turns
the charges into nanoseconds with each tier's timing model and pays them in one busy-wait at `settle()`,
once per step or per operation, so the bookkeeping stays cheap. The spin is C (no GIL held), accurate to well
under a microsecond, and never a sleep. Every tier's audit says what was charged, what was injected and what
the bookkeeping itself cost.

An emulated GPU tier with a host link model (`emulate: {link: {gbps, latency_us}}`) has a second account, its
link's (`link_audits`): bytes crossing between host memory and the tier are charged the link's time in full, on
top of whatever the host tier they come from costs (the gather out of host memory and the DMA across are two
steps, as in tieremu's own staging path on a real GPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from tieremu.errors import ResolutionError
from tieremu.native.build import kernels, tsc_ticks_per_ns
from tieremu.tiers.timing import Calibration, LinkModel, TimingModel

LINK = "link:"  # debts and audits of a tier's host link are keyed "link:<tier>"


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


@dataclass
class LinkAudit:
    """What an emulated GPU tier's host link was charged: bytes and transfers across, and the time they cost."""

    tier: str
    gbps: float
    latency_ns: float
    charged_bytes: int = 0
    transfers: int = 0
    owed_ns: float = 0.0
    injected_ns: float = 0.0
    accounting_ns: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class DelayInjector:
    def __init__(self, models: Iterable[TimingModel], calibration: Calibration) -> None:
        self.models = {m.tier: m for m in models}
        self.calibration = calibration
        self.audits = {m.tier: TierAudit(m.tier, m.mode, m.target_latency_ns, dict(m.target_bandwidth_gbps))
                       for m in self.models.values()}
        self.links: dict[str, LinkModel] = {m.tier: m.link for m in self.models.values() if m.link is not None}
        self.link_audits = {t: LinkAudit(t, link.gbps, link.latency_ns) for t, link in self.links.items()}
        self._owed: dict[str, float] = {}  # charged since the last settle, per tier (or LINK + tier)

    @property
    def link_tier(self) -> str | None:
        """The emulated GPU tier whose link blocks cross (the first with a link model), or None."""
        return next(iter(self.links), None)

    def cross(self, tier: str, nbytes: int, transfers: int = 1) -> None:
        """Charge `transfers` crossings of tier's host link carrying nbytes in all (paid at the next settle)."""
        t0 = time.perf_counter_ns()
        ns = self.links[tier].crossing_ns(nbytes, transfers)
        audit = self.link_audits[tier]
        audit.charged_bytes += nbytes
        audit.transfers += transfers
        audit.owed_ns += ns
        key = LINK + tier
        self._owed[key] = self._owed.get(key, 0.0) + ns
        audit.accounting_ns += time.perf_counter_ns() - t0

    def owe_link(self, tier: str, nbytes: int) -> tuple[str, float]:
        """One crossing of nbytes, charged to the link's audit but paid by the caller with pay() (as owe())."""
        ns = self.links[tier].crossing_ns(nbytes)
        audit = self.link_audits[tier]
        audit.charged_bytes += nbytes
        audit.transfers += 1
        audit.owed_ns += ns
        return LINK + tier, ns

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
        for key, ns in owed.items():
            self._audit(key).injected_ns += spun * ns / total
        return spun

    def settle(self) -> float:
        """Pay what is owed by busy-waiting; returns the ns spun. Call once per step or operation."""
        total = sum(self._owed.values())
        if total <= 0:
            return 0.0
        spun = float(kernels().wait_ticks(round(total * tsc_ticks_per_ns())))
        for key, owed in self._owed.items():  # the spin pays every tier's (and link's) debt in proportion
            self._audit(key).injected_ns += spun * owed / total
        self._owed = {}
        return spun

    def _charge(self, tier: str, ns: float, *, nbytes: int = 0, accesses: int = 0) -> None:
        audit = self.audits[tier]
        audit.charged_bytes += nbytes
        audit.charged_accesses += accesses
        audit.owed_ns += ns
        if ns > 0:
            self._owed[tier] = self._owed.get(tier, 0.0) + ns

    def _audit(self, key: str) -> TierAudit | LinkAudit:
        return self.link_audits[key[len(LINK):]] if key.startswith(LINK) else self.audits[key]

    def _model(self, tier: str) -> TimingModel:
        try:
            return self.models[tier]
        except KeyError:
            raise ResolutionError(f"tier {tier!r} has no timing model; emulated or shaped tiers: "
                                  f"{', '.join(self.models) or 'none'}") from None
