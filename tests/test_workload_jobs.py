"""The decode and replay jobs inside the sweep runner: every run a worker process, bounds beside the policies."""

from __future__ import annotations

from pathlib import Path

import pytest
from experiment_runs import run_jobs

from tieremu.errors import ConfigError
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import expand

REPO = Path(__file__).resolve().parents[1]


CXL_MAP = REPO / "configs" / "tiers" / "cxl-expander.yaml"
SMALL_TRACE = REPO / "configs" / "traces" / "small.jsonl"


def test_decode_and_replay_jobs_run_with_their_bounds(tmp_path: Path) -> None:
    rows = run_jobs(tmp_path, CXL_MAP,
                    "  - {kind: decode, policies: [lru], prompt_tokens: 96, shared_prefix_tokens: 32,\n"
                    "     decode_steps: 4, fast_capacity_mib: 0.25}\n"
                    f"  - {{kind: replay, trace: {SMALL_TRACE}, policies: [lru], max_requests: 80,\n"
                    "     fast_capacity_blocks: 20}\n")
    decode = [r for r in rows if r["job"] == "decode"]
    runs = {r["run"] for r in decode}
    assert len(runs) == 3  # lru + all-fastest + all-slowest
    tpot = [r for r in decode if r["metric"] == "tpot_ms"]
    assert len(tpot) == 3 * 4 and all(r["value"] > 0 for r in tpot)
    # Blocks of the emulated tiers are labelled so; placement was asked of the kernel at start and end.
    placed = [r for r in decode if r["metric"] == "placement_fraction"]
    assert placed and all(r["value"] == 1.0 for r in placed)
    assert {r["origin"] for r in placed if r["tier"] in ("cxl", "far")} <= {"emulated"}
    # Each emulated tier's audit: the slowest bound read everything from `far`, so far was charged and paid.
    audits = {(r["run"].split("-r0")[0], r["tier"]): r for r in decode
              if r["metric"] == "injected_delay_s" and r["tier"]}
    far = audits[("decode-all-slowest", "far")]
    assert far["origin"] == "emulated" and far["value"] > 0 and far["params"]["charged_bytes"] > 0
    assert far["params"]["target_latency_ns"] > 0 and audits[("decode-all-slowest", "cxl")]["value"] == 0
    star = {r["run"].split("-r0")[0]: r["value"] for r in decode if r["metric"] == "star"}
    assert star["decode-all-fastest"] == 0 and star["decode-all-slowest"] == 1 and 0 < star["decode-lru"] < 1
    [total] = [r for r in decode if r["metric"] == "migration_gbps" and "lru" in r["run"]]
    # Migrations over time: windows of the run that add up to what the daemon moved.
    windows = [r for r in decode if r["metric"] == "window_migration_gbps" and "lru" in r["run"]]
    assert windows and [r["seq"] for r in windows] == list(range(len(windows)))
    assert sum(r["params"]["bytes"] for r in windows) == total["params"]["bytes"]
    assert not any(r["metric"] == "window_migration_gbps" for r in decode if "all-" in r["run"])
    replay = [r for r in rows if r["job"] == "replay" and r["metric"] == "hit_ratio" and r["tier"] == "dram"]
    fast = {r["run"].split("-r0")[0]: r["value"] for r in replay}
    # Belady, the offline optimum, runs beside the policy without being asked; the bounds bracket both.
    assert set(fast) == {"replay-lru", "replay-belady", "replay-all-fastest", "replay-all-slowest"}
    assert fast["replay-all-slowest"] == 0 <= fast["replay-lru"] <= fast["replay-belady"] <= fast["replay-all-fastest"]
    assert all(r["origin"] == "simulated" for r in rows if r["job"] == "replay")
    # The TTFT estimate charges a hit's block read at its tier's rate: the slow bound waits longer for its hits.
    rates = {r["tier"]: r["value"] for r in rows if r["job"] == "replay" and r["metric"] == "read_gb_per_s"}
    assert set(rates) == {"dram", "cxl", "far"} and rates["far"] < rates["cxl"] < rates["dram"]
    ttft = {}
    for r in rows:
        if r["job"] == "replay" and r["metric"] == "ttft_ms":
            ttft.setdefault(r["run"].split("-r0")[0], []).append(r["value"])
    assert sum(ttft["replay-all-slowest"]) > sum(ttft["replay-lru"]) > sum(ttft["replay-all-fastest"])


