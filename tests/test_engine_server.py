"""vLLM's OpenAI server driven by tieremu (`engine replay --serve`, `--server URL`): a real server process with
tieremu's connector, the trace streamed to it over HTTP, the same result shape as the offline engine, no server
process left behind, and clear errors for a bad URL.

One server start (tens of seconds) on a four-request trace written here: requests that share hash ids at 1 s
intervals (time scale 0.5), so that later ones load their prefix from the connector inside the server. The KV tensor
goes on the emulated tier `cxl`, so the run also shows what an emulated --kv-tier reports.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from vllm_guard import need_vllm

from tieremu.cli import main
from tieremu.engines.client import Streamed, _take, endpoint, events
from tieremu.engines.drive import delta
from tieremu.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TIERS = ROOT / "tests" / "fixtures" / "engines" / "tiers-small.yaml"
BLOCK_TOKENS = 64
# (trace ms, hash ids), each prompt 10 tokens short of its last block: request 1 shares its first 6 full blocks with
# request 0, request 3 the 7 full blocks of request 0, request 2 none.
REQUESTS = [(0, [1, 2, 3, 4, 5, 6, 7, 8]), (2000, [1, 2, 3, 4, 5, 6, 9, 10]),
            (4000, [11, 12, 13, 14, 15, 16, 17, 18]), (6000, [1, 2, 3, 4, 5, 6, 7, 8, 19])]
OUTPUT = 8
MARK = "TIEREMU_TEST_SERVER_MARK"  # in the environment of every process the run starts, to find any left over


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine-server") / "shared.jsonl"
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": len(h) * BLOCK_TOKENS - 10,
                                        "output_length": OUTPUT, "hash_ids": h}) + "\n" for t, h in REQUESTS))
    return path


def _replay(trace: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["engine", "replay", str(trace), "--block-tokens", str(BLOCK_TOKENS),
                                       "--time-scale", "0.5", *args])
    return result.exit_code, result.output


def _left_over(mark: str, rundirs: Path) -> list[str]:
    """Processes the run started that are still alive: their environment carries the run's mark, or their working
    folder is under the run's temporary folders (the server runs in its run folder; vLLM's engine core renames
    itself over its environment, but keeps the server's working folder)."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            marked = needle in (entry / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
        except OSError:
            continue
        if marked or Path(cwd).is_relative_to(rundirs):
            found.append(f"{entry.name}: {cmdline!r}")
    return found


@pytest.fixture(scope="module")
def runs(trace: Path) -> Iterator[tuple[dict, dict, list[str]]]:
    """The same replay on a server tieremu starts and offline, and the processes of the served run still alive."""
    need_vllm()
    mark = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="te-") as rundirs, pytest.MonkeyPatch.context() as mp:
        mp.setenv(MARK, mark)
        mp.setattr(tempfile, "tempdir", rundirs)  # the run's folders (and so the server's working folder) in there
        code, out = _replay(trace, "--tiers", str(TIERS), "--kv-tier", "cxl", "--serve", "--json")
        assert code == 0, out
        served = json.loads(out)
        left = _left_over(mark, Path(rundirs))
        mp.undo()
        code, out = _replay(trace, "--tiers", str(TIERS), "--kv-tier", "cxl", "--json")
        assert code == 0, out
        offline = json.loads(out)
    yield served, offline, left


