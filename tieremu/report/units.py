"""Units chosen per magnitude, for axes and table columns: 0.012 GB/s is shown as 12 MB/s, 0.0004 s as 400 µs.

Rates are decimal (kB/s, MB/s, GB/s: what the probes and fio report), sizes binary (KiB, MiB, GiB: what page and
block sizes are), so a figure never mixes the two systems. A unit this module does not know is kept as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Each family in increasing size, with the size of each unit in the family's base unit.
TIME = (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0))
RATE = (("B/s", 1.0), ("kB/s", 1e3), ("MB/s", 1e6), ("GB/s", 1e9), ("TB/s", 1e12))
SIZE = (("B", 1.0), ("KiB", 2.0 ** 10), ("MiB", 2.0 ** 20), ("GiB", 2.0 ** 30), ("TiB", 2.0 ** 40))
FAMILIES = (TIME, RATE, SIZE)
ALIASES = {"us": "µs", "KB/s": "kB/s"}


@dataclass(frozen=True)
class Scale:
    """How to show figures recorded in `source`: multiply by `factor`, label with `unit`."""

    source: str
    unit: str
    factor: float

    def __call__(self, value: float) -> float:
        return value * self.factor


def scale_for(values: Iterable[float], unit: str) -> Scale:
    """The largest unit of the unit's family in which the median magnitude of the values is at least 1 (so the
    typical figure reads 1..999); the unit itself when it is not one of the families or there are no figures."""
    name = ALIASES.get(unit, unit)
    family = next((f for f in FAMILIES if any(u == name for u, _ in f)), None)
    magnitudes = sorted(abs(v) for v in values if math.isfinite(v) and v != 0)
    if family is None or not magnitudes:
        return Scale(unit, unit, 1.0)
    size = dict(family)[name]
    typical = magnitudes[len(magnitudes) // 2] * size
    chosen, chosen_size = family[0]
    for u, s in family:
        if typical >= s * 0.9995:  # 999.6 MB/s stays MB/s only below the rounding point of the next unit
            chosen, chosen_size = u, s
    return Scale(unit, chosen, size / chosen_size)