def test_a_decode_spec_with_a_bad_value_fails_before_any_work(tmp_path: Path) -> None:
    spec = tmp_path / "e.yaml"
    spec.write_text(f"name: wj\ntiers: {REPO / 'configs/tiers/cxl-expander.yaml'}\njobs:\n"
                    "  - {kind: decode, policies: [lru], preset: huge}\n")
    with pytest.raises(ConfigError, match="preset"):
        load_experiment(spec)
    assert not (tmp_path / "out").exists()


def test_replay_job_executes_a_trace_on_real_blocks_beside_its_bounds(tmp_path: Path,
                                                                     memory_nodes: tuple[int, ...]) -> None:
    rows = run_jobs(tmp_path, CXL_MAP,
                    f"  - {{kind: replay, mode: execute, trace: {SMALL_TRACE}, policies: [lru],\n"
                    "     max_requests: 40, fast_capacity_blocks: 20, time_scale: 0.05, block_kib: 16}\n")
    runs = {r["run"].split("-r0")[0] for r in rows}
    assert runs == {"replay-lru", "replay-belady", "replay-all-fastest", "replay-all-slowest"}
    emulated = len(memory_nodes) == 1
    for run in runs:
        mine = [r for r in rows if r["run"].startswith(run + "-")]
        by_metric = {r["metric"]: r for r in mine if r["tier"] is None}
        # Real blocks, really checked; figures measured (emulated where a tier is emulated), one TTFT per request.
        assert by_metric["blocks_checked"]["value"] > 0 and by_metric["blocks_checked"]["params"]["corrupted"] == 0
        assert len([r for r in mine if r["metric"] == "ttft_ms"]) == 40
        assert all(r["value"] > 0 for r in mine if r["metric"] == "ttft_ms")
        assert by_metric["hit_ratio"]["origin"] in ("emulated", "measured", "vm")
        if emulated and run != "replay-all-fastest":  # the others hold blocks in emulated tiers
            assert by_metric["hit_ratio"]["origin"] == "emulated"
            assert any(r["metric"] == "injected_delay_s" and r["tier"] and r["value"] > 0 for r in mine)
    fast = {r["run"].split("-r0")[0]: r["value"] for r in rows if r["metric"] == "hit_ratio" and r["tier"] == "dram"}
    assert fast["replay-all-slowest"] == 0 <= fast["replay-lru"] <= fast["replay-all-fastest"]


def test_replay_job_generates_its_trace_from_a_seed(tmp_path: Path) -> None:
    rows = run_jobs(tmp_path, CXL_MAP,
                    "  - {kind: replay, generate: {kind: agent, requests: 60, seed: 3}, policies: [lfu],\n"
                    "     fast_capacity_blocks: 10}\n")
    ttft = [r for r in rows if r["metric"] == "ttft_ms" and "lfu" in r["run"]]
    assert len(ttft) == 60 and all(r["origin"] == "simulated" for r in ttft)
    # An agentic loop over a shared system prompt hits its prefix: the generator's trace really has reuse.
    [hits] = [r for r in rows if r["metric"] == "hit_ratio" and r["tier"] is None and "lfu" in r["run"]]
    assert hits["value"] > 0.3


def test_replay_job_takes_a_share_of_the_blocks_a_budget_and_checks_its_bounds(tmp_path: Path) -> None:
    rows = run_jobs(tmp_path, CXL_MAP,
                    f"  - {{kind: replay, trace: {SMALL_TRACE}, policies: [lru, hotcold], fast_capacity: 5%,\n"
                    "     pin: false, budget_gbps: 2}\n")
    checks = [r for r in rows if r["metric"] == "bound_check"]
    assert {r["params"]["bound"] for r in checks} == {"ceiling", "belady", "daemon-oracle", "budget"}
    assert all(r["value"] == 1 for r in checks)
    assert {r["run"].split("-r0")[0] for r in checks if r["params"]["bound"] == "belady"} == {"replay-lru"}
    assert "replay-hotcold" in {r["run"].split("-r0")[0] for r in checks if r["params"]["bound"] == "daemon-oracle"}
    rates = [r["value"] for r in rows if r["metric"] == "migration_gbps"]
    assert rates and max(rates) <= 2.0


