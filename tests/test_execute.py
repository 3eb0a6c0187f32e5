"""Execute-mode replay: real KV blocks in the tiers' memory, the migration daemon, arrivals in scaled time; the
same decisions as simulate when epochs fall where simulate puts them, close to them when the daemon has its own
thread; every block's bytes intact after the run; the CLI's --mode execute."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixture_paths import MOONCAKE_TRACE

from tieremu.cli import replay as replay_cli
from tieremu.cli.replay import replay
from tieremu.errors import ConfigError
from tieremu.kv.cache import TieredKVCache
from tieremu.numa.topology import discover
from tieremu.policy import get_policy
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.emulation import DelayInjector
from tieremu.tiers.resolve import ResolvedTierMap, resolve
from tieremu.tiers.timing import Calibration
from tieremu.workloads.execute import (
    DEFAULT_BLOCK_KIB,
    DEFAULT_TIME_SCALE,
    BlockData,
    ExecuteResult,
    check_blocks,
    execute,
    scaled_layout,
)
from tieremu.workloads.simulate import ReplayResult, SimTier, policy_context, simulate
from tieremu.workloads.trace import Request, ceiling_hit_ratio, read_trace

REPO = Path(__file__).resolve().parents[1]
SMALL_TRACE = REPO / "configs" / "traces" / "small.jsonl"
CXL_MAP = REPO / "configs" / "tiers" / "cxl-expander.yaml"
CAPS = {"dram": 40, "cxl": 100, "far": 400}  # every tier limited: blocks are pushed down and out of the last
EPOCH_S = 0.01  # the daemon's period, wall seconds, in its thread
# Epochs between requests: timing cannot change a decision, so the replay runs fast (1 ms of wall time is an epoch
# of 333 ms of trace, as in the threaded test).
INLINE = {"epoch_s": 0.001, "time_scale": 0.003, "daemon_thread": False}
# A calibration as a fixture (host: 100 ns, 20 GB/s read), so emulated tiers get timing models without measuring.
CAL = Calibration(machine="fixture", created_utc="2026-01-01T00:00:00+00:00", node=0, latency_ns=100.0,
                  bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 16.0},
                  latency_by_node={0: 100.0}, read_gbps_by_node={0: 20.0})


@pytest.fixture(scope="module")
def resolved() -> ResolvedTierMap:
    return resolve(load_tier_map(CXL_MAP), discover("/"), calibration=CAL)


@pytest.fixture(scope="module")
def small_trace() -> list[Request]:
    return read_trace(SMALL_TRACE)


def run_execute(requests: Sequence[Request], resolved: ResolvedTierMap, name: str, caps: Mapping[str, int | None],
                *, time_scale: float, epoch_s: float = EPOCH_S, **kwargs: object) -> ExecuteResult:
    policy = get_policy(name, {}, policy_context(requests, epoch_s / time_scale))
    return execute(requests, resolved, policy, capacities=caps, time_scale=time_scale, epoch_s=epoch_s,
                   **kwargs)  # type: ignore[arg-type]


def run_simulate(requests: Sequence[Request], name: str, caps: Mapping[str, int | None], *, time_scale: float,
                 epoch_s: float = EPOCH_S, **_: object) -> ReplayResult:
    """Simulate with the same epochs in trace time as execute's epoch_s of wall time at this time scale, and
    blocks of the bytes execute really moves (simulate's moves then take microseconds: none is deferred)."""
    epoch = epoch_s / time_scale
    return simulate(requests, [SimTier(t, c) for t, c in caps.items()], get_policy(name, {}, policy_context(
        requests, epoch)), epoch_s=epoch, block_bytes=64 << 10)


def intact(result: ExecuteResult) -> None:
    assert result.blocks_corrupted == 0
    assert result.blocks_checked == sum(t.resident_blocks for t in result.tiers) > 0


# -- building blocks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kib", [64, 128, 256])
def test_a_scaled_block_keeps_the_traces_512_tokens_and_takes_the_bytes_asked(kib: int) -> None:
    layout = scaled_layout(kib)
    assert layout.block_tokens == 512 and layout.block_bytes == kib << 10 and not layout.per_layer


def test_a_block_size_the_layout_cannot_make_is_refused_with_sizes_that_work() -> None:
    with pytest.raises(ConfigError, match=r"block_kib=3: .* steps of 4 KiB; give a multiple of 4"):
        scaled_layout(3)


def test_block_data_depends_on_key_and_seed_only() -> None:
    layout = scaled_layout(16)
    a = BlockData(layout).of(7)
    assert a.shape == layout.block_shape and a.dtype == torch.float16
    assert torch.equal(a, BlockData(layout).of(7))
    assert not torch.equal(a, BlockData(layout).of(8)) and not torch.equal(a, BlockData(layout, seed=1).of(7))
    # Keys that land on the same noise offset still differ: the key is in the block.
    assert a.flatten()[:8].tolist() == [7, 0, 0, 0, 0, 0, 0, 0]
    assert BlockData(layout).of(2**40 + 7).flatten()[:8].tolist() == [7, 0, 0, 0, 0, 1, 0, 0]


def test_the_check_finds_a_block_whose_bytes_changed(resolved: ResolvedTierMap) -> None:
    layout = scaled_layout(16)
    blocks = BlockData(layout)
    with TieredKVCache(resolved, layout, capacities={"dram": 4, "cxl": 4, "far": 4}, log_accesses=False) as cache:
        for seq, key in enumerate((11, 12, 13)):
            data = blocks.of(key)
            cache.add_sequence(seq, keys=[key])
            for layer in range(layout.layers):
                cache.write(seq, layer, 0, data[layer, 0], data[layer, 1])
            cache.free_sequence(seq)
        cache.move(cache.pool.by_key(12), "far")  # a copy between tiers keeps the bytes
        assert check_blocks(cache, blocks).corrupted == () and check_blocks(cache, blocks).checked == 3
        block = cache.pool.by_key(13)
        cache.pool.arenas[block.arena].blocks[block.slot, 1, 0, 5, 0, 0] += 1
        assert check_blocks(cache, blocks).corrupted == (13,)


# -- against simulate -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lru-epoch", "hotcold"])
def test_epochs_between_requests_make_simulates_decisions(resolved: ResolvedTierMap, small_trace: list[Request],
                                                          name: str) -> None:
    """With the daemon's epochs at simulate's instants, every hit, eviction and move is simulate's, on real memory.
    (Requests run late at this time scale, which must not change anything here.)"""
    result = run_execute(small_trace, resolved, name, CAPS, **INLINE)  # type: ignore[arg-type]
    sim = run_simulate(small_trace, name, CAPS, **INLINE)  # type: ignore[arg-type]
    assert [t.hits for t in result.tiers] == [t.hits for t in sim.tiers]
    assert (result.misses, result.evictions, result.uncached) == (sim.misses, sim.evictions, sim.uncached)
    assert (result.promotions, result.demotions, result.prefetches) == (sim.promotions, sim.demotions,
                                                                        sim.prefetches)
    assert [t.resident_blocks for t in result.tiers] == [t.resident_blocks for t in sim.tiers]
    assert result.epochs == sim.epochs == 333 and not result.daemon_thread
    # The capacities bind (blocks are pushed down and out): the comparison is not vacuous.
    assert result.evictions > 0 and result.demotions > 0 and result.tiers[0].hit_ratio < ceiling_hit_ratio(small_trace)
    assert result.migration_bytes == (result.promotions + result.demotions) * result.block_bytes
    assert result.origin == ("emulated" if resolved.any_emulated else "measured")
    intact(result)


@pytest.mark.parametrize("name", ["lru", "lfu", "belady"])
def test_a_demand_cache_promotes_on_access_as_simulate_does(resolved: ResolvedTierMap, small_trace: list[Request],
                                                            name: str) -> None:
    """A demand cache's hit below the fastest tier is moved up at once by a real move, room made by the same
    placement engine as simulate's: every hit per tier, promotion, demotion and eviction is simulate's."""
    requests = small_trace[:200]
    result = run_execute(requests, resolved, name, CAPS, **INLINE)  # type: ignore[arg-type]
    sim = run_simulate(requests, name, CAPS, **INLINE)  # type: ignore[arg-type]
    assert result.family == sim.family == "demand"
    assert [t.hits for t in result.tiers] == [t.hits for t in sim.tiers]
    assert (result.misses, result.evictions, result.uncached) == (sim.misses, sim.evictions, sim.uncached)
    assert (result.promotions, result.demotions) == (sim.promotions, sim.demotions)
    assert [t.resident_blocks for t in result.tiers] == [t.resident_blocks for t in sim.tiers]
    # Not vacuous: blocks were hit below the fastest tier and promoted, and victims pushed down.
    assert result.promotions > 0 and result.demotions > 0 and result.tiers[1].hits > 0
    assert result.migration_bytes == (result.promotions + result.demotions) * result.block_bytes
    intact(result)


def test_a_demand_caches_moves_stay_within_the_migration_budget(resolved: ResolvedTierMap,
                                                                 small_trace: list[Request]) -> None:
    """Promotions on access and the demotions admissions make draw on the daemon's budget: the run waits for it
    (the moves are the same), and the migration rate it reports stays within it."""
    requests = small_trace[:80]
    free = run_execute(requests, resolved, "lru", CAPS, **INLINE)  # type: ignore[arg-type]
    budget = free.migration_bytes / 1.0 / 1e9  # a second's worth of the run's moves
    held = run_execute(requests, resolved, "lru", CAPS, budget_gbps=budget, **INLINE)  # type: ignore[arg-type]
    assert (held.promotions, held.demotions, held.migration_bytes) == (free.promotions, free.demotions,
                                                                      free.migration_bytes) and held.promotions > 0
    assert held.migration_gbps <= budget * 1.01
    assert held.wall_s >= 0.9 and held.ttft_ms.mean > free.ttft_ms.mean


@pytest.mark.parametrize("name", ["lookahead"])
def test_a_full_tiers_block_order_is_the_one_difference_between_epochs_between_requests_and_simulate(
        resolved: ResolvedTierMap, small_trace: list[Request], name: str) -> None:
    """These policies sometimes push out a full tier's first unpinned block, and the pool lists blocks in
    allocation order where simulate lists them in order of arrival in the tier: hits move between tiers a little,
    the total stays."""
    result = run_execute(small_trace, resolved, name, CAPS, **INLINE)  # type: ignore[arg-type]
    sim = run_simulate(small_trace, name, CAPS, **INLINE)  # type: ignore[arg-type]
    assert (result.hits, result.evictions) == (sim.hits, sim.evictions)
    for mine, theirs in zip(result.tiers, sim.tiers, strict=True):
        assert mine.hit_ratio == pytest.approx(theirs.hit_ratio, abs=0.02)
    intact(result)


def test_the_daemons_thread_moves_blocks_and_stays_close_to_simulate(resolved: ResolvedTierMap,
                                                                      small_trace: list[Request]) -> None:
    """Epochs on wall time fall between requests only by chance: a plan made while a request is served cannot
    move its pinned blocks, and late requests leave fewer epochs between arrivals. The total hit ratio is decided
    by evictions from the last tier and barely moves; the fastest tier's share moves by a few points."""
    scale = 0.03
    result = run_execute(small_trace, resolved, "lru-epoch", CAPS, time_scale=scale)
    sim = run_simulate(small_trace, "lru-epoch", CAPS, time_scale=scale)
    assert result.hit_ratio == pytest.approx(sim.hit_ratio, abs=0.005)
    assert result.tiers[0].hit_ratio == pytest.approx(sim.tiers[0].hit_ratio, abs=0.1)
    assert result.daemon_thread and result.epochs >= 0.5 * result.wall_s / EPOCH_S
    assert result.promotions > 0 and result.demotions > result.admission_demotions > 0
    assert result.migration_gbps > 0 and result.daemon_cpu_s > 0
    assert result.wall_s >= result.trace_s * scale  # arrivals were waited for: nothing ran ahead of the trace
    assert len(result.ttft_samples_ms) == result.requests and min(result.ttft_samples_ms) > 0
    assert len(result.ttft_samples_ms) == len(small_trace) and result.ttft_ms.p99 >= result.ttft_ms.p50
    intact(result)


def test_a_truncated_shared_trace_gets_simulates_decisions(resolved: ResolvedTierMap) -> None:
    requests = read_trace(MOONCAKE_TRACE)[:400]
    caps = {"dram": 100, "cxl": 400, "far": 1500}
    result = run_execute(requests, resolved, "lru-epoch", caps, block_layout=scaled_layout(16), **INLINE)  # type: ignore
    sim = run_simulate(requests, "lru-epoch", caps, **INLINE)  # type: ignore[arg-type]
    assert result.references == sim.references == 10_346
    assert [t.hits for t in result.tiers] == [t.hits for t in sim.tiers] and result.evictions == sim.evictions > 0
    intact(result)


def test_a_bound_fills_one_tier_with_every_block(resolved: ResolvedTierMap, small_trace: list[Request]) -> None:
    requests = small_trace[:100]
    result = run_execute(requests, resolved, "all-fastest", CAPS, **INLINE)  # type: ignore[arg-type]
    assert result.capacity_lifted and [t.capacity_blocks for t in result.tiers] == [None, None, None]
    assert result.hit_ratio == pytest.approx(ceiling_hit_ratio(requests)) == result.tiers[0].hit_ratio
    assert result.tiers[0].resident_blocks == result.misses and result.evictions == 0
    assert result.strr == 0.0 and result.star == 0.0 and result.origin == "measured"  # dram is node 0: real
    intact(result)


def test_emulated_tiers_are_paid_for_through_the_injector(resolved: ResolvedTierMap,
                                                          small_trace: list[Request]) -> None:
    if not resolved.any_emulated:
        pytest.skip("every tier of cxl-expander is a real node here: nothing is emulated")
    injector = DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], CAL)
    slow = run_execute(small_trace[:60], resolved, "all-slowest", CAPS, injector=injector,
                       **INLINE)  # type: ignore[arg-type]
    far = injector.audits["far"]
    assert slow.delay_injected and slow.origin == "emulated" and slow.strr == 1.0 and slow.star == 1.0
    assert far.charged_bytes > 0 and far.injected_ns > 0 and slow.injected_s == pytest.approx(
        sum(a.injected_ns for a in injector.audits.values()) / 1e9)
    fast = run_execute(small_trace[:60], resolved, "all-fastest", CAPS,
                       injector=DelayInjector([t.timing for t in resolved.tiers if t.timing is not None], CAL),
                       **INLINE)  # type: ignore[arg-type]
    assert fast.injected_s == 0.0 and fast.origin == "measured"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"time_scale": 0.0}, "time_scale=0.0 must be positive"),
    ({"epoch_s": 0.0005}, "epoch_s=0.0005 is below 0.001 s of wall time"),
    ({"capacities": {"hbm": 3}}, "capacity given for unknown tier\\(s\\) hbm; tiers: dram, cxl, far"),
    ({"capacities": {"dram": 0}}, "tier dram: capacity 0 blocks must be 1 or more"),
])
def test_bad_settings_are_refused(resolved: ResolvedTierMap, small_trace: list[Request], kwargs: dict[str, object],
                                  message: str) -> None:
    args: dict[str, object] = {"time_scale": 0.1, "epoch_s": EPOCH_S, "capacities": CAPS, **kwargs}
    with pytest.raises(ConfigError, match=message):
        execute(small_trace, resolved, get_policy("lru"), **args)  # type: ignore[arg-type]


