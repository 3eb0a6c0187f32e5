"""`tieremu cluster replay --engine vllm`: two real vLLM CPU engines, each in its own process with tieremu's KV
connector, sharing KV blocks through the peer index and the block transport.

The crafted trace (6 requests, round-robin over 2 instances, 64-token blocks) makes blocks computed on one instance
needed by the other: request 1 (instance 1) shares its first 4 blocks with request 0 (instance 0); request 2
(instance 0) has a block only request 1 computed; request 4 (instance 0) repeats request 3's (instance 1) 5 blocks.
The gaps between arrivals (1.5 s of wall time) let each request finish before the next arrives, so the expected
counts below do not depend on the machine's speed. The same trace is replayed with --sharing none: greedy outputs
must be identical, and vLLM must have computed exactly the pulled blocks' tokens fewer with sharing.

Time here (2 vCPUs, load average ~8): the two runs of two engines ~75 s together (vLLM's import and engine build run
in both processes at once), the failed start ~40 s (one engine's import), the interrupt ~12 s; 125 s for the module,
265 s at load 18. The project has no slow-test marker, so they run in the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from processes import our_processes
from vllm_guard import need_vllm

from tieremu.cli import main

ROOT = Path(__file__).resolve().parents[1]
TIERS = ROOT / "configs" / "tiers" / "cluster-peer.yaml"
BLOCK = 64  # tokens per hash id and per vLLM block (the vLLM instances' block size)
# (arrival ms, hash ids): instance 0 serves requests 0, 2, 4 and instance 1 requests 1, 3, 5.
CRAFTED = [(0, [1, 2, 3, 4, 101, 102]), (1500, [1, 2, 3, 4, 103, 104]), (3000, [1, 2, 3, 4, 103, 105, 106]),
           (4500, [5, 6, 7, 8, 9, 107]), (6000, [5, 6, 7, 8, 9, 108]), (7500, [1, 2, 3, 4, 109, 110])]
# Per instance (local, peer, miss) over the whole blocks before each prompt's last token (5 or 6 per request).
EXPECTED_P2P = {0: (4, 6, 6), 1: (4, 4, 7)}
EXPECTED_NONE = {0: (4, 0, 12), 1: (4, 0, 11)}


def _instances() -> list[str]:
    return our_processes("tieremu.cluster.vllm_instance")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vllm-cluster") / "crafted.jsonl"
    path.write_text("".join(json.dumps({"timestamp": ts, "input_length": BLOCK * len(ids), "output_length": 8,
                                        "hash_ids": ids}) + "\n" for ts, ids in CRAFTED))
    return path


def _replay(trace: Path, *args: str) -> dict:
    result = CliRunner().invoke(main, ["cluster", "replay", str(trace), "--tiers", str(TIERS), "--instances", "2",
                                       "--engine", "vllm", "--time-scale", "1", "--capacity-blocks", "64",
                                       "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def runs(trace: Path) -> dict[str, dict]:
    need_vllm()
    return {"p2p": _replay(trace, "--sharing", "p2p"), "none": _replay(trace, "--sharing", "none")}


def test_the_result_has_the_cluster_replays_keys_and_says_vllm(runs: dict[str, dict]) -> None:
    doc = runs["p2p"]
    assert doc["engine"] == "vllm" and doc["instances_n"] == 2 and doc["completed"] == len(CRAFTED)
    for key in ("hit_ratio", "ttft_ms", "peer_bytes", "corrupted_blocks", "instances", "pull_ms", "stale_misses"):
        assert key in doc, key
    assert set(doc["hit_ratio"]) == {"local", "peer", "miss"}
    assert doc["ttft_ms"]["p50"] > 0 and [r["instance"] for r in doc["instances"]] == [0, 1]


def test_blocks_one_engine_computed_are_pulled_by_the_other(runs: dict[str, dict]) -> None:
    doc = runs["p2p"]
    got = {r["instance"]: (r["local"], r["peer"], r["miss"]) for r in doc["instances"]}
    assert got == EXPECTED_P2P
    assert doc["hit_ratio"]["peer"] > 0 and doc["corrupted_blocks"] == 0 and doc["stale_misses"] == 0
    block_bytes = 2 * 4 * 2 * 64 * 4 * BLOCK  # the tiny Llama's K and V, float32
    assert doc["peer_bytes"] == 10 * block_bytes
    served = sum(r["served_bytes"] for r in doc["instances"])
    assert served == doc["peer_bytes"]  # every byte pulled was sent by the other engine's block server


def test_vllm_computed_exactly_the_pulled_tokens_fewer(runs: dict[str, dict]) -> None:
    p2p, none = (runs[k]["vllm"]["cached_tokens"] for k in ("p2p", "none"))
    assert {k: (r["local"], r["peer"], r["miss"]) for k, r in
            ((r["instance"], r) for r in runs["none"]["instances"])} == EXPECTED_NONE
    # Requests 1 and 4 found their shared blocks only on the other instance: loaded instead of prefilled.
    assert int(p2p["1"]) == 4 * BLOCK and int(none["1"]) == 0
    assert int(p2p["4"]) == 5 * BLOCK and int(none["4"]) == 0
    pulled = sum(r["peer"] for r in runs["p2p"]["instances"])
    assert sum(p2p.values()) - sum(none.values()) == pulled * BLOCK
    loaded = sum(i["connector"]["loaded_blocks"] for i in runs["p2p"]["vllm"]["instances"])
    assert loaded * BLOCK == sum(p2p.values())  # what vLLM did not compute, the connector loaded


def test_outputs_are_identical_with_and_without_sharing(runs: dict[str, dict]) -> None:
    a, b = runs["p2p"]["vllm"]["outputs"], runs["none"]["vllm"]["outputs"]
    assert len(a) == len(CRAFTED) and all(len(t) == 8 for t in a.values())
    assert a == b


def test_no_engine_outlives_the_command(runs: dict[str, dict]) -> None:
    assert _instances() == []


def test_an_interrupt_leaves_no_engine(trace: Path) -> None:
    need_vllm()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", "from tieremu.cli import main; main()", "cluster", "replay",
                             str(trace), "--tiers", str(TIERS), "--instances", "2", "--engine", "vllm"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(_instances()) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)  # until both engines are being built
        assert len(_instances()) == 2, proc.stderr.read().decode() if proc.poll() is not None else "not started"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while _instances() and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILLed process groups: the kernel is tearing them down
    assert _instances() == []


def test_an_engine_that_fails_to_start_is_a_clear_error_and_leaves_no_engine(trace: Path, tmp_path: Path) -> None:
    need_vllm()
    from tieremu.cluster.replay import ClusterSpec
    from tieremu.cluster.vllm_replay import VllmOptions, vllm_cluster_replay
    from tieremu.engines.models import tiny_model
    from tieremu.engines.procs import EngineError

    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text((tiny_model() / "config.json").read_text())
    (model / "model.safetensors").write_bytes(b"this is not a safetensors file")
    # One instance (no sharing): the start-up path is the same, and one engine's import is the test's cost.
    spec = ClusterSpec(trace=trace, tiers=TIERS, instances=1, sharing="none", capacity_blocks=64, time_scale=1.0)
    with pytest.raises(EngineError, match=r"vLLM instance 0 exited \(1\): SafetensorError"):
        vllm_cluster_replay(spec, VllmOptions(model=model))
    assert _instances() == []


@pytest.mark.parametrize(("args", "message"), [
    (("--fault", "kill-peer@2"), "--fault with --engine vllm"),
    (("--pull", "estimate"), "--pull estimate with --engine vllm"),
    (("--block-kib", "32"), "--block-kib with --engine vllm"),
    (("--namespaces",), "--namespaces with --engine vllm"),
    (("--transport", "shm"), "--transport shm with --engine vllm"),
])
def test_what_vllm_instances_do_not_do_is_refused_before_anything_starts(trace: Path, args: tuple[str, ...],
                                                                        message: str) -> None:
    result = CliRunner().invoke(main, ["cluster", "replay", str(trace), "--tiers", str(TIERS), "--instances", "2",
                                       "--engine", "vllm", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert _instances() == []


def test_engine_is_an_execute_option(trace: Path) -> None:
    result = CliRunner().invoke(main, ["cluster", "replay", str(trace), "--mode", "simulate", "--engine", "vllm"])
    assert result.exit_code == 2 and "--engine" in result.output


def test_the_connectors_tier_map_is_the_local_tiers_with_room_for_the_blocks(tmp_path: Path) -> None:
    from tieremu.cluster.vllm_replay import local_tier_file
    from tieremu.tiers.config import load_tier_map

    given = tmp_path / "given.yaml"
    given.write_text("name: x\ntiers:\n  - name: dram\n    nodes: [0]\n  - name: ssd\n    kind: file\n"
                     "    path: blocks\n    capacity_mib: 8\n"
                     "  - name: peer\n    kind: peer\n    link: {latency_us: 10, gbps: 10}\n")
    out = local_tier_file(given, 64, 256 * 1024, tmp_path / "local.yaml")
    tiers = load_tier_map(out)
    assert tiers.names == ("dram", "ssd")
    assert [t.capacity_mib for t in tiers.tiers] == [16, 8]  # 64 blocks of 256 KiB; a given capacity is kept
    assert tiers.tiers[1].path == tmp_path / "blocks"
