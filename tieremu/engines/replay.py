"""`engine replay`: a Mooncake trace against a real engine (vLLM's CPU build) with tieremu's tiered KV connector,
and, for --check-outputs, the same trace again without it (vLLM's own prefix cache off in both arms).

Three ways to drive the engine, one result shape:

- offline (default): each arm runs vLLM in process in its own process group (tieremu.engines.arm); the parent
  waits with a timeout and kills the whole group on error, timeout or interrupt;
- `serve`: tieremu starts vLLM's OpenAI server (a real server process, tieremu.engines.server) per arm, with the
  connector configured, and streams the trace's requests to it over HTTP (tieremu.engines.drive); the connector's
  figures come from the stats file it writes inside the server; the server is always stopped;
- `server`: a server someone else started (the connector configured in it, or not); its figures are read from the
  stats file it was told to write (`connector_stats`), as the difference between before and after the run.

No engine process outlives the command; a run that fails yields an EngineError, never a partial result.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tieremu.engines.arm import ArmResult, ArmSpec, apply_report
from tieremu.engines.client import ServerError, endpoint, models
from tieremu.engines.drive import delta, drive, read_stats, wait_stats
from tieremu.engines.models import DTYPE_BYTES, model_info, tiny_model
from tieremu.engines.procs import EngineError, kill_group
from tieremu.engines.prompts import EnginePrompt, build_prompts
from tieremu.engines.server import ServerSpec, engine_env, reason, serving, tail
from tieremu.engines.store import check_capacities
from tieremu.errors import ConfigError
from tieremu.processes import terminate_raises
from tieremu.tiers.config import load_tier_map
from tieremu.workloads.simulate import Tail
from tieremu.workloads.trace import MOONCAKE_BLOCK_TOKENS, Request

ENGINES = ("vllm",)
DTYPES = ("float32", "bfloat16")
# float32 by default: on these CPUs vLLM's bf16 linear layers fall back to a slow torch path (measured ~3x slower
# prefill for the tiny model); a real model's own dtype is given with --dtype bfloat16.
DEFAULT_DTYPE = "float32"
DEFAULT_TIME_SCALE = 0.2  # wall seconds per trace second, as execute-mode replay
DEFAULT_TIMEOUT_S = 900.0
DEFAULT_START_TIMEOUT_S = 600.0  # a server's start (60-90 s on two busy cores, more for a real model)
STATS_NAME = "connector-stats.json"

__all__ = ["EngineError", "EngineReplayConfig", "EngineReplayResult", "engine_replay"]


@dataclass(frozen=True)
class EngineReplayConfig:
    trace_requests: Sequence[Request]
    tiers: Path | None  # None only with `server` (a running server's connector has its own tier map)
    policy: str = "lru"
    policy_params: Mapping[str, object] = field(default_factory=dict)
    engine: str = "vllm"
    model: Path | None = None
    kv_tier: str | None = None
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    check_outputs: bool = False
    dtype: str = DEFAULT_DTYPE
    time_scale: float = DEFAULT_TIME_SCALE
    kv_cache_gib: float = 1.0
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_output_tokens: int | None = None  # cap on each request's trace output_length (None: the trace's own)
    serve: bool = False  # start vLLM's OpenAI server and drive it over HTTP (else: the offline in-process engine)
    server: str | None = None  # the URL of a running vLLM OpenAI server to drive instead
    connector_stats: Path | None = None  # with `server`: the stats file its connector writes (stats_file)
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S


@dataclass(frozen=True)
class ArmSummary:
    ttft_ms: Tail
    tpot_ms: Tail
    tokens_per_s: float  # generated tokens over the run's wall time
    wall_s: float
    construct_s: float
    prompt_tokens: int
    computed_prompt_tokens: int  # prompt tokens the engine computed itself (not loaded)


@dataclass(frozen=True)
class RequestOutputs:
    """One request's generated tokens with the connector against without it."""

    request: int  # index in the trace selection
    tokens: int  # generated with the connector
    baseline_tokens: int  # generated without it
    match: bool
    first_divergence: int | None  # index of the first generated token that differs (or where one run stopped); None
    # when the two are identical


@dataclass(frozen=True)
class OutputsCheck:
    """--check-outputs: per request whether the generated tokens match, and from which token they diverge (a
    compressed tier's lossy blocks can change the text from some token on)."""

    identical: int
    diverged: int
    earliest_divergence: int | None  # the smallest first_divergence over the requests; None when all identical
    requests: list[RequestOutputs]


def compare_outputs(with_conn: Sequence[Sequence[int]], without: Sequence[Sequence[int]]) -> OutputsCheck:
    rows = []
    for i, (a, b) in enumerate(zip(with_conn, without, strict=True)):
        first = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        rows.append(RequestOutputs(i, len(a), len(b), first is None, first))
    firsts = [r.first_divergence for r in rows if r.first_divergence is not None]
    return OutputsCheck(len(rows) - len(firsts), len(firsts), min(firsts) if firsts else None, rows)