def test_file_tiers_are_refused(tmp_path: Path, small_trace: list[Request]) -> None:
    tiers = tmp_path / "t.yaml"
    tiers.write_text(f"name: t\ntiers:\n  - {{name: dram, nodes: [0]}}\n  - {{name: nvme, kind: file, path: "
                     f"{tmp_path}}}\n")
    with pytest.raises(ConfigError, match="tier\\(s\\) nvme are file tiers"):
        execute(small_trace, resolve(load_tier_map(tiers), discover("/")), get_policy("lru"))


# -- the command ------------------------------------------------------------------------------------------------------

# Three tiers on node 0, all real: the command needs no calibration (an emulated tier would measure one first).
NODE0_MAP = "name: node0\ntiers:\n" + "".join(f"  - {{name: {t}, nodes: [0]}}\n" for t in ("dram", "cxl", "far"))


def command(tmp_path: Path, *args: str) -> list[str]:
    tiers = tmp_path / "node0.yaml"
    tiers.write_text(NODE0_MAP)
    return [str(SMALL_TRACE), "--tiers", str(tiers), "--policy", "lru-epoch", "--capacity", "dram=20", "--capacity",
            "cxl=50", "--capacity", "far=200", "--max-requests", "120", "--epoch-ms", "500", *args]


def test_replay_execute_json_has_simulates_figures_measured(tmp_path: Path, small_trace: list[Request]) -> None:
    simulated = CliRunner().invoke(replay, command(tmp_path, "--block-mib", "16", "--json"))
    executed = CliRunner().invoke(replay, command(tmp_path, "--mode", "execute", "--time-scale", "0.02",
                                                  "--epochs-between-requests", "--block-mib", "16", "--json"))
    assert simulated.exit_code == 0 and executed.exit_code == 0, executed.output
    sim, data = json.loads(simulated.output), json.loads(executed.output)
    direct = execute(small_trace[:120], resolve(load_tier_map(tmp_path / "node0.yaml"), discover("/")),
                     get_policy("lru-epoch"), block_layout=scaled_layout(16),
                     capacities={"dram": 20, "cxl": 50, "far": 200},
                     time_scale=0.02, epoch_s=0.5 * 0.02, daemon_thread=False)
    assert data["origin"] == "measured" and sim["origin"] == "simulated" and not data["delay_injected"]
    assert data["backings"] == {"dram": "real", "cxl": "real", "far": "real"}
    assert data["requests"] == sim["requests"] == 120 and data["block_bytes"] == 16 << 10
    assert data["represented_block_bytes"] == sim["block_bytes"] == 16 << 20  # --block-mib 16: 16 KiB in memory
    assert [t["hits"] for t in data["tiers"]] == [t.hits for t in direct.tiers]
    assert (data["hits"], data["evictions"]) == (sim["hits"], sim["evictions"])
    assert [t["capacity_blocks"] for t in data["tiers"]] == [20, 50, 200]
    assert data["epoch_s"] == pytest.approx(0.5 * 0.02) and data["daemon_thread"] is False
    assert data["blocks_corrupted"] == 0 and data["blocks_checked"] > 0 and "ttft_samples_ms" not in data
    assert data["ttft_ms"]["p50"] > 0 and data["migration_bytes"] > 0


def test_replay_execute_prints_measured_figures(tmp_path: Path) -> None:
    out = CliRunner().invoke(replay, command(tmp_path, "--mode", "execute", "--time-scale", "0.02", "--block-mib",
                                             "16"))
    assert out.exit_code == 0, out.output
    for text in ("under lru-epoch (measured)", "TTFT measured p50", "start lag", "in its thread", "corrupted 0",
                 "ping-pongs", "16 KiB standing for 16 MiB", "no delay injected"):
        assert text in out.output


def test_replay_execute_refuses_an_epoch_too_short_for_the_time_scale(tmp_path: Path) -> None:
    out = CliRunner().invoke(replay, command(tmp_path, "--epoch-ms", "50", "--mode", "execute", "--time-scale",
                                             "0.01"))
    assert isinstance(out.exception, ConfigError) and "epoch_s=0.0005 is below" in str(out.exception)


def test_the_commands_execute_defaults_are_the_modules() -> None:
    assert (replay_cli.EXECUTE_TIME_SCALE, replay_cli.EXECUTE_BLOCK_KIB) == (DEFAULT_TIME_SCALE, DEFAULT_BLOCK_KIB)
