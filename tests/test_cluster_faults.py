"""Each fault kind on a short crafted trace: every request completes (a failed pull falls back to recompute),
no corrupted block is used, stale misses are counted, and the index heals. Namespaces when root, else loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tieremu.cluster.replay import ClusterSpec, cluster_replay
from tieremu.cluster.result import ClusterResult

TIERS = Path(__file__).resolve().parents[1] / "configs" / "tiers" / "cluster-peer.yaml"


def _trace(tmp_path: Path, rows: list[tuple[int, list[int]]]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": 512 * len(ids), "output_length": 1,
                                        "hash_ids": ids}) + "\n" for t, ids in rows))
    return path


def _blocks(base: int) -> list[int]:
    return list(range(base, base + 6))


def _run(trace: Path, fault: str, index: str = "broadcast", lease_s: float = 1.5, whole: bool = True) -> ClusterResult:
    result = cluster_replay(ClusterSpec(trace=trace, tiers=TIERS, instances=3, sharing="p2p", pull="always",
                                        index=index, faults=(fault,), block_kib=16, time_scale=1.0, lease_s=lease_s))
    assert result.completed == result.requests, result.notes
    assert result.corrupted_blocks == 0
    # Healed: no live entry names a holder that lacks the block, and every held block is listed where it should be.
    assert result.index_stale_entries == 0
    if whole:  # (across a partition that lasts, the two sides cannot learn each other's new blocks)
        assert result.index_missing_entries == 0
    return result


def _row(result: ClusterResult, instance: int, incarnation: int = 0):
    return next(r for r in result.instances if r.instance == instance and r.incarnation == incarnation)


def test_kill_peer(tmp_path: Path) -> None:
    # Requests 0-2 land on instances 0-2; instance 1 is killed before request 3, which asks for instance 1's
    # blocks: the index still names it (its lease has not run out), the pull is refused, the blocks recomputed.
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)),
                              (900, _blocks(200)), (1000, _blocks(100))])
    result = _run(trace, "kill-peer@3", lease_s=4)
    assert result.stale_misses >= 1
    assert any(r.killed for r in result.instances)


def test_restart_peer(tmp_path: Path) -> None:
    # Instance 1 restarts before request 3 (same address, new incarnation, empty cache). Its old entries are
    # replaced by the new incarnation's word (the lease is long: it is not what heals the index here), and what it
    # computes after the restart is listed by the others (no missing entry).
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)), (900, _blocks(200)),
                              (1000, _blocks(100)), (1100, _blocks(600)), (1200, _blocks(600))])
    result = _run(trace, "restart-peer@3", lease_s=60)
    restarted = _row(result, 1, incarnation=1)
    assert restarted.requests >= 1 and restarted.blocks_checked >= 6


def test_drop_events(tmp_path: Path) -> None:
    # Instance 1's events from request 4 on are lost; its next heartbeat shows the gap and the others re-read its
    # holdings: at the end they list what it computed for request 4 (no missing entry), and instance 2, asking
    # for those blocks later, pulls them when instance 1 has them by then.
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)), (900, _blocks(400)),
                              (1000, _blocks(900)), (1800, _blocks(900))])
    result = _run(trace, "drop-events@4")
    assert _row(result, 1).events_dropped >= 1
    assert _row(result, 2).resyncs >= 1


@pytest.mark.parametrize("index", ["broadcast"])
def test_partition(tmp_path: Path, index: str) -> None:
    # The 0-1 link is cut before request 3: instance 0 asks instance 1 for its blocks, no reply comes, the pull
    # times out and the blocks are recomputed.
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)), (900, _blocks(200)),
                              (1000, _blocks(100))])
    result = _run(trace, "partition@3", index=index, lease_s=4, whole=False)
    assert result.pulls_failed >= 1
