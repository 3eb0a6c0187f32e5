"""The cluster simulator: its decode spans against a step-by-step reference loop written here, its per-instance
cache against the compiled replay core, P/D and p2p accounting, the issue's must-show on the shared trace, the
serving-time fit, token economics, the simulated-vs-executed comparison, and bad input."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
from click.testing import CliRunner
from fixture_paths import MOONCAKE_TRACE

from tieremu.cli.root import main
from tieremu.cluster.economics import Prices, economics
from tieremu.cluster.routers import make_router
from tieremu.cluster.servtime import Sample, ServingTimeModel, fit, reference
from tieremu.cluster.simulate import (
    ClusterSpec,
    Link,
    SimSettings,
    SimTierSpec,
    _iterations_by,
    _span_s,
    check_settings,
    load_cluster_spec,
    parse_pd,
    simulate_cluster,
)
from tieremu.cluster.validate import compare
from tieremu.errors import ConfigError
from tieremu.policy.registry import get_policy
from tieremu.record.stats import percentile
from tieremu.workloads.simulate import SimTier, arrival_times, simulate
from tieremu.workloads.trace import Request, read_trace

SPEC = ClusterSpec("test", (SimTierSpec("hbm", 256, 1500.0, 0.0), SimTierSpec("dram", 2048, 25.0, 0.004)),
                   Link(10.0, 25.0), instance_price_per_hour=2.0)


@pytest.fixture(scope="module")
def trace() -> list[Request]:
    return read_trace(MOONCAKE_TRACE)


def _reference_one_instance(requests: list[Request], m: ServingTimeModel, budget: int, max_batch: int
                            ) -> tuple[list[float], list[float]]:
    """Textbook continuous batching, one iteration at a time (no spans): every request's first-token and finish
    times. Blocks are never reused here, so every prompt token is computed."""
    arrivals = arrival_times(requests)
    first = [math.nan] * len(requests)
    finish = [math.nan] * len(requests)
    waiting: list[list[int]] = []  # [index, tokens left to prefill]
    running: list[list[int]] = []  # [index, tokens left to generate, context]
    t, nxt = 0.0, 0
    while nxt < len(requests) or waiting or running:
        while nxt < len(requests) and arrivals[nxt] <= t:
            waiting.append([nxt, requests[nxt].input_length])
            nxt += 1
        if not waiting and not running:
            t = arrivals[nxt]
            continue
        left, room, chunks = budget - len(running), max_batch - len(running), []
        for w in waiting:
            if left <= 0 or room <= 0:
                break
            take = min(left, w[1])
            chunks.append((w, take))
            left -= take
            room -= 1
        tokens = sum(take for _, take in chunks)
        t += m.iteration_s(tokens, len(running), m.kv_bytes_per_token * sum(r[2] for r in running))
        for r in running:
            r[1] -= 1
            r[2] += 1
            if r[1] == 0:
                finish[r[0]] = t
        running = [r for r in running if r[1] > 0]
        for w, take in chunks:
            w[1] -= take
            if w[1] == 0:
                waiting.remove(w)
                first[w[0]] = t
                out = requests[w[0]].output_length - 1
                if out <= 0:
                    finish[w[0]] = t
                else:
                    running.append([w[0], out, requests[w[0]].input_length + 1])
    return first, finish


def test_decode_spans_match_a_step_by_step_reference() -> None:
    rng = random.Random(3)
    requests, ms, next_id = [], 0, 0
    for _ in range(40):
        ms += rng.randint(50, 900)
        n = rng.randint(100, 3000)
        blocks = math.ceil(n / 512)
        requests.append(Request(ms, n, rng.randint(1, 60), tuple(range(next_id, next_id + blocks))))
        next_id += blocks
    model = ServingTimeModel("t", "assumed", base_s=0.01, prefill_token_s=2e-4, decode_seq_s=1e-3, kv_byte_s=1e-9,
                             kv_bytes_per_token=1000)
    spec = ClusterSpec("one", (SimTierSpec("hbm", None, 1000.0),))
    result = simulate_cluster(requests, spec, SimSettings(1, make_router("round-robin"), token_budget=700,
                                                          max_batch=3), model)
    first, finish = _reference_one_instance(requests, model, 700, 3)
    arrivals = arrival_times(requests)
    ttft = sorted((f - a) * 1e3 for f, a in zip(first, arrivals, strict=True))
    assert result.completed == len(requests)
    assert result.ttft_ms.p50 == pytest.approx(percentile(ttft, 50), rel=1e-9)
    assert result.ttft_ms.p99 == pytest.approx(percentile(ttft, 99), rel=1e-9)
    assert result.ttft_ms.max == pytest.approx(ttft[-1], rel=1e-9)
    assert result.ttft_ms.mean == pytest.approx(sum(ttft) / len(ttft), rel=1e-9)
    tpot = [(e - f) * 1e3 / (r.output_length - 1) for r, f, e in zip(requests, first, finish, strict=True)
            if r.output_length > 1]
    assert result.tpot_ms.mean == pytest.approx(sum(tpot) / len(tpot), rel=1e-9)
    assert result.tpot_ms.max == pytest.approx(max(tpot), rel=1e-9)
    assert result.hit_ratio["miss"] == 1.0


def test_span_iterations_by_time_agree_with_summing_iterations() -> None:
    alpha, beta, k = 0.013, 0.0007, 50
    for elapsed in (0.0, 0.005, 0.013, 0.02, 0.3, 1.0, 5.0):
        t, j = 0.0, 0
        while j < k and t + alpha + beta * j <= elapsed + 1e-15:
            t += alpha + beta * j
            j += 1
        assert _iterations_by(elapsed, alpha, beta, k) == j
        assert _span_s(j, alpha, beta) == pytest.approx(t)


def test_one_instance_cache_equals_the_compiled_replay_core(trace: list[Request]) -> None:
    """Demand LRU over two tiers: the same hits per tier and misses as simulate's compiled core (tiers larger than
    any request, where pinning changes nothing)."""
    requests = trace[:800]
    assert max(len(r.hash_ids) for r in requests) < 400
    core = simulate(requests, [SimTier("hbm", 400), SimTier("dram", 1500)], get_policy("lru"), core="native")
    spec = ClusterSpec("two", (SimTierSpec("hbm", 400, 1000.0), SimTierSpec("dram", 1500, 25.0)))
    result = simulate_cluster(requests, spec, SimSettings(1, make_router("round-robin")), reference())
    row = result.instances[0]
    assert row["hits"] == {"hbm": core.tier("hbm").hits, "dram": core.tier("dram").hits}
    assert row["misses"] == core.misses


def test_must_show_prefix_and_cost_beat_round_robin_on_the_shared_trace(trace: list[Request]) -> None:
    results = {name: simulate_cluster(trace, SPEC, SimSettings(16, make_router(name)), reference())
               for name in ("round-robin", "prefix", "cost")}
    rr, prefix, cost = results["round-robin"], results["prefix"], results["cost"]
    assert prefix.ttft_ms.p50 < rr.ttft_ms.p50
    assert cost.ttft_ms.p50 < rr.ttft_ms.p50
    assert cost.ttft_ms.p99 <= prefix.ttft_ms.p99
    for r in results.values():
        assert r.load_imbalance >= 1.0 and r.origin == "simulated" and r.completed == len(trace)
    assert rr.load_imbalance == pytest.approx(1.0, abs=0.01)  # 3993 requests over 16 in turn


def test_p2p_pulls_blocks_from_peers_and_cuts_ttft(trace: list[Request]) -> None:
    requests = trace[:600]
    none = simulate_cluster(requests, SPEC, SimSettings(4, make_router("round-robin")), reference())
    p2p = simulate_cluster(requests, SPEC, SimSettings(4, make_router("round-robin"), sharing="p2p"), reference())
    assert none.hit_ratio["peer"] == 0 and none.peer_bytes == 0
    assert p2p.hit_ratio["peer"] > 0.05
    assert p2p.peer_bytes == sum(row["peer_bytes_out"] for row in p2p.instances)
    assert p2p.peer_bytes % (reference().kv_bytes_per_token * 512) == 0
    assert p2p.ttft_ms.p50 < none.ttft_ms.p50
    shares = p2p.hit_ratio["local"] + p2p.hit_ratio["peer"] + p2p.hit_ratio["miss"]
    assert shares == pytest.approx(1.0)


def test_pd_hands_every_prompts_kv_to_a_decode_instance(trace: list[Request]) -> None:
    requests = trace[:300]
    r = simulate_cluster(requests, SPEC, SimSettings(8, make_router("least-loaded"), pd=(3, 5)), reference())
    per_token = reference().kv_bytes_per_token
    assert r.pd_bytes == sum(q.input_length * per_token for q in requests if q.output_length > 1)
    assert r.completed == len(requests)
    rows = r.instances
    assert [row["kind"] for row in rows] == ["prefill"] * 3 + ["decode"] * 5
    assert sum(row["requests"] for row in rows[:3]) == len(requests) and all(row["requests"] == 0 for row in rows[3:])
    assert sum(row["pd_bytes_in"] for row in rows[3:]) == r.pd_bytes
    assert r.pd_bytes_per_request == pytest.approx(r.pd_bytes / sum(1 for q in requests if q.output_length > 1))


def test_slo_admission_rejects_and_attainment_counts_them(trace: list[Request]) -> None:
    requests = trace[:1000]
    r = simulate_cluster(requests, SPEC, SimSettings(4, make_router("cost"), slo_ms=1000), reference())
    assert r.rejected > 0
    assert r.completed + r.rejected == len(requests)
    assert 0 < r.slo_attainment <= (len(requests) - r.rejected) / len(requests)


def test_json_has_the_issue_keys_and_cost_per_mtok(trace: list[Request]) -> None:
    r = simulate_cluster(trace[:200], SPEC, SimSettings(2, make_router("weighted")), reference()).to_dict()
    for key in ("router", "slo_attainment", "rejected", "load_imbalance", "cost_per_mtok", "hit_ratio", "ttft_ms",
                "tpot_ms", "peer_bytes", "instances", "tokens_per_dollar"):
        assert key in r
    assert set(r["ttft_ms"]) >= {"p50", "p99"} and set(r["hit_ratio"]) >= {"local", "peer", "miss"}
    assert r["origin"] == "simulated" and r["cost_per_mtok"] > 0
    no_prices = ClusterSpec("free", SPEC.tiers)
    assert simulate_cluster(trace[:50], no_prices, SimSettings(2, make_router("cost")), reference()).cost_per_mtok \
        is None


def test_economics_by_hand() -> None:
    # 4 instances, 2 h, $3/h each + 10 GB at $0.5/GB-h + 100 GB at $0.01/GB-h = 4 * 2 * (3 + 5 + 1) = $72.
    e = economics(Prices(3.0, (0.5, 0.01)), instances=4, tier_bytes=[10 * 10**9, 100 * 10**9], span_s=7200,
                  tokens=36_000_000)
    assert e.cost == pytest.approx(72.0)
    assert e.cost_per_mtok == pytest.approx(2.0)
    assert e.tokens_per_dollar == pytest.approx(500_000)
    with pytest.raises(ConfigError, match="price"):
        Prices(-1.0, ())


def test_servtime_fit_recovers_known_coefficients_and_round_trips(tmp_path) -> None:
    truth = ServingTimeModel("truth", "assumed", 0.002, 3e-5, 4e-4, 2e-10, kv_bytes_per_token=2048)
    samples = [Sample(p, d, k, truth.iteration_s(p, d, k)) for p, d, k in
               [(64, 0, 0), (512, 0, 0), (2048, 0, 0), (0, 1, 10**6), (0, 8, 10**7), (0, 16, 5 * 10**7), (0, 4, 0)]]
    model = fit(samples, name="fitted", kv_bytes_per_token=2048)
    for key in ("base_s", "prefill_token_s", "decode_seq_s", "kv_byte_s"):
        assert getattr(model, key) == pytest.approx(getattr(truth, key), rel=1e-6)
    assert model.fit.max_rel < 1e-9 and model.origin == "measured"
    # A feature that only lowers times is fixed at 0, not fitted negative.
    skewed = [Sample(s.prefill_tokens, s.decode_seqs, s.kv_bytes, s.seconds - 3e-10 * s.kv_bytes) for s in samples]
    assert fit(skewed, name="s", kv_bytes_per_token=2048).kv_byte_s == 0.0
    path = tmp_path / "m.json"
    model.save(path)
    assert ServingTimeModel.load(path) == model
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="serving-time model"):
        ServingTimeModel.load(path)


def test_validation_errors_on_synthetic_results() -> None:
    executed = {"ttft_ms": {"p50": 100.0, "p99": 400.0}, "throughput_tokens_per_s": 1000.0}
    good = compare({"ttft_ms": {"p50": 108.0, "p99": 340.0}, "throughput_tokens_per_s": 900.0}, executed)
    assert good.ttft_p50_error == pytest.approx(0.08)
    assert good.ttft_p99_error == pytest.approx(-0.15)
    assert good.throughput_error == pytest.approx(-0.1)
    assert good.passed
    assert not compare({"ttft_ms": {"p50": 111.0, "p99": 400.0}}, executed).passed
    assert compare({"ttft_ms": {"p50": 100.0, "p99": 481.0}}, executed).throughput_error is None
    with pytest.raises(ConfigError, match="executed result has no ttft_ms"):
        compare(executed, {"ttft_ms": {"p50": 1}})


def test_bad_settings_are_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--pd 3:4 must split the 8 instances"):
        check_settings(8, "none", (3, 4), None)
    with pytest.raises(ConfigError, match="--pd 0:8"):
        check_settings(8, "none", (0, 8), None)
    with pytest.raises(ConfigError, match="SLO"):
        check_settings(8, "none", None, 0.0)
    with pytest.raises(ConfigError, match="sharing"):
        check_settings(8, "all", None, None)
    with pytest.raises(ConfigError, match="P:D"):
        parse_pd("3-5")
    missing = str(tmp_path / "no-such-trace.jsonl")  # never read: every error comes first
    runner = CliRunner()
    for args, message in ((["--router", "random"], "unknown router 'random'"),
                          (["--router", "prefix:load_threshold=-1"], "out of range"),
                          (["--instances", "8", "--pd", "2:2"], "must split the 8 instances"),
                          (["--slo-ms", "0"], "SLO 0.0 ms must be a positive"),
                          (["--slo-ms", "-5"], "SLO -5.0 ms must be a positive")):
        result = runner.invoke(main, ["cluster", "replay", missing, "--mode", "simulate", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "trace" not in result.output.lower()
    bad = tmp_path / "spec.yaml"
    bad.write_text("name: x\ntiers:\n  - {name: hbm, read_gbps: 0}\n")
    with pytest.raises(ConfigError, match="read_gbps"):
        load_cluster_spec(bad)
    # Execute mode's tier map, with its peer tier, is not silently half-read: the simulator models peers through
    # --sharing p2p over the spec's link, and says so.
    tier_map = MOONCAKE_TRACE.parents[1] / "configs" / "tiers" / "cluster-peer.yaml"
    with pytest.raises(ConfigError, match=r"tiers\[1\]: is a `kind: peer` tier: this file is a tier map"):
        load_cluster_spec(tier_map)


def test_cli_prints_json(tmp_path) -> None:
    result = CliRunner().invoke(main, ["cluster", "replay", str(MOONCAKE_TRACE), "--mode", "simulate",
                                       "--router", "cost", "--instances", "4", "--pd", "1:3", "--sharing", "p2p",
                                       "--max-requests", "100", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["router"] == {"router": "cost"} and data["pd"] == [1, 3] and data["requests"] == 100
    assert data["validation"] is None  # the reference model: nothing validated it here, and the result says so
    shipped = load_cluster_spec(MOONCAKE_TRACE.parents[1] / "configs" / "cluster" / "sim-hbm-dram.yaml")
    assert shipped.prices is not None and len(shipped.tiers) == 2


def test_cli_compares_several_routers_on_one_trace() -> None:
    result = CliRunner().invoke(main, ["cluster", "replay", str(MOONCAKE_TRACE), "--mode", "simulate",
                                       "--router", "round-robin",
                                       "--router", "prefix:load_threshold=4", "--instances", "4", "--max-requests",
                                       "100", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["router"]["router"] for d in data] == ["round-robin", "prefix"]
    assert data[1]["router"]["load_threshold"] == 4
    table = CliRunner().invoke(main, ["cluster", "replay", str(MOONCAKE_TRACE), "--mode", "simulate",
                                      "--max-requests", "50"])
    assert table.exit_code == 0 and "load imbalance" in table.output and "simulated" in table.output
    assert "not validated" in table.output


def test_a_fitted_slower_tier_cost_is_recovered_and_charged_by_the_simulator(trace: list[Request]) -> None:
    truth = {"base": 0.003, "seq": 2e-4, "fast": 1e-10, "cxl": 7e-10}
    samples = [Sample(n, 0, 0, 0.003 + 5e-5 * n) for n in (64, 512, 2048)]
    for b, context in ((2, 10**6), (8, 10**6), (4, 3 * 10**6)):
        for fast_bytes, cxl_bytes in ((b * context, 0), (b * context // 2, b * context // 2), (0, b * context)):
            seconds = truth["base"] + truth["seq"] * b + truth["fast"] * fast_bytes + truth["cxl"] * cxl_bytes
            samples.append(Sample(0, b, fast_bytes, seconds, tier_bytes=(("cxl", cxl_bytes),) if cxl_bytes else ()))
    model = fit(samples, name="tiered", kv_bytes_per_token=2048)
    assert model.tier_byte_s["cxl"] == pytest.approx(truth["cxl"], rel=1e-6)
    assert model.kv_byte_s == pytest.approx(truth["fast"], rel=1e-6)
    # The simulator reads a hit in a spec tier named cxl at that cost per byte, not at the spec's bandwidth.
    spec = ClusterSpec("t", (SimTierSpec("hbm", 64, 1000.0), SimTierSpec("cxl", 4096, 1e-3)))
    requests = trace[:300]
    charged = simulate_cluster(requests, spec, SimSettings(2, make_router("round-robin")), model)
    slow = simulate_cluster(requests, spec, SimSettings(2, make_router("round-robin")),
                            replace(model, tier_byte_s={}))  # 1 MB/s from the spec instead
    assert charged.hit_ratio == slow.hit_ratio and charged.hit_ratio["by_tier"]["cxl"] > 0
    assert charged.ttft_ms.p50 < slow.ttft_ms.p50


def test_fit_servtime_refuses_bad_input_before_timing(tmp_path) -> None:
    runner = CliRunner()
    a_file = tmp_path / "m.json"
    a_file.write_text("{}")
    for args, message in ((["--out", str(a_file)], "is a file"),
                          (["--out", str(tmp_path), "--name", "sub/m.json"], "a file name, not a path"),
                          (["--out", str(tmp_path / "new"), "--preset", "huge"], "preset"),
                          (["--out", str(tmp_path), "--engine", "sglang"], "Invalid value for '--engine'")):
        result = runner.invoke(main, ["cluster", "fit-servtime", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # nothing written, no folder made


def test_cluster_replay_refuses_an_option_of_the_other_mode(tmp_path) -> None:
    missing = str(tmp_path / "no-such-trace.jsonl")  # never read: the refusal comes first
    runner = CliRunner()
    for args, message in ((["--mode", "simulate", "--index", "hash"], "--index: not used by cluster replay --mode "
                                                                      "simulate"),
                          (["--mode", "execute", "--tiers", missing, "--slo-ms", "5"], "--slo-ms: not used"),
                          (["--mode", "execute", "--tiers", missing, "--router", "cost"], "routes round-robin"),
                          (["--mode", "execute"], "--tiers: cluster replay --mode execute needs")):
        result = runner.invoke(main, ["cluster", "replay", missing, *args])
        assert result.exit_code == 2, result.output
        assert message in result.output


def _reference_serial(requests: list[Request], arrivals: list[float], n: int, m: ServingTimeModel,
                      block_bytes: int, block_tokens: int, pull_block_s: float, share: bool) -> list[float]:
    """Textbook serial servers (Lindley's recursion per instance, requests round-robin), instances advanced in order
    of their next start: each block a local hit (seen on that instance; no eviction), else pulled when another
    instance has started a request holding it (share), else computed. Every request's first-token time."""
    queues = [[k for k in range(len(requests)) if k % n == i] for i in range(n)]
    free = [0.0] * n
    seen: list[set[int]] = [set() for _ in range(n)]
    first = [math.nan] * len(requests)
    while any(queues):
        i = min((j for j in range(n) if queues[j]), key=lambda j: (max(free[j], arrivals[queues[j][0]]), j))
        k = queues[i].pop(0)
        start = max(free[i], arrivals[k])
        service = m.base_s
        for block in requests[k].hash_ids:
            if block in seen[i]:
                service += block_bytes * m.kv_byte_s
            elif share and any(block in seen[j] for j in range(n) if j != i):
                service += pull_block_s
            else:
                service += block_tokens * m.prefill_token_s
            seen[i].add(block)
        free[i] = first[k] = start + service
    return first


@pytest.mark.parametrize("sharing", ["none", "p2p"])
def test_serial_serving_matches_textbook_serial_servers(trace: list[Request], sharing: str) -> None:
    """Serial serving (the executed instances' way, `cluster validate`) against the textbook: same TTFT for every
    request, to the float."""
    m = ServingTimeModel("serial", "assumed", base_s=0.002, prefill_token_s=5e-6, decode_seq_s=0.0, kv_byte_s=1e-9,
                         kv_bytes_per_token=128)
    bt = 512
    requests = [Request(r.timestamp_ms, len(r.hash_ids) * bt, 1, r.hash_ids) for r in trace[:200]]
    arrivals = [a * 0.3 for a in arrival_times(requests)]
    spec = ClusterSpec("serial", (SimTierSpec("dram", None, 1e5),), Link(0.0, 0.5))
    settings = SimSettings(instances=3, router=make_router("round-robin"), sharing=sharing, block_tokens=bt,
                           serving="serial", pull="always")
    sim = simulate_cluster(requests, spec, settings, m, arrivals)
    want = _reference_serial(requests, arrivals, 3, m, 128 * bt, bt, 128 * bt / 0.5e9, sharing == "p2p")
    got = sorted(want[k] - arrivals[k] for k in range(len(requests)))
    assert sim.ttft_ms.p50 == pytest.approx(percentile([g * 1e3 for g in got], 50), rel=1e-9)
    assert sim.ttft_ms.max == pytest.approx(got[-1] * 1e3, rel=1e-9)
    assert sim.completed == len(requests)
    assert (sim.hit_ratio["peer"] > 0) == (sharing == "p2p")


def test_serial_serving_per_request_times_and_bad_settings(trace: list[Request]) -> None:
    m = ServingTimeModel("serial", "assumed", base_s=0.001, prefill_token_s=1e-5, decode_seq_s=0.0, kv_byte_s=0.0,
                         kv_bytes_per_token=128)
    requests = [Request(r.timestamp_ms, len(r.hash_ids) * 512, 1, r.hash_ids) for r in trace[:50]]
    arrivals = [a * 0.1 for a in arrival_times(requests)]
    spec = ClusterSpec("serial", (SimTierSpec("dram", None, 1e5),))
    settings = SimSettings(instances=2, router=make_router("round-robin"), serving="serial")
    from tieremu.cluster.simulate import ClusterSim

    sim = ClusterSim(spec, settings, m)
    sim.run(requests, arrivals)
    assert [q.arrival for q in sim.reqs] == arrivals
    assert all(q.first_token >= q.arrival + m.base_s for q in sim.reqs)
    with pytest.raises(ConfigError, match="arrival times"):
        ClusterSim(spec, settings, m).run(requests, arrivals[::-1])
    with pytest.raises(ConfigError, match="serving"):
        SimSettings(instances=2, router=make_router("round-robin"), serving="fifo")
    with pytest.raises(ConfigError, match="serving=serial"):
        SimSettings(instances=2, router=make_router("round-robin"), pull="always")


def test_serial_contention_shares_the_cpus_as_processor_sharing() -> None:
    """Two instances, contention 1 (two busy instances each run at half speed), worked by hand: A (1 s of work)
    starts at 0 and runs alone to 0.5 s; B (1 s) arrives at 0.5 s; both at half speed until A's last 0.5 s of work
    ends at 1.5 s, B having done 0.5 s; B alone ends at 2.0 s."""
    m = ServingTimeModel("cpu", "assumed", base_s=0.0, prefill_token_s=1.0 / 512, decode_seq_s=0.0, kv_byte_s=0.0,
                         kv_bytes_per_token=1)
    requests = [Request(0, 512, 1, (1,)), Request(500, 512, 1, (2,))]
    spec = ClusterSpec("cpu", (SimTierSpec("dram", None, 1e5),))
    settings = SimSettings(instances=2, router=make_router("round-robin"), serving="serial", contention=1.0)
    from tieremu.cluster.simulate import ClusterSim

    sim = ClusterSim(spec, settings, m)
    sim.run(requests, [0.0, 0.5])
    assert [q.first_token for q in sim.reqs] == pytest.approx([1.5, 2.0])
    with pytest.raises(ConfigError, match="contention"):
        SimSettings(instances=2, router=make_router("round-robin"), contention=0.5)
