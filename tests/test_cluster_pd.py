"""tieremu cluster replay --pd P:D in execute mode: bad input refused before any work (nothing left behind); a real
run where prefill instances hand every block of every request to decode instances over the block transport, and the
counters add up to what the trace asks for; the CLI's JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from cluster_helpers import children, live_namespaces, reuse_trace
from fixture_paths import MOONCAKE_TRACE

from tieremu.cli.root import main as cli_main
from tieremu.cluster import netns
from tieremu.cluster.link import LinkSpec
from tieremu.cluster.replay import MAX_DECODE_STEPS, ClusterSpec, cluster_replay
from tieremu.errors import ConfigError
from tieremu.workloads.trace import read_trace

ROOT = Path(__file__).resolve().parents[1]
TIERS = ROOT / "configs" / "tiers" / "cluster-peer.yaml"
BLOCK_KIB = 16


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(netns.STATE_ENV, str(tmp_path / "state"))


@pytest.mark.parametrize(("change", "message"), [
    ({"pd": (2, 2)}, r"--pd 2:2: .*P \+ D = --instances 3"),
    ({"pd": (0, 3)}, r"--pd 0:3: give P:D with P >= 1 prefill"),
    ({"pd": (3, 0)}, r"--pd 3:0: give P:D .* D >= 1 decode"),
    ({"pd": (1, 2), "faults": ("kill-peer@3",)}, r"--fault kill-peer@3 with --pd 1:2"),
    ({"pd": (1, 2), "transport": "shm"}, r"--pd 1:2 with --transport shm: .* use --transport tcp"),
])
def test_bad_pd_is_refused_before_any_work(change: dict, message: str, meshes_made: list[str]) -> None:
    procs = children(os.getpid())
    spec = ClusterSpec(trace=MOONCAKE_TRACE, tiers=TIERS, instances=3, max_requests=10, link=LinkSpec(10, 10))
    with pytest.raises(ConfigError, match=message):
        cluster_replay(ClusterSpec(**{**spec.__dict__, **change}))
    assert not meshes_made and children(os.getpid()) <= procs  # no namespace made, no process left


@pytest.mark.parametrize(("args", "message"), [
    (["--pd", "1:2", "--engine", "vllm"], "--engine vllm"),
    (["--pd", "1-2"], "must be P:D"),
    (["--pd", "2:2"], "P + D = --instances 3"),
])
def test_bad_pd_from_the_cli_leaves_nothing(args: list[str], message: str, meshes_made: list[str]) -> None:
    procs = children(os.getpid())
    out = CliRunner().invoke(cli_main, ["cluster", "replay", str(MOONCAKE_TRACE), "--tiers", str(TIERS),
                                        "--instances", "3", "--max-requests", "5", *args])
    assert out.exit_code != 0 and message in out.output, out.output
    assert not meshes_made and children(os.getpid()) <= procs  # no namespace made, no process left


def test_prefill_instances_hand_every_block_to_decode_instances(meshes_made: list[str]) -> None:
    n = 12
    requests = read_trace(MOONCAKE_TRACE)[:n]
    r = cluster_replay(ClusterSpec(trace=MOONCAKE_TRACE, tiers=TIERS, instances=3, pd=(2, 1), max_requests=n,
                                   block_kib=BLOCK_KIB))
    assert r.pd == "2:1" and r.completed == r.requests == n
    assert r.corrupted_blocks == 0
    prefill = [row for row in r.instances if row.role == "prefill"]
    decode = [row for row in r.instances if row.role == "decode"]
    assert [row.instance for row in prefill] == [0, 1] and [row.instance for row in decode] == [2]
    # prefill instances decoded nothing, handed nothing in; decode instances prefilled nothing
    for row in prefill:
        assert row.decoded == row.decode_steps == row.pd_bytes == row.pd_handed == 0 and row.tpot_ms is None
        assert row.requests == n // 2 and row.local + row.peer + row.miss > 0
    for row in decode:
        assert row.local == row.peer == row.miss == 0
    # every distinct block of every request was pulled from its prefill instance or already held by the decode
    # instance (a failed pull would be recomputed: none here on an idle link)
    blocks = sum(len(set(q.hash_ids)) for q in requests)
    assert r.pd_recomputed == 0 and r.pd_handed + r.pd_local == blocks
    assert sum(row.pd_handed + row.pd_local for row in decode) == blocks
    assert r.pd_bytes == r.pd_handed * BLOCK_KIB * 1024 == sum(row.pd_bytes for row in decode)
    assert r.peer_bytes == sum(row.peer_bytes for row in prefill)  # hand-offs are not peer pulls
    assert sum(row.decoded for row in decode) == n
    assert sum(row.decode_steps for row in decode) == sum(max(1, min(q.output_length, MAX_DECODE_STEPS))
                                                          for q in requests)
    # every block a decode instance holds at the end passed the digest check taken on arrival
    assert sum(row.blocks_checked for row in decode) > 0
    assert r.tpot_ms is not None and r.tpot_ms.p50 > 0 and r.handoff_ms is not None and r.handoff_ms.p50 > 0
    assert r.prefill_ms is not None and r.ttft_ms.p50 > 0
    assert r.origin == "emulated" and r.shaping  # the hand-off crossed the shaped (or paced) link
    assert len(meshes_made) == (3 if os.geteuid() == 0 else 0) and not set(meshes_made) & live_namespaces()


def test_pd_through_the_cli_json_blocks_held_by_the_decode_instance_are_not_pulled(tmp_path: Path,
                                                                                   meshes_made: list[str]) -> None:
    # 3 groups of 3 requests sharing an 8-block prefix (9 blocks each). With 1:2, request k is decoded on instance
    # 1 + k mod 2: the third request of each group meets its group's first on the same decode instance, which holds
    # the prefix already: 3 x 8 blocks local there, the other 81 - 24 pulled. The one prefill instance serves each
    # group's prefix from its own tiers after the group's first request: 48 local, 33 computed.
    trace = reuse_trace(tmp_path / "reuse.jsonl")
    out = CliRunner().invoke(cli_main, ["cluster", "replay", str(trace), "--tiers", str(TIERS), "--instances", "3",
                                        "--pd", "1:2", "--block-kib", str(BLOCK_KIB), "--time-scale", "0.1",
                                        "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output[out.output.index("{"):])
    assert doc["pd"] == "1:2" and doc["completed"] == 9 and doc["corrupted_blocks"] == 0
    for key in ("ttft_ms", "tpot_ms", "pd_bytes", "handoff_ms", "hit_ratio", "peer_bytes", "instances"):
        assert key in doc
    assert doc["pd_local"] == 24 and doc["pd_handed"] == 57 and doc["pd_recomputed"] == 0
    assert doc["pd_bytes"] == 57 * BLOCK_KIB * 1024
    rows = doc["instances"]
    assert [row["role"] for row in rows] == ["prefill", "decode", "decode"]
    assert (rows[0]["local"], rows[0]["miss"], rows[0]["decoded"]) == (48, 33, 0)
    assert [row["decoded"] for row in rows[1:]] == [5, 4] and [row["pd_local"] for row in rows[1:]] == [16, 8]
    assert doc["tpot_ms"] is not None and doc["tpot_ms"]["p50"] > 0  # each request asks for 2 tokens
    assert any("single prefill instance" in note for note in doc["notes"])
    assert len(meshes_made) == (3 if os.geteuid() == 0 else 0) and not set(meshes_made) & live_namespaces()


def test_blocks_the_prefill_instance_does_not_hold_are_recomputed_by_the_decode_instance(
        tmp_path: Path, meshes_made: list[str]) -> None:
    # Room for 4 blocks per instance: the prefill instance stores the first 4 of each request's 9 (the rest find its
    # tier full of the request's pinned blocks), so the decode instance's pulls of the other 5 are answered "not
    # held" and it recomputes them: counted (as stale answers too), checked at the end like any block, never an
    # error. (A request served later could evict handed blocks first on a crawling machine: then more recomputed.)
    trace = reuse_trace(tmp_path / "reuse.jsonl")
    r = cluster_replay(ClusterSpec(trace=trace, tiers=TIERS, instances=3, pd=(1, 2), sharing="none",
                                   capacity_blocks=4, block_kib=BLOCK_KIB, time_scale=0.25))
    assert r.completed == 9 and r.corrupted_blocks == 0 and r.pulls_failed == 0
    decode = [row for row in r.instances if row.role == "decode"]
    assert r.pd_handed + r.pd_local + r.pd_recomputed == 81 and r.pd_recomputed >= 45
    assert sum(row.stale_misses for row in decode) == r.pd_recomputed  # each after a "not held" reply
    assert r.pd_bytes == r.pd_handed * BLOCK_KIB * 1024 and r.pd_handed > 0
    assert all(row.blocks_checked > 0 for row in r.instances)
    assert len(meshes_made) == (3 if os.geteuid() == 0 else 0) and not set(meshes_made) & live_namespaces()


@pytest.mark.parametrize(("pd", "problem"), [("1:2", None), ("2:2", r"pd: --pd 2:2: .*P \+ D = --instances 3"),
                                             ("two", "must be P:D")])
def test_a_cluster_job_takes_pd(tmp_path: Path, pd: str, problem: str | None) -> None:
    from tieremu.runner.spec import load_experiment
    from tieremu.runner.sweep import expand

    spec = tmp_path / "pd.yaml"
    spec.write_text((ROOT / "configs" / "experiments" / "cluster.yaml").read_text()
                    .replace("../tiers/single-node.yaml", str(ROOT / "configs" / "tiers" / "single-node.yaml"))
                    .replace("../../traces/", str(ROOT / "traces") + "/")
                    .replace("    block_kib: 16\n", f"    block_kib: 16\n    pd: '{pd}'\n"))
    if problem is not None:
        with pytest.raises(ConfigError, match=problem):
            expand(load_experiment(spec))
        return
    runs = [r for r in expand(load_experiment(spec)) if r.kind == "cluster"]
    assert runs and all(r.params.pd == (1, 2) for r in runs)
    shipped = [r for r in expand(load_experiment(ROOT / "configs" / "experiments" / "cluster-pd.yaml"))
               if r.kind == "cluster"]
    assert [r.params.pd for r in shipped] == [(1, 2), (2, 1)]
