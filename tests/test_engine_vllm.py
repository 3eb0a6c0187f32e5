"""vLLM's CPU build on tieremu's tiers (tieremu.engines): the tiered KV connector, the engine's KV tensor placement,
the trace driver and its errors.

These need the `vllm` extra (scripts/setup-vllm.sh, which scripts/test.sh runs). Without it they skip with that
reason, except under CI (CI=true), where a missing vLLM is a failure: the engine stage must not silently stop running.

The shared trace's first 40 requests share no hash id (its first reuse is request 49), so the run that must show
loads replays the first 50: 89k prompt tokens at 64 tokens per hash id, outputs capped at 32 tokens, with and without
the connector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_paths import MOONCAKE_TRACE
from processes import our_processes
from vllm_guard import need_vllm

from tieremu.cli import main
from tieremu.engines.models import model_info, tiny_model
from tieremu.engines.prompts import build_prompts
from tieremu.workloads.trace import read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = MOONCAKE_TRACE
TIERS = ROOT / "tests" / "fixtures" / "engines" / "tiers-small.yaml"
REQUESTS = 50
BLOCK_TOKENS = 64
MAX_OUTPUT = 32  # the trace's outputs (9,995 tokens over 50 requests) would double the stage's time


def _arm_processes() -> list[str]:
    return our_processes("tieremu.engines.arm")


def _replay(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["engine", "replay", str(TRACE), "--tiers", str(TIERS), *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def replay_json() -> dict:
    need_vllm()
    code, out = _replay("--policy", "lru", "--kv-tier", "dram", "--max-requests", str(REQUESTS),
                        "--block-tokens", str(BLOCK_TOKENS), "--max-output-tokens", str(MAX_OUTPUT), "--check-outputs",
                        "--json")
    assert code == 0, out
    return json.loads(out)


# -- the run on the shared trace -------------------------------------------------------------------------------


def test_json_has_every_figure(replay_json: dict) -> None:
    for key in ("engine", "requests", "ttft_ms", "tpot_ms", "tokens_per_s", "connector", "kv_placement",
                "outputs_match"):
        assert key in replay_json, key
    assert replay_json["engine"] == "vllm" and replay_json["requests"] == REQUESTS
    assert replay_json["driver"] == "offline" and replay_json["server_url"] is None
    assert replay_json["connector"]["source"].startswith("in-process")
    for key in ("p50", "p99"):
        assert replay_json["ttft_ms"][key] > 0 and replay_json["tpot_ms"][key] > 0
    for key in ("hits_by_tier", "stored_blocks", "loaded_blocks"):
        assert key in replay_json["connector"], key
    assert replay_json["tokens_per_s"] > 0


def test_loads_come_from_a_tier_below_the_fastest(replay_json: dict) -> None:
    hits = replay_json["connector"]["hits_by_tier"]
    assert list(hits) == ["dram", "cxl", "far"]
    assert sum(hits[t] for t in ("cxl", "far")) > 0, hits
    assert sum(hits.values()) == replay_json["connector"]["loaded_blocks"] > 0
    assert replay_json["origin"] == "emulated"  # cxl and far are emulated on this machine's one node


def test_computed_prompt_tokens_drop_by_exactly_the_tokens_loaded(replay_json: dict) -> None:
    base = replay_json["without_connector"]
    loaded = replay_json["connector"]["loaded_blocks"] * BLOCK_TOKENS
    assert replay_json["loaded_tokens"] == loaded
    assert base["computed_prompt_tokens"] - replay_json["computed_prompt_tokens"] == loaded
    assert replay_json["computed_drop_equals_loaded"] is True


def test_ttft_is_reported_with_and_without_the_connector(replay_json: dict) -> None:
    assert replay_json["ttft_ms"]["p50"] > 0 and replay_json["without_connector"]["ttft_ms"]["p50"] > 0
    assert any("TTFT p50" in note for note in replay_json["notes"])  # which arm won is said, not hidden


def test_kv_tensor_is_wholly_on_its_tier_node(replay_json: dict) -> None:
    placement = replay_json["kv_placement"]
    assert placement["tier"] == "dram" and placement["requested_node"] == 0
    assert placement["achieved_fraction"] == 1.0 and placement["absent_pages"] == 0
    assert placement["by_node"] == {"0": placement["pages"]}
    # A real tier: measured, on its own node, and nothing charged for vLLM's attention reads of it.
    assert placement["backing"] == "real" and placement["origin"] == "measured" and placement["tier_nodes"] == [0]
    assert placement["attention_reads"] is None


def test_outputs_match_without_the_connector(replay_json: dict) -> None:
    assert replay_json["outputs_match"] is True and replay_json["mismatched_requests"] == []


def test_no_engine_outlives_the_command(replay_json: dict) -> None:
    assert _arm_processes() == []


# -- bad input ---------------------------------------------------------------------------------------------------


def test_a_directory_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    code, out = _replay("--model", str(tmp_path), "--max-requests", "2", "--block-tokens", "64")
    assert code == 2, out
    assert "no config.json" in out and str(tmp_path) in out


def test_tiers_that_cannot_hold_one_block_are_refused(tmp_path: Path) -> None:
    need_vllm()  # the tiny model is built with transformers, which comes with the vllm extra
    tiers = tmp_path / "tiny.yaml"
    tiers.write_text("name: tiny\ntiers:\n  - name: dram\n    nodes: [0]\n    capacity_mib: 1\n")
    # 512 tokens of the tiny model in float32: 4 layers x 2 x 2 heads x 64 x 4 bytes x 512 = 2 MiB > 1 MiB
    result = CliRunner().invoke(main, ["engine", "replay", str(TRACE), "--tiers", str(tiers), "--max-requests", "2",
                                       "--block-tokens", "512"])
    assert result.exit_code == 2, result.output
    assert "tier 'dram' cannot hold one KV block" in result.output and "2.000 MiB" in result.output


def test_an_engine_that_fails_to_start_is_a_clear_error_and_leaves_no_process(tmp_path: Path) -> None:
    need_vllm()
    model = tmp_path / "broken"
    model.mkdir()
    source = tiny_model()
    (model / "config.json").write_text((source / "config.json").read_text())
    (model / "model.safetensors").write_bytes(b"this is not a safetensors file")
    code, out = _replay("--model", str(model), "--max-requests", "2", "--block-tokens", "64", "--timeout", "300")
    assert code == 2, out
    assert "the engine failed" in out
    assert _arm_processes() == []


# -- pieces that need no engine ------------------------------------------------------------------------------------


def test_equal_hash_ids_give_equal_token_blocks() -> None:
    requests = read_trace(TRACE)[:50]
    prompts = build_prompts(requests, BLOCK_TOKENS, 1024)
    first, later = requests[42], requests[49]
    shared = [h for h in later.hash_ids if h in set(first.hash_ids)]
    assert shared, "request 49 reuses request 42's blocks"
    i, j = first.hash_ids.index(shared[0]), later.hash_ids.index(shared[0])
    a = prompts[42].token_ids[i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS]
    b = prompts[49].token_ids[j * BLOCK_TOKENS:(j + 1) * BLOCK_TOKENS]
    assert a == b and len(a) == BLOCK_TOKENS
    assert prompts[0].token_ids[:BLOCK_TOKENS] != prompts[1].token_ids[:BLOCK_TOKENS]


def test_the_tiny_model_is_a_model_with_its_kv_size() -> None:
    need_vllm()  # the tiny model is built with transformers, which comes with the vllm extra
    info = model_info(tiny_model())
    assert (info.layers, info.kv_heads, info.head_dim, info.vocab_size) == (4, 2, 64, 1024)
    assert info.kv_bytes_per_token(2) == 2 * 4 * 2 * 64 * 2


# -- the runner's engine job ---------------------------------------------------------------------------------------


def test_an_engine_job_runs_each_policy_with_the_bounds(tmp_path: Path) -> None:
    need_vllm()
    from experiment_runs import run_jobs

    rows = run_jobs(tmp_path, TIERS, f"  - kind: engine\n    trace: {TRACE}\n    max_requests: 3\n"
                    f"    block_tokens: {BLOCK_TOKENS}\n    max_output_tokens: 8\n    kv_tier: dram\n"
                    "    policies: [lru]\n")
    by_run: dict[str, set[str]] = {}
    for r in rows:
        by_run.setdefault(r["run"], set()).add(r["metric"])
    assert len(by_run) == 3, sorted(by_run)  # lru, all-fastest, all-slowest
    for metrics in by_run.values():
        assert {"ttft_ms", "tpot_ms", "tokens_per_s", "stored_blocks", "kv_tensor_on_node"} <= metrics
    assert all(r["value"] == 1.0 for r in rows if r["metric"] == "kv_tensor_on_node")
    assert _arm_processes() == []
