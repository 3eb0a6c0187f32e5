"""`engine replay`: a Mooncake trace against a real engine (vLLM's CPU build) with tieremu's tiered KV connector,
and, for --check-outputs, the same trace again without it (vLLM's own prefix cache off in both arms).

Each arm runs in its own process group (tieremu.engines.arm); the parent waits with a timeout and kills the whole
group on error, timeout or interrupt, so no engine process outlives the command. A run that fails yields an
EngineError, never a partial result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tieremu.engines.arm import ArmResult, ArmSpec
from tieremu.engines.models import DTYPE_BYTES, ModelInfo, model_info, tiny_model
from tieremu.engines.prompts import build_prompts
from tieremu.engines.store import check_capacities
from tieremu.errors import ConfigError, TieremuError
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


class EngineError(TieremuError):
    """The engine could not start or failed during the run; the message carries its last words."""


@dataclass(frozen=True)
class EngineReplayConfig:
    trace_requests: Sequence[Request]
    tiers: Path
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
class EngineReplayResult:
    engine: str
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
    notes: list[str] = field(default_factory=list)
    ttft_samples_ms: list[float] = field(default_factory=list)  # per request, in trace order
    tpot_samples_ms: list[float] = field(default_factory=list)  # per request with 2+ output tokens

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def engine_replay(config: EngineReplayConfig) -> EngineReplayResult:
    if config.engine not in ENGINES:
        raise ConfigError(f"--engine {config.engine!r}: valid engines: {', '.join(ENGINES)}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype {config.dtype!r}: valid: {', '.join(DTYPES)}")
    if config.max_output_tokens is not None and config.max_output_tokens < 1:
        raise ConfigError(f"--max-output-tokens {config.max_output_tokens}: give 1 or more")
    if not config.trace_requests:
        raise ConfigError("the trace selection holds no requests (check --max-requests)")
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
    start = prompts[0].arrival_s
    base = dict(model=str(model.path), prompts=[list(p.token_ids) for p in prompts],
                output_tokens=[p.output_tokens if config.max_output_tokens is None
                               else min(p.output_tokens, config.max_output_tokens) for p in prompts],
                arrivals_s=[(p.arrival_s - start) * config.time_scale for p in prompts],
                block_size=config.block_tokens, max_model_len=-(-longest // config.block_tokens) * config.block_tokens,
                kv_cache_gib=config.kv_cache_gib, dtype=config.dtype)
    connector = {"tiers": str(config.tiers.resolve()), "policy": config.policy,
                 "policy_params": dict(config.policy_params), "kv_tier": config.kv_tier}
    with_conn = run_arm(ArmSpec(**base, connector=connector), config.timeout_s)
    without = run_arm(ArmSpec(**base, connector=None), config.timeout_s) if config.check_outputs else None
    return _result(config, model, with_conn, without)


def run_arm(spec: ArmSpec, timeout_s: float) -> ArmResult:
    """One arm in its own process group; EngineError with the engine's last words if it fails or times out."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1",
               VLLM_CPU_KVCACHE_SPACE=f"{spec.kv_cache_gib:g}")
    with tempfile.TemporaryDirectory(prefix="tieremu-engine-") as tmp:
        spec_path, out_path, log_path = Path(tmp, "spec.json"), Path(tmp, "result.json"), Path(tmp, "engine.log")
        spec_path.write_text(json.dumps(asdict(spec)))
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tieremu.engines.arm", str(spec_path), str(out_path)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise EngineError(f"the engine did not finish within {timeout_s:g} s; it was stopped. "
                                  f"Last lines:\n{_tail(log_path)}") from None
            except BaseException:
                _kill_group(proc)
                raise
            finally:
                _kill_group(proc)  # anything the engine left running in its group goes with it
        if rc != 0 or not out_path.exists():
            raise EngineError(f"the engine failed (exit {rc}): {_reason(log_path)}\nLast lines:\n{_tail(log_path)}")
        data = json.loads(out_path.read_text())
    return ArmResult(**data)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _reason(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("tieremu-engine-error: "):
            return line.removeprefix("tieremu-engine-error: ")
    return "no error message (killed by a signal, or out of memory?)"


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


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


def _result(config: EngineReplayConfig, model: ModelInfo, arm: ArmResult,
            without: ArmResult | None) -> EngineReplayResult:
    summary = _summary(arm)
    stats = arm.connector or {}
    loaded_tokens = int(stats.get("loaded_blocks", 0)) * config.block_tokens
    notes = []
    base = _summary(without) if without is not None else None
    drop_ok = match = None
    mismatched: list[int] = []
    if base is not None and without is not None:
        drop_ok = base.computed_prompt_tokens - summary.computed_prompt_tokens == loaded_tokens
        mismatched = [i for i, (a, b) in enumerate(zip(arm.output_token_ids, without.output_token_ids, strict=True))
                      if a != b]
        match = not mismatched
        faster = summary.ttft_ms.p50 < base.ttft_ms.p50
        # Which arm won is stated, with the connector's own load time beside it: when requests queue (arrivals faster
        # than the engine), TTFT is mostly waiting, and the difference says little about loading vs recomputing.
        notes.append(f"TTFT p50 {summary.ttft_ms.p50:.1f} ms with the connector, {base.ttft_ms.p50:.1f} ms without: "
                     f"{'lower' if faster else 'higher'} with the connector; its loads took "
                     f"{float(stats.get('load_s', 0.0)) * 1e3:.1f} ms and its saves "
                     f"{float(stats.get('save_s', 0.0)) * 1e3:.1f} ms in all")
    if loaded_tokens == 0:
        notes.append("no block was loaded: the trace selection shares no prefix block between requests")
    if arm.kv_placement and arm.kv_placement.get("note"):
        notes.append(str(arm.kv_placement["note"]))
    return EngineReplayResult(
        engine=config.engine, model=str(model.path), requests=len(arm.prompt_tokens), block_tokens=config.block_tokens,
        dtype=config.dtype, policy=config.policy, origin=arm.origin, tiers=arm.tiers, ttft_ms=summary.ttft_ms,
        tpot_ms=summary.tpot_ms, tokens_per_s=summary.tokens_per_s,
        computed_prompt_tokens=summary.computed_prompt_tokens, loaded_tokens=loaded_tokens,
        connector=stats, kv_placement=arm.kv_placement, without_connector=base, computed_drop_equals_loaded=drop_ok,
        outputs_match=match, mismatched_requests=mismatched, notes=notes, ttft_samples_ms=ttft_samples(arm),
        tpot_samples_ms=tpot_samples(arm))