def test_replay_job_sweeps_policy_parameters(tmp_path: Path) -> None:
    rows = run_jobs(tmp_path, CXL_MAP,
                    f"  - {{kind: replay, trace: {SMALL_TRACE}, policies: [lru], fast_capacity: 20,\n"
                    "     sweep: {policy: [{name: hotcold, quota: 1}, {name: hotcold, quota: 32}]}}\n")
    moves = {r["params"]["policy"]: r["value"] for r in rows if r["metric"] == "promotions"}
    assert set(moves) == {'hotcold{"quota":1}', 'hotcold{"quota":32}', "belady", "all-fastest", "all-slowest"}
    assert moves['hotcold{"quota":1}'] < moves['hotcold{"quota":32}']  # the parameter reached the policy


def test_a_bound_that_does_not_depend_on_the_swept_axis_runs_once(tmp_path: Path) -> None:
    spec = tmp_path / "e.yaml"
    spec.write_text(f"name: s\ntiers: {CXL_MAP}\njobs:\n  - {{kind: replay, trace: {SMALL_TRACE}, policies: [lru],\n"
                    "     sweep: {fast_capacity: [5%, 10%, 20%], epoch_ms: [50, 100]}}\n")
    runs = expand(load_experiment(spec))
    per_policy = {p: sum(1 for r in runs if r.policy == p) for p in ("lru", "belady", "all-fastest", "all-slowest")}
    # belady and lru depend on the fast tier's size; the static bounds only on the epoch (their residency samples).
    assert per_policy == {"lru": 6, "belady": 6, "all-fastest": 2, "all-slowest": 2}
    assert {r.axes["epoch_ms"] for r in runs if r.policy == "all-fastest"} == {50, 100}


@pytest.mark.parametrize(("job", "message"), [
    ("{kind: replay, trace: TRACE, policies: [{name: hotcold, quota: many}]}",
     r"jobs\[0\]\.policies\[0\]: policy hotcold: parameter quota='many' must be int"),
    ("{kind: replay, trace: TRACE, policies: [{name: lru, promote_quota: 4}]}",
     r"policy lru: unknown parameter 'promote_quota'; valid parameters: none"),
    ("{kind: replay, trace: TRACE, policies: [{quota: 4}]}", r"a policy entry with parameters needs a name"),
    ("{kind: replay, trace: TRACE, policies: [lru], sweep: {policy: [{name: hotcold, target_util: 2}]}}",
     r"jobs\[0\]\.sweep\.policy\[0\]: policy hotcold: target_util=2.0 must be in \(0, 1\]"),
    ("{kind: replay, trace: TRACE, fast_capacity: 120%, policies: [lru]}",
     r"jobs\[0\]\.fast_capacity: fast_capacity=120%: a share must be above 0% and at most 100%"),
    ("{kind: replay, trace: TRACE, fast_capacity: 5%, fast_capacity_blocks: 4, policies: [lru]}",
     r"give fast_capacity or fast_capacity_blocks, not both"),
    ("{kind: replay, trace: TRACE, mode: execute, pin: false, policies: [lru]}", r"pin: false is for simulate"),
    ("{kind: replay, policies: [lru]}", r"jobs\[0\]\.trace: give a trace file \(trace: FILE\) or a generator"),
    ("{kind: replay, trace: TRACE, generate: {requests: 5}, policies: [lru]}", r"exactly one, not both"),
    ("{kind: replay, generate: {kind: forum, requests: 5}, policies: [lru]}",
     r"jobs\[0\]\.generate\.kind: 'forum' is not valid; valid: mix, chat, agent, rag, long"),
    ("{kind: replay, trace: TRACE, mode: exec, policies: [lru]}",
     r"jobs\[0\]\.mode: 'exec' is not valid; valid: simulate, execute"),
    ("{kind: replay, trace: TRACE, mode: execute, epoch_ms: 1, time_scale: 0.1, policies: [lru]}",
     r"jobs\[0\]\.epoch_ms: 1 ms of trace at time_scale 0.1 is an epoch of 0.1 ms of wall time, below 1 ms"),
    ("{kind: replay, trace: TRACE, epoch_s: 0.05, policies: [lru]}",
     r"jobs\[0\]\.epoch_s: renamed: use epoch_ms \(the same epoch in milliseconds"),
    ("{kind: replay, trace: TRACE, mode: execute, block_kib: 6, policies: [lru]}",
     r"jobs\[0\]\.block_kib: block_kib=6: .* comes in steps of 4 KiB"),
])
def test_a_bad_replay_job_fails_before_any_work(tmp_path: Path, job: str, message: str) -> None:
    spec = tmp_path / "e.yaml"
    job = job.replace("TRACE", str(REPO / "configs/traces/small.jsonl"))
    spec.write_text(f"name: bad\ntiers: {REPO / 'configs/tiers/cxl-expander.yaml'}\njobs:\n  - {job}\n")
    with pytest.raises(ConfigError, match=message):
        load_experiment(spec)


