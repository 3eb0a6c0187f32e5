"""Migrations over time: the daemon's move records binned into windows that add up to the run's traffic."""

from __future__ import annotations

import pytest

from tieremu.daemon.timeline import migration_timeline
from tieremu.errors import ConfigError
from tieremu.kv.pool import MoveRecord

ORDER = ("dram", "cxl", "far")


def record(time: float, source: str, target: str, nbytes: int = 1 << 20, ok: bool = True) -> MoveRecord:
    return MoveRecord(time=time, block=1, source=source, target=target, kind="copy", bytes=nbytes if ok else 0,
                      pages_moved=0, seconds=0.001, injected_seconds=0.0, ok=ok)


def test_moves_fall_in_their_windows_by_direction() -> None:
    records = [record(10.01, "cxl", "dram"), record(10.02, "dram", "far"), record(10.15, "dram", "cxl"),
               record(10.16, "far", "cxl", ok=False), record(9.9, "cxl", "dram"), record(10.25, "cxl", "dram")]
    windows = migration_timeline(records, ORDER, start=10.0, end=10.25, window_s=0.1)
    assert [round(w.start_s, 6) for w in windows] == [0.0, 0.1, 0.2]
    assert [round(w.seconds, 6) for w in windows] == [0.1, 0.1, 0.05]  # the last window is what is left
    assert [(w.promotions, w.demotions, w.failed) for w in windows] == [(1, 1, 0), (0, 1, 1), (0, 0, 0)]
    assert [w.bytes for w in windows] == [2 << 20, 1 << 20, 0]  # the moves before start and at end are out
    assert windows[0].gbps == pytest.approx((2 << 20) / 0.1 / 1e9)
    # The windows add up to the traffic of the run.
    assert sum(w.gbps * w.seconds for w in windows) * 1e9 == pytest.approx(3 << 20)


def test_an_empty_run_has_no_windows_and_a_bad_window_is_refused() -> None:
    assert migration_timeline([], ORDER, start=5.0, end=5.0, window_s=0.1) == []
    with pytest.raises(ConfigError, match="window_s=0 must be positive"):
        migration_timeline([], ORDER, start=0.0, end=1.0, window_s=0)
