"""One arm of an engine replay, run as its own process (`python -m tieremu.engines.arm SPEC.json OUT.json`): vLLM in
process (no engine-core subprocess), the trace's prompts added at their time-scaled arrivals and the engine stepped
between them, every request's first-token and finish times taken as its outputs come back.

A process per arm because vLLM keeps process-wide state (distributed groups, the connector's store) that a second
engine in the same process would inherit; the parent kills the whole process group on error or timeout, so no
engine outlives its run. The result file is written only when the run completes: a partial run leaves none.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ArmSpec:
    model: str
    prompts: list[list[int]]  # token ids per request
    output_tokens: list[int]
    arrivals_s: list[float]  # wall seconds after the start (already time-scaled)
    block_size: int
    max_model_len: int
    connector: dict[str, object] | None  # kv_connector_extra_config; None: no connector
    kv_cache_gib: float = 1.0
    dtype: str = "bfloat16"
    seed: int = 0


@dataclass
class ArmResult:
    ttft_s: list[float]
    finish_s: list[float]
    prompt_tokens: list[int]
    cached_tokens: list[int]  # per request: tokens vLLM did not compute (loaded by the connector)
    output_token_ids: list[list[int]]
    wall_s: float
    construct_s: float
    connector: dict[str, object] | None = None
    kv_placement: dict[str, object] | None = None
    origin: str = "measured"
    tiers: list[dict[str, object]] = field(default_factory=list)
    cached_reported: bool = True  # False: a server that does not report cached tokens (counted as 0)


def run(spec: ArmSpec) -> ArmResult:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv_transfer = None
    if spec.connector is not None:
        kv_transfer = KVTransferConfig(kv_connector="TieredKVConnector",
                                       kv_connector_module_path="tieremu.engines.vllm", kv_role="kv_both",
                                       kv_connector_extra_config=spec.connector)
    t0 = time.monotonic()
    llm = LLM(model=spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len, enforce_eager=True,
              skip_tokenizer_init=True, enable_prefix_caching=False, block_size=spec.block_size,
              kv_transfer_config=kv_transfer, seed=spec.seed)
    construct_s = time.monotonic() - t0
    engine = llm.llm_engine
    n = len(spec.prompts)
    ttft = [float("nan")] * n
    finish = [float("nan")] * n
    cached = [0] * n
    outputs: list[list[int]] = [[] for _ in range(n)]
    start = time.monotonic()
    added = 0
    done = 0
    while done < n:
        now = time.monotonic() - start
        while added < n and spec.arrivals_s[added] <= now:
            params = SamplingParams(temperature=0.0, max_tokens=spec.output_tokens[added],
                                    ignore_eos=True, detokenize=False)
            engine.add_request(str(added), TokensPrompt(prompt_token_ids=spec.prompts[added]), params,
                               arrival_time=time.time())
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.01, spec.arrivals_s[added] - now)))  # idle until the next arrival
            continue
        for out in engine.step():
            i = int(out.request_id)
            stamp = time.monotonic() - start
            if out.outputs and out.outputs[0].token_ids and ttft[i] != ttft[i]:
                ttft[i] = stamp - spec.arrivals_s[i]
                cached[i] = out.num_cached_tokens or 0
            if out.finished:
                outputs[i] = list(out.outputs[0].token_ids)
                finish[i] = stamp - spec.arrivals_s[i]
                done += 1
    wall = time.monotonic() - start
    result = ArmResult(ttft, finish, [len(p) for p in spec.prompts], cached, outputs, wall, construct_s)
    if spec.connector is not None:
        from tieremu.engines import vllm as connector

        shared = connector.current()
        if shared is not None:
            apply_report(result, shared.report(), "in-process: the connector's store in the engine's own process")
    return result


def apply_report(result: ArmResult, report: dict[str, object], source: str) -> None:
    """The connector's figures (tieremu.engines.vllm.Shared.report) on an arm's result, saying where they came
    from."""
    connector = report["connector"]
    assert isinstance(connector, dict)
    result.connector = connector | {"source": source}
    placement = report["kv_placement"]
    result.kv_placement = placement if isinstance(placement, dict) else None
    tiers = report["tiers"]
    assert isinstance(tiers, list)
    result.tiers = tiers
    result.origin = str(report["origin"])


def main(argv: list[str]) -> int:
    from tieremu.engines.procs import die_with_parent

    die_with_parent()  # killed with tieremu even when tieremu itself is killed outright (its group kill never runs)
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = ArmSpec(**json.loads(spec_path.read_text()))
    try:
        result = run(spec)
    except Exception as exc:  # the parent reports it; the traceback went to stderr
        import traceback

        traceback.print_exc()
        print(f"tieremu-engine-error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
