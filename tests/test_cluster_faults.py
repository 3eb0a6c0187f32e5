"""Each fault kind on a short crafted trace, with each index design: every request completes (a failed pull falls
back to recompute), no corrupted block is used, stale misses are counted, and the index heals. Namespaces when root,
else loopback. The traces space requests widely (time scale 1) and pull always, so what each test asserts does not
depend on the machine's speed."""

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


INDEXES = ["broadcast", "hash"]


def _run(trace: Path, fault: str, index: str = "broadcast", lease_s: float = 1.5, whole: bool = True,
         capacity_blocks: int = 4096) -> ClusterResult:
    result = cluster_replay(ClusterSpec(trace=trace, tiers=TIERS, instances=3, sharing="p2p", pull="always",
                                        index=index, faults=(fault,), block_kib=16, time_scale=1.0, lease_s=lease_s,
                                        capacity_blocks=capacity_blocks))
    assert result.completed == result.requests, result.notes
    assert result.corrupted_blocks == 0
    # Healed: no live entry names a holder that lacks the block, and every held block is listed where it should be.
    assert result.index_stale_entries == 0
    if whole:  # (across a partition that lasts, the two sides cannot learn each other's new blocks)
        assert result.index_missing_entries == 0
    return result


def _row(result: ClusterResult, instance: int, incarnation: int = 0):
    return next(r for r in result.instances if r.instance == instance and r.incarnation == incarnation)


@pytest.mark.parametrize("index", INDEXES)
def test_kill_peer_mid_transfer(tmp_path: Path, index: str) -> None:
    # Requests 0-2 land on instances 0-2. Instance 1 is armed when request 3 is dispatched; request 3 (instance 0)
    # asks for instance 1's blocks, and instance 1 dies while serving that pull: it has read the block and the
    # reply never comes. The pull fails, the peer is suspected, the blocks are recomputed; instance 1's entries
    # expire with its lease.
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)),
                              (900, _blocks(200)), (1000, _blocks(100))])
    result = _run(trace, "kill-peer@3", index=index, lease_s=2)
    assert any("died mid-transfer" in note for note in result.notes), result.notes
    assert any(r.killed and r.instance == 1 for r in result.instances)
    assert result.stale_misses + result.pulls_failed >= 1
    assert _row(result, 0).miss >= 12  # its own 6, and instance 1's 6 it could not pull


@pytest.mark.parametrize("index", INDEXES)
def test_restart_peer(tmp_path: Path, index: str) -> None:
    # Instance 1 restarts before request 3 (same address, new incarnation, empty cache). Its old entries are
    # replaced by the new incarnation's word (the lease is long: it is not what heals the index here), and what it
    # computes after the restart is listed by the others (no missing entry).
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)), (900, _blocks(200)),
                              (1000, _blocks(100)), (1100, _blocks(600)), (1200, _blocks(600))])
    result = _run(trace, "restart-peer@3", index=index, lease_s=60)
    restarted = _row(result, 1, incarnation=1)
    assert restarted.requests >= 1 and restarted.blocks_checked >= 6


@pytest.mark.parametrize("index", INDEXES)
def test_drop_events(tmp_path: Path, index: str) -> None:
    # Instance 1's events from request 4 on are lost; its next heartbeats show the gap and the others re-read its
    # holdings: at the end they list what it computed for request 4 (no missing entry).
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)), (900, _blocks(400)),
                              (1000, _blocks(900)), (1800, _blocks(900))])
    result = _run(trace, "drop-events@4", index=index)
    assert _row(result, 1).events_dropped >= 1
    assert _row(result, 0).resyncs + _row(result, 2).resyncs >= 2 + 1  # first contact with 1 each, then the gap


@pytest.mark.parametrize("index", INDEXES)
def test_reorder_events(tmp_path: Path, index: str) -> None:
    # Each instance holds 8 blocks. Request 4 (instance 1) adds blocks 206-207: that 'stored' event (with hash, on
    # one of its homes' streams) is held back until instance 1's next event, two seconds later. Meanwhile the
    # heartbeats show the gap and the others re-read instance 1's holdings. Request 7 fills instance 1 with 8 new
    # blocks, evicting 200-207: the 'evicted' event goes out, then the held 'stored 206-207', whose turn has passed:
    # applied in arrival order it would list blocks instance 1 no longer holds (stale entries, and a stale miss for
    # request 8, which wants 206-207).
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)), (900, _blocks(200)),
                              (1000, list(range(200, 208))), (1100, _blocks(600)), (1200, _blocks(700)),
                              (3200, list(range(400, 408))), (4000, [206, 207])])
    result = _run(trace, "reorder-events@4", index=index, capacity_blocks=8)
    assert _row(result, 1).events_reordered == 1
    assert result.stale_misses == 0  # request 8 found 206-207 nowhere and recomputed them
    assert _row(result, 2).miss >= 6 + 6 + 2
    assert result.hit_ratio.peer > 0  # request 3 pulled instance 1's blocks before the fault
    late = sum(r.late_ignored for r in result.instances)
    if index == "broadcast":  # both others get every event (hash: only the homes of 206-207 do)
        assert late >= 2
    else:
        assert late >= 1


@pytest.mark.parametrize("index", INDEXES)
def test_partition(tmp_path: Path, index: str) -> None:
    # The 0-1 link is cut before request 3: instance 0 asks instance 1 for its blocks, no reply comes, the pull
    # times out and the blocks are recomputed.
    trace = _trace(tmp_path, [(0, _blocks(100)), (100, _blocks(200)), (200, _blocks(300)), (900, _blocks(200)),
                              (1000, _blocks(100))])
    result = _run(trace, "partition@3", index=index, lease_s=4, whole=False)
    assert result.pulls_failed >= 1
