"""The one number check, shared by config files and command-line options: finite, and within a documented range.

YAML reads `.inf` and `.nan` as floats, `1e21` as a float that fits no memory, and click's FloatRange lets NaN
through (every comparison with NaN is false). Every number a user gives goes through `number_problem`, so no
layer below has to guard against infinities, NaN or absurd magnitudes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Upper bounds that no real experiment reaches but that keep arithmetic and loops finite.
MAX_MIB = 2**30  # 1 PiB in MiB: more than any machine's memory or disk
MAX_SECONDS = 7 * 24 * 3600.0  # a week: longer than any run, timeout or duration
MAX_RATIO = 1000.0  # slowdown or speed ratios to the local node
MAX_NS = 1e9  # a latency or per-access cost of one second
MAX_GBPS = 1e5  # 100 TB/s
MAX_COUNT = 10**6  # repetitions, rounds, steps: anything that multiplies the runs or the loop length
MAX_TOKENS = 1 << 20  # a prompt or a KV block of a million tokens: past any model's context
MAX_SEED = 2**32 - 1  # numpy and torch both take it, with room for the run's own offset
MAX_THREADS = 1024


@dataclass(frozen=True)
class Range:
    """Valid values: finite, lo < v (or lo <= v when lo_closed) and v <= hi; integer if `integer`."""

    lo: float | None = None
    hi: float | None = None
    lo_closed: bool = True
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        # integer bounds exactly (`:g` would print 4294967295 as 4.29497e+09)
        def show(bound: float) -> str:
            return str(int(bound)) if self.integer else f"{bound:g}"

        parts = []
        if self.lo is not None:
            parts.append(f"{'>=' if self.lo_closed else '>'} {show(self.lo)}")
        if self.hi is not None:
            parts.append(f"<= {show(self.hi)}")
        return f"{kind} {' and '.join(parts)}".strip()


POSITIVE = Range(0, None, lo_closed=False)
NON_NEGATIVE = Range(0, None)
POSITIVE_INT = Range(1, None, integer=True)
SEED = Range(0, MAX_SEED, integer=True)
MIB = Range(1, MAX_MIB, integer=True)  # a size in whole MiB


def number_problem(value: object, valid: Range) -> str | None:
    """Why value is not a valid number in the range (None: it is). Bools are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected {valid.describe()}, got {type(value).__name__}"
    if valid.integer and not isinstance(value, int):
        return f"expected {valid.describe()}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not finite: must be {valid.describe()}"
    if valid.lo is not None and (value < valid.lo or (value == valid.lo and not valid.lo_closed)):
        return f"{_short(value)}: must be {valid.describe()}"
    if valid.hi is not None and value > valid.hi:
        return f"{_short(value)}: must be {valid.describe()}"
    return None


def finite_problem(value: object) -> str | None:
    """Why a float is not finite (None for finite numbers and non-numbers): the check every float read gets."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a finite number"
    return None


def _short(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