@dataclass(frozen=True)
class EngineReplayResult:
    engine: str
    driver: str  # offline (in process), serve (a server tieremu started), server (a running server)
    server_url: str | None
    model: str
    requests: int
    block_tokens: int
    dtype: str
    policy: str
    origin: str  # emulated when any tier of the store is emulated
    tiers: list[dict[str, object]]
    ttft_ms: Tail
    tpot_ms: Tail
    tokens_per_s: float
    computed_prompt_tokens: int
    loaded_tokens: int
    connector: dict[str, object]
    kv_placement: dict[str, object] | None
    without_connector: ArmSummary | None = None
    computed_drop_equals_loaded: bool | None = None
    outputs_match: bool | None = None
    mismatched_requests: list[int] = field(default_factory=list)
    outputs_check: OutputsCheck | None = None  # per request match and first divergence (--check-outputs)
    compressed_tiers: list[str] = field(default_factory=list)  # the store's lossy tiers: outputs may then differ
    notes: list[str] = field(default_factory=list)
    ttft_samples_ms: list[float] = field(default_factory=list)  # per request, in trace order
    tpot_samples_ms: list[float] = field(default_factory=list)  # per request with 2+ output tokens

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def engine_replay(config: EngineReplayConfig) -> EngineReplayResult:
    _check_options(config)
    if config.server is not None:
        return _replay_running_server(config)
    assert config.tiers is not None
    tier_map = load_tier_map(config.tiers)  # a bad map is reported before any engine starts
    # A directory that is not a model is reported before anything else is needed.
    given = model_info(config.model) if config.model is not None else None
    if importlib.util.find_spec(config.engine) is None:
        raise EngineError(f"--engine {config.engine}: it is not installed in this environment ({sys.executable}); "
                          "run scripts/setup-vllm.sh")
    model = given if given is not None else model_info(tiny_model())
    block_bytes = model.kv_bytes_per_token(DTYPE_BYTES[config.dtype]) * config.block_tokens
    check_capacities(tier_map, block_bytes, config.block_tokens)
    prompts = build_prompts(config.trace_requests, config.block_tokens, model.vocab_size,
                            max_tokens=model.max_positions)
    longest = max(len(p.token_ids) + p.output_tokens for p in prompts)
    base = dict(model=str(model.path), prompts=[list(p.token_ids) for p in prompts],
                output_tokens=_outputs(config, prompts), arrivals_s=_arrivals(config, prompts),
                block_size=config.block_tokens, max_model_len=-(-longest // config.block_tokens) * config.block_tokens,
                kv_cache_gib=config.kv_cache_gib, dtype=config.dtype)
    connector = {"tiers": str(config.tiers.resolve()), "policy": config.policy,
                 "policy_params": dict(config.policy_params), "kv_tier": config.kv_tier}
    run = serve_arm if config.serve else run_arm
    with_conn = run(ArmSpec(**base, connector=connector), config)
    without = run(ArmSpec(**base, connector=None), config) if config.check_outputs else None
    return _result(config, str(model.path), with_conn, without)


def _check_options(config: EngineReplayConfig) -> None:
    if config.engine not in ENGINES:
        raise ConfigError(f"--engine {config.engine!r}: valid engines: {', '.join(ENGINES)}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype {config.dtype!r}: valid: {', '.join(DTYPES)}")
    if config.max_output_tokens is not None and config.max_output_tokens < 1:
        raise ConfigError(f"--max-output-tokens {config.max_output_tokens}: give 1 or more")
    if not config.trace_requests:
        raise ConfigError("the trace selection holds no requests (check --max-requests)")
    if config.server is not None:
        if config.serve:
            raise ConfigError("--serve starts a server and --server drives a running one: give one of them")
        given = [name for name, value in (("--tiers", config.tiers), ("--kv-tier", config.kv_tier)) if value]
        if config.check_outputs:
            given.append("--check-outputs")
        if given:
            raise ConfigError(f"{', '.join(given)}: a running server's engine and connector were configured when "
                              "it started (its --kv-transfer-config); leave them out, or let tieremu start the "
                              "server with --serve")
        endpoint(config.server)  # a malformed URL is reported before anything else
    else:
        if config.tiers is None:
            raise ConfigError("--tiers is needed: the tier map of the connector's store")
        if config.connector_stats is not None:
            raise ConfigError("--connector-stats reads a running server's connector figures; it goes with --server")


def _outputs(config: EngineReplayConfig, prompts: Sequence[EnginePrompt]) -> list[int]:
    return [p.output_tokens if config.max_output_tokens is None else min(p.output_tokens, config.max_output_tokens)
            for p in prompts]


def _arrivals(config: EngineReplayConfig, prompts: Sequence[EnginePrompt]) -> list[float]:
    start = prompts[0].arrival_s
    return [(p.arrival_s - start) * config.time_scale for p in prompts]


def run_arm(spec: ArmSpec, config: EngineReplayConfig) -> ArmResult:
    """One offline arm in its own process group; EngineError with the engine's last words if it fails or times
    out."""
    timeout_s = config.timeout_s
    with tempfile.TemporaryDirectory(prefix="tieremu-engine-") as tmp:
        spec_path, out_path, log_path = Path(tmp, "spec.json"), Path(tmp, "result.json"), Path(tmp, "engine.log")
        spec_path.write_text(json.dumps(asdict(spec)))
        with terminate_raises(), log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tieremu.engines.arm", str(spec_path), str(out_path)],
                                    stdout=log, stderr=subprocess.STDOUT, env=engine_env(spec.kv_cache_gib),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                raise EngineError(f"the engine did not finish within {timeout_s:g} s; it was stopped. "
                                  f"Last lines:\n{tail(log_path)}") from None
            finally:
                kill_group(proc)  # anything the engine left running in its group goes with it
        if rc != 0 or not out_path.exists():
            raise EngineError(f"the engine failed (exit {rc}): {reason(log_path)}\nLast lines:\n{tail(log_path)}")
        data = json.loads(out_path.read_text())
    return ArmResult(**data)


def serve_arm(spec: ArmSpec, config: EngineReplayConfig) -> ArmResult:
    """One arm on vLLM's OpenAI server, started here for it and stopped after it (or on any error)."""
    with tempfile.TemporaryDirectory(prefix="tieremu-server-") as tmp:
        rundir = Path(tmp)
        stats = rundir / STATS_NAME
        connector = None if spec.connector is None else spec.connector | {"stats_file": str(stats)}
        server = ServerSpec(model=spec.model, block_size=spec.block_size, max_model_len=spec.max_model_len,
                            dtype=spec.dtype, kv_cache_gib=spec.kv_cache_gib, connector=connector, seed=spec.seed)
        with serving(server, rundir, config.start_timeout_s) as running:
            arm = drive(running.endpoint, running.model.name, spec.prompts, spec.output_tokens, spec.arrivals_s,
                        config.timeout_s, construct_s=running.ready_s)
            if connector is not None:
                report = wait_stats(stats, len(spec.prompts))
                apply_report(arm, report, f"stats file written by the connector inside the vLLM server's engine-core "
                                          f"process (pid {report.get('pid')}) after each finished request")
    return arm


def _replay_running_server(config: EngineReplayConfig) -> EngineReplayResult:
    """The trace against a server someone else started: its model from /v1/models (or --model), its connector's
    figures (if any) from its stats file, as this run's difference."""
    assert config.server is not None
    ep = endpoint(config.server)
    try:
        served = models(ep)[0]
    except ServerError as exc:
        raise EngineError(f"--server {config.server}: {exc}") from None
    if config.model is not None:
        model = model_info(config.model)
    elif Path(served.root).is_dir():
        model = model_info(served.root)
    else:
        raise ConfigError(f"--server {config.server} serves {served.root!r}, which is not a directory here; give "
                          "--model DIR, the model's directory (its config.json gives the vocabulary for prompts)")
    prompts = build_prompts(config.trace_requests, config.block_tokens, model.vocab_size,
                            max_tokens=served.max_model_len or model.max_positions)
    before = read_stats(config.connector_stats) if config.connector_stats is not None else None
    arm = drive(ep, served.name, [list(p.token_ids) for p in prompts], _outputs(config, prompts),
                _arrivals(config, prompts), config.timeout_s)
    if before is not None and config.connector_stats is not None:
        done = before["finished_requests"]
        assert isinstance(done, int)
        after = wait_stats(config.connector_stats, done + len(prompts))
        report = dict(after, connector=delta(after["connector"], before["connector"]))
        apply_report(arm, report, f"stats file {config.connector_stats} written by the connector inside the running "
                                  f"server (pid {after.get('pid')}); counters are this run's (after minus before), "
                                  "resident_by_tier and kv_placement as at the end")
        kv = arm.kv_placement
        if isinstance(kv, dict) and isinstance(before.get("kv_placement"), dict):
            old = before["kv_placement"].get("attention_reads")
            if isinstance(kv.get("attention_reads"), dict) and isinstance(old, dict):
                kv["attention_reads"] = delta(kv["attention_reads"], old, keep=("model", "origin", "tier"))
    else:
        arm.origin = "unknown"
        arm.connector = {"source": "none: give --connector-stats FILE, the stats_file of the server's connector "
                                   "(kv_connector_extra_config), for its figures"}
    return _result(config, str(model.path), arm, None)


def ttft_samples(arm: ArmResult) -> list[float]:
    return [t * 1e3 for t in arm.ttft_s]


def tpot_samples(arm: ArmResult) -> list[float]:
    """Per request with two or more output tokens: the time from its first token to its last over the tokens
    after the first (ms)."""
    return [(finish - ttft) / (len(out) - 1) * 1e3
            for ttft, finish, out in zip(arm.ttft_s, arm.finish_s, arm.output_token_ids, strict=True) if len(out) > 1]


def _summary(arm: ArmResult) -> ArmSummary:
    generated = sum(len(o) for o in arm.output_token_ids)
    computed = sum(p - c for p, c in zip(arm.prompt_tokens, arm.cached_tokens, strict=True))
    return ArmSummary(Tail.of(ttft_samples(arm)), Tail.of(tpot_samples(arm)),
                      generated / arm.wall_s if arm.wall_s > 0 else math.nan, arm.wall_s, arm.construct_s,
                      sum(arm.prompt_tokens), computed)


def _result(config: EngineReplayConfig, model: str, arm: ArmResult,
            without: ArmResult | None) -> EngineReplayResult:
    summary = _summary(arm)
    stats = arm.connector or {}
    # The engine's block size, as the connector saw it (a running server's may differ from --block-tokens).
    block_tokens = int(stats.get("block_tokens", config.block_tokens))
    loaded_tokens = int(stats.get("loaded_blocks", 0)) * block_tokens
    notes = []
    driver = "server" if config.server is not None else "serve" if config.serve else "offline"
    if driver != "offline":
        notes.append("TTFT and TPOT measured by the client from the streamed HTTP responses (first event carrying "
                     "a token, then the last), the server's HTTP and streaming included")
    if not arm.cached_reported:
        notes.append("the server does not report cached tokens (start it with --enable-prompt-tokens-details): "
                     "computed_prompt_tokens counts every prompt token")
    base = _summary(without) if without is not None else None
    drop_ok = match = None
    mismatched: list[int] = []
    check = None
    compression = stats.get("compression")
    compressed = [str(t) for t in compression] if isinstance(compression, dict) else []
    if base is not None and without is not None:
        drop_ok = base.computed_prompt_tokens - summary.computed_prompt_tokens == loaded_tokens
        check = compare_outputs(arm.output_token_ids, without.output_token_ids)
        mismatched = [r.request for r in check.requests if not r.match]
        match = not mismatched
        if compressed:
            notes.append(f"compressed tier(s) {', '.join(compressed)}: outputs identical for "
                         f"{check.identical} of {len(check.requests)} requests"
                         + (f", the earliest divergence at generated token {check.earliest_divergence}"
                            if check.diverged else ""))
        faster = summary.ttft_ms.p50 < base.ttft_ms.p50
        # Which arm won is stated, with the connector's own load time beside it: when requests queue (arrivals faster
        # than the engine), TTFT is mostly waiting, and the difference says little about loading vs recomputing.
        notes.append(f"TTFT p50 {summary.ttft_ms.p50:.1f} ms with the connector, {base.ttft_ms.p50:.1f} ms without: "
                     f"{'lower' if faster else 'higher'} with the connector; its loads took "
                     f"{float(stats.get('load_s', 0.0)) * 1e3:.1f} ms and its saves "
                     f"{float(stats.get('save_s', 0.0)) * 1e3:.1f} ms in all")
    if stats.get("loaded_blocks") == 0:
        notes.append("no block was loaded: the trace selection shares no prefix block between requests")
    if arm.kv_placement and arm.kv_placement.get("note"):
        notes.append(str(arm.kv_placement["note"]))
    policy = str(stats.get("policy", config.policy)) if config.server is not None else config.policy
    return EngineReplayResult(
        engine=config.engine, driver=driver, server_url=config.server, model=model, requests=len(arm.prompt_tokens),
        block_tokens=block_tokens, dtype=config.dtype, policy=policy, origin=arm.origin, tiers=arm.tiers,
        ttft_ms=summary.ttft_ms, tpot_ms=summary.tpot_ms, tokens_per_s=summary.tokens_per_s,
        computed_prompt_tokens=summary.computed_prompt_tokens, loaded_tokens=loaded_tokens,
        connector=stats, kv_placement=arm.kv_placement, without_connector=base, computed_drop_equals_loaded=drop_ok,
        outputs_match=match, mismatched_requests=mismatched, outputs_check=check, compressed_tiers=compressed,
        notes=notes, ttft_samples_ms=ttft_samples(arm), tpot_samples_ms=tpot_samples(arm))
