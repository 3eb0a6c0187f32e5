"""The shared-memory transport: a pool bound to a node (checked with move_pages), a pull through it checksummed end
to end, 3 instances pulling through it in a real replay, bad input refused before any work, the pool always gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tieremu.cluster import shm
from tieremu.cluster.link import LinkSpec
from tieremu.cluster.replay import ClusterSpec, check, cluster_replay
from tieremu.cluster.wire import BlockClient, BlockServer, LinkState, PullError
from tieremu.errors import ConfigError
from tieremu.numa.topology import discover

TIERS = Path(__file__).resolve().parents[1] / "configs" / "tiers" / "cluster-peer.yaml"


def _trace(tmp_path: Path) -> Path:
    # Each request re-reads the blocks of the one before it on another instance (round robin): pulls, always.
    rows = [(t * 200, list(range(6 * (t // 2), 6 * (t // 2) + 6))) for t in range(8)]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": 512 * len(ids), "output_length": 1,
                                        "hash_ids": ids}) + "\n" for t, ids in rows))
    return path


def test_the_pool_is_bound_to_its_node_and_a_pull_through_it_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    node = discover().memory_nodes[0]
    pool = shm.ShmPool.create(2, 20_000, node)
    path = pool.spec.path
    try:
        assert pool.spec.slot_bytes % 4096 == 0 and pool.spec.slot_bytes >= 20_000
        assert pool.placement().fraction_on((node,)) == 1.0  # the kernel's word, every page
        other = shm.ShmPool.attach(pool.spec)  # a second mapping sees the same pages
        block = bytes(range(256)) * 78
        state = LinkState(LinkSpec(10, 1), pace=True)
        server = BlockServer("127.0.0.1", 0, {5: block}.get, lambda _h: state, pool=pool, me=0)
        client = BlockClient("127.0.0.1", server.sock.getsockname()[1], other, me=1, holder=0)
        try:
            got = client.pull(5, 1.0)
            assert got.payload == block
            assert bytes(other.slot_view(0, 1, len(block))) == block  # it crossed the pool, in the pair's slot
            assert got.seconds >= LinkSpec(10, 1).seconds(len(block)) * 0.9  # paced: ~170 us
            assert client.pull(6, 1.0).payload is None
            # A byte flipped on its way into the pool, after the holder's checksum: refused, never returned.
            real = pool.write

            def flipped(holder: int, puller: int, token: int, offset: int, data: memoryview) -> bool:
                if offset == 0:
                    data = memoryview(bytes([data[0] ^ 1]) + bytes(data[1:]))
                return real(holder, puller, token, offset, data)
            monkeypatch.setattr(pool, "write", flipped)
            with pytest.raises(PullError) as err:
                client.pull(5, 1.0)
            assert err.value.kind == "corrupt"
            # A pull the puller gave up on (timeout) stops writing once a newer pull claims the slot.
            monkeypatch.undo()
            old = pool.claim(0, 1, 7)
            new = pool.claim(0, 1, 8)
            assert not pool.write(0, 1, old, 0, memoryview(b"stale"))
            assert pool.write(0, 1, new, 0, memoryview(b"fresh")) and bytes(other.slot_view(0, 1, 5)) == b"fresh"
            assert other.progress(0, 1) == (8, 5)  # the puller's mapping sees the holder's progress
        finally:
            client.close()
            server.close()
            other.close()
    finally:
        pool.close()
        shm.remove(path)
    assert not os.path.exists(path)


def test_three_instances_pull_through_the_pool_and_leave_nothing(tmp_path: Path) -> None:
    result = cluster_replay(ClusterSpec(trace=_trace(tmp_path), tiers=TIERS, instances=3, sharing="p2p",
                                        pull="always", transport="shm", link=LinkSpec(10, 10), block_kib=16,
                                        time_scale=1.0))
    assert result.completed == result.requests == 8
    assert result.hit_ratio.peer > 0 and sum(r.pulls for r in result.instances) > 0
    assert result.corrupted_blocks == 0 and result.pulls_failed == 0
    assert result.transport == "shm" and not result.namespaces
    assert result.shaping["medium"] == "shm-pool" and result.shaping["pool_node"] == "0"
    assert result.shaping["rate"] == "transport-pacing" and result.origin == "emulated"
    assert any("bound to node 0" in n and "node 0: " in n for n in result.notes)  # the kernel's placement
    assert shm.pools_of(os.getpid()) == []  # the pool's file is gone


def test_a_node_that_does_not_exist_is_refused_before_any_work(tmp_path: Path) -> None:
    bad = max(discover().online) + 1
    spec = ClusterSpec(trace=_trace(tmp_path), tiers=TIERS, transport="shm", shm_node=bad, link=LinkSpec(10, 10))
    with pytest.raises(ConfigError, match=f"--shm-node {bad}: no such memory node.*nodes with memory: 0"):
        cluster_replay(spec)
    assert shm.pools_of(os.getpid()) == []
    with pytest.raises(ConfigError, match="drop --namespaces"):
        check(ClusterSpec(trace=_trace(tmp_path), tiers=TIERS, transport="shm", namespaces=True,
                          link=LinkSpec(10, 10)))
    from click.testing import CliRunner

    from tieremu.cli.root import main as cli_main
    out = CliRunner().invoke(cli_main, ["cluster", "replay", str(_trace(tmp_path)), "--tiers", str(TIERS),
                                        "--shm-node", "0", "--link", "10,10"])
    assert out.exit_code == 2 and "only used with --transport shm" in out.output


def test_a_killed_replays_pool_is_removed_by_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    dead = tmp_path / f"{shm.PREFIX}{2**22 + 7}-abcd"  # a pid above pid_max's default: no such process
    mine = tmp_path / f"{shm.PREFIX}{os.getpid()}-abcd"
    dead.write_bytes(b"x")
    mine.write_bytes(b"x")
    assert shm.cleanup_stale_pools() == [str(dead)]
    assert not dead.exists() and mine.exists()


def test_ctrl_c_removes_the_pool(tmp_path: Path) -> None:
    rows = [(t * 50, list(range(6 * t, 6 * t + 6))) for t in range(400)]  # long enough to be interrupted
    trace = tmp_path / "long.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": 512 * len(ids), "output_length": 1,
                                         "hash_ids": ids}) + "\n" for t, ids in rows))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "tieremu", "cluster", "replay", str(trace), "--tiers", str(TIERS),
                             "--transport", "shm", "--link", "10,10", "--block-kib", "16", "--time-scale", "1"],
                            env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not shm.pools_of(proc.pid):
            time.sleep(0.05)
        assert shm.pools_of(proc.pid), "no pool appeared"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert shm.pools_of(proc.pid) == []