def _shape(value: object) -> object:
    """The keys of a JSON value, recursively (lists by their first element)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(value[0])] if value and isinstance(value[0], dict | list) else []
    return None


def test_a_served_run_measures_ttft_and_tpot_from_the_stream(runs: tuple[dict, dict, list[str]]) -> None:
    served, _, _ = runs
    assert served["driver"] == "serve" and served["requests"] == len(REQUESTS)
    for key in ("p50", "p99"):
        assert served["ttft_ms"][key] > 0 and served["tpot_ms"][key] > 0
    assert len(served["ttft_samples_ms"]) == len(REQUESTS) and len(served["tpot_samples_ms"]) == len(REQUESTS)
    assert served["tokens_per_s"] > 0
    assert any("streamed HTTP responses" in note for note in served["notes"])


def test_the_served_result_has_the_offline_result_s_shape(runs: tuple[dict, dict, list[str]]) -> None:
    served, offline, _ = runs
    assert offline["driver"] == "offline"
    assert _shape(served) == _shape(offline)


def test_the_connector_inside_the_server_reports_through_its_stats_file(runs: tuple[dict, dict, list[str]]) -> None:
    served, offline, _ = runs
    conn = served["connector"]
    assert "stats file" in conn["source"] and "engine-core process" in conn["source"]
    assert conn["loaded_blocks"] > 0 and sum(conn["hits_by_tier"].values()) == conn["loaded_blocks"]
    prompt_tokens = sum(len(h) * BLOCK_TOKENS - 10 for _, h in REQUESTS)
    assert served["computed_prompt_tokens"] + served["loaded_tokens"] == prompt_tokens
    # The same requests, 1 s apart: the same prefix blocks are found in the store either way.
    assert conn["loaded_blocks"] == offline["connector"]["loaded_blocks"] == 6 + 7
    assert conn["stored_blocks"] == offline["connector"]["stored_blocks"]


def test_an_emulated_kv_tier_says_so_and_charges_the_attention_reads(runs: tuple[dict, dict, list[str]]) -> None:
    for result in runs[:2]:
        placement = result["kv_placement"]
        assert placement["tier"] == "cxl" and placement["tier_nodes"] == [1]  # what the tier map asks for
        assert placement["backing"] == "emulated" and placement["origin"] == "emulated"
        assert placement["requested_node"] == 0 and placement["achieved_fraction"] == 1.0  # where it really is
        assert "lacks" in placement["note"] and placement["note"] in result["notes"]
        reads = placement["attention_reads"]
        assert reads["origin"] == "emulated" and reads["model"].startswith("modelled, not measured")
        assert reads["layer_calls"] > 0 and reads["charged_bytes"] > 0
        assert reads["owed_ms"] > 0 and reads["injected_ms"] > 0


def test_no_server_process_outlives_the_command(runs: tuple[dict, dict, list[str]]) -> None:
    assert runs[2] == []


# -- bad input (no engine needed) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://127.0.0.1:8000", "http://", "http://127.0.0.1:99999"])
def test_a_malformed_url_is_refused(trace: Path, url: str) -> None:
    code, out = _replay(trace, "--server", url)
    assert code == 2, out
    assert f"--server {url!r}" in out


def test_a_url_with_no_server_is_a_clear_error(trace: Path) -> None:
    code, out = _replay(trace, "--server", "http://127.0.0.1:1")
    assert code == 2, out
    assert "cannot reach the server" in out and "http://127.0.0.1:1" in out and "Traceback" not in out


def test_a_running_server_takes_no_engine_options(trace: Path) -> None:
    code, out = _replay(trace, "--server", "http://127.0.0.1:1", "--tiers", str(TIERS), "--kv-tier", "dram")
    assert code == 2, out
    assert "--tiers, --kv-tier" in out and "--serve" in out
    code, out = _replay(trace, "--server", "http://127.0.0.1:1", "--serve")
    assert code == 2 and "give one of them" in out


# -- the stream parser and the counters' difference ------------------------------------------------------------------


def test_server_sent_events_are_parsed_into_tokens_and_usage() -> None:
    # As vLLM 0.32 streams a completion with return_token_ids and include_usage (two tokens in the second event).
    raw = (b'data: {"choices":[{"index":0,"text":"","finish_reason":null,"prompt_token_ids":[5,6],'
           b'"token_ids":[321]}]}\n\n'
           b': a comment line\n'
           b'data: {"choices":[{"index":0,"text":"","finish_reason":"length","token_ids":[361,7]}]}\n\n'
           b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,'
           b'"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
           b'data: [DONE]\n\n')
    out = Streamed(sent_s=0.0)
    ep = endpoint("http://127.0.0.1:8000")
    data = list(events(io.BytesIO(raw)))  # type: ignore[arg-type]
    assert data[-1] == "[DONE]"
    for d in data[:-1]:
        _take(out, json.loads(d), ep)
    assert out.token_ids == [321, 361, 7] and out.chunks == 2 and out.finish_reason == "length"
    assert out.prompt_tokens == 2 and out.cached_tokens == 0
    assert out.first_token_s <= out.last_token_s


def test_a_url_keeps_its_path_before_v1() -> None:
    ep = endpoint("http://example.org:8080/serving/v1/")
    assert (ep.host, ep.port, ep.base) == ("example.org", 8080, "/serving")
    with pytest.raises(ConfigError, match="no \\?query"):
        endpoint("http://127.0.0.1:8000/?x=1")


def test_a_running_server_s_counters_are_this_run_s_difference() -> None:
    before = {"stored_blocks": 10, "load_s": 1.0, "hits_by_tier": {"dram": 4, "cxl": 1},
              "resident_by_tier": {"dram": 3}, "policy": "lru", "block_tokens": 64}
    after = {"stored_blocks": 15, "load_s": 1.5, "hits_by_tier": {"dram": 6, "cxl": 4},
             "resident_by_tier": {"dram": 5}, "policy": "lru", "block_tokens": 64}
    assert delta(after, before) == {"stored_blocks": 5, "load_s": 0.5, "hits_by_tier": {"dram": 2, "cxl": 3},
                                    "resident_by_tier": {"dram": 5}, "policy": "lru", "block_tokens": 64}


def test_a_server_s_failure_is_told_by_its_root_cause(tmp_path: Path) -> None:
    from tieremu.engines.server import reason

    log = tmp_path / "server.log"
    log.write_text("(EngineCore pid=7) ERROR 12-06 [core.py:1] EngineCore failed to start.\n"
                   "Traceback (most recent call last):\n"
                   "safetensors_rust.SafetensorError: Error while deserializing header: header too large\n"
                   "(APIServer pid=6) INFO 12-06 [x.py:2] shutting down\n"
                   "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    assert reason(log) == ("safetensors_rust.SafetensorError: Error while deserializing header: header too large "
                           "(then: RuntimeError: Engine core initialization failed. See root cause above. Failed "
                           "core proc(s): {})")
    log.write_text("(APIServer pid=6) INFO 12-06 [x.py:2] starting\n")
    assert reason(log).startswith("no error message")


def test_killing_a_group_leaves_none_of_its_processes_running() -> None:
    import subprocess

    from tieremu.engines.procs import group_members, kill_group

    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & echo started; wait"], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    assert len(group_members(proc.pid)) == 3  # the shell and its two children
    kill_group(proc)
    proc.stdout.close()
    assert group_members(proc.pid) == []
