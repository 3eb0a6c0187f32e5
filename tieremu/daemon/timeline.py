"""Migrations over time: the daemon's move records binned into fixed windows of a run, for plots and tables.

A window's rate is the bytes its moves carried over the window's length (not over the moves' own durations), so
that a series of windows adds up to the run's migration traffic and idle stretches show as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tieremu.errors import ConfigError
from tieremu.kv.pool import MoveRecord


@dataclass(frozen=True)
class MigrationWindow:
    start_s: float  # seconds since the run began
    seconds: float
    bytes: int
    promotions: int  # moves that succeeded towards a faster tier
    demotions: int  # moves that succeeded towards a slower tier
    failed: int  # moves that did not succeed

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9


def migration_timeline(records: Sequence[MoveRecord], order: Sequence[str], *, start: float, end: float,
                       window_s: float) -> list[MigrationWindow]:
    """Moves between monotonic times `start` and `end`, in windows of `window_s` (the last one shorter); tiers
    are ranked by `order`, fastest first. Moves outside [start, end) are left out."""
    if not window_s > 0:
        raise ConfigError(f"migration timeline: window_s={window_s} must be positive (seconds)")
    if end <= start:
        return []
    rank = {name: i for i, name in enumerate(order)}
    count = max(1, int((end - start) // window_s) + (1 if (end - start) % window_s else 0))
    bins = [[0, 0, 0, 0] for _ in range(count)]  # bytes, promotions, demotions, failed
    for rec in records:
        if not start <= rec.time < end:
            continue
        b = bins[min(count - 1, int((rec.time - start) // window_s))]
        if not rec.ok:
            b[3] += 1
            continue
        b[0] += rec.bytes
        if rank[rec.target] < rank[rec.source]:
            b[1] += 1
        elif rank[rec.target] > rank[rec.source]:
            b[2] += 1
    windows = []
    for i, (moved, up, down, failed) in enumerate(bins):
        begin = i * window_s
        windows.append(MigrationWindow(begin, min(window_s, (end - start) - begin), moved, up, down, failed))
    return windows