@pytest.mark.parametrize(("job", "message"), [
    ("{kind: decode, policies: [lru], batch: 100000}",
     r"jobs\[0\]\.batch: 100000: must be an integer >= 1 and <= 4096"),
    ("{kind: decode, policies: [lru], prompt_tokens: 1e12}", r"jobs\[0\]\.prompt_tokens: expected int"),
    ("{kind: decode, policies: [lru], prompt_tokens: 1000000000000}",
     r"jobs\[0\]\.prompt_tokens: 1000000000000: must be an integer >= 1 and <= 1048576"),
    ("{kind: decode, policies: [lru], decode_steps: 0}", r"jobs\[0\]\.decode_steps: 0: must be an integer >= 1"),
    ("{kind: decode, policies: [lru], block_tokens: 65536}", r"jobs\[0\]\.block_tokens: 65536: .* <= 4096"),
    ("{kind: decode, policies: [lru], fast_capacity_mib: 1.0e+21}", r"jobs\[0\]\.fast_capacity_mib: 1e\+21: .*<= 1"),
    ("{kind: decode, policies: [lru], epoch_ms: .inf}", r"jobs\[0\]\.epoch_ms: inf is not a finite number"),
    ("{kind: decode, policies: [lru], threads: 100000}", r"jobs\[0\]\.threads: 100000: .* <= 1024"),
    ("{kind: decode, policies: [lru], seed: -1}", r"jobs\[0\]\.seed: -1: must be an integer >= 0 and <= 4294967295"),
    ("{kind: decode, policies: [lru], budget_gbps: 1.0e+300}", r"jobs\[0\]\.budget_gbps: 1e\+300: .* <= 100000"),
    ("{kind: roundtrip, size_mib: 10000000000}", r"jobs\[0\]\.size_mib: 10000000000: .* <= 1073741824"),
    ("{kind: roundtrip, check_mib: 0}", r"jobs\[0\]\.check_mib: 0: must be an integer >= 1"),
    ("{kind: probe, size_mib: 2000000}", r"jobs\[0\]\.size_mib: 2000000: must be an integer >= 1 and <= 1048576"),
    ("{kind: probe, repeats: 1000000}", r"jobs\[0\]\.repeats: 1000000: .* <= 1000"),
])
def test_job_numbers_are_capped_with_the_key_and_the_range(tmp_path: Path, job: str, message: str) -> None:
    spec = tmp_path / "e.yaml"
    spec.write_text(f"name: caps\ntiers: {REPO / 'configs/tiers/cxl-expander.yaml'}\njobs:\n  - {job}\n")
    with pytest.raises(ConfigError, match=message):
        load_experiment(spec)
