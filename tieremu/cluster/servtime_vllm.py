"""The serving-time fit's vLLM side: timed engine steps of vLLM's CPU build serving tieremu's tiny Llama.

vLLM runs in its own process (`python -m tieremu.cluster.servtime_vllm OUT.json REPEATS`, in-process engine core,
one OpenMP thread, as the engine replay runs it): a process-wide engine must not outlive the measurement, and the
parent kills the whole process group on error or timeout. Samples, each the median of `repeats` timings:
- prefill: one request of L prompt tokens (L within the token budget: one step), its first step;
- decode: B requests of C prompt tokens each, prefilled, then their decode steps (one token each per step),
  the step's KV bytes counted from the context at that step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tieremu.cluster.servtime import Sample, ServingTimeModel, fit
from tieremu.errors import WorkloadError

PROMPTS = (64, 256, 1024, 2048)
BATCHES = (1, 4, 8, 16)
CONTEXT = 256
DECODE_STEPS = 8


def _measure(repeats: int) -> tuple[list[Sample], int]:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tieremu.engines.models import model_info, tiny_model

    path = tiny_model()
    info = model_info(path)
    per_token = info.kv_bytes_per_token(2)
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=4096, enforce_eager=True, skip_tokenizer_init=True,
              enable_prefix_caching=False, max_num_batched_tokens=4096, seed=0)
    engine = llm.llm_engine
    rng = random.Random(0)
    counter = iter(range(10**9))

    def add(tokens: int, out: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True, detokenize=False)
        prompt = [rng.randrange(info.vocab_size) for _ in range(tokens)]
        engine.add_request(str(next(counter)), TokensPrompt(prompt_token_ids=prompt), params)

    def timed_step() -> float:
        t0 = time.perf_counter()
        engine.step()
        return time.perf_counter() - t0

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    prefill: dict[int, list[float]] = {n: [] for n in PROMPTS}
    decode: dict[int, list[float]] = {b: [] for b in BATCHES}
    for repeat in range(repeats + 1):  # the first round warms up
        for n in PROMPTS:
            add(n, 1)
            seconds = timed_step()
            drain()
            if repeat:
                prefill[n].append(seconds)
        for b in BATCHES:
            for _ in range(b):
                add(CONTEXT, DECODE_STEPS + 1)
            engine.step()  # the batch's prefill (b * CONTEXT tokens, within the budget)
            steps = [timed_step() for _ in range(DECODE_STEPS)]
            drain()
            if repeat:
                decode[b].append(statistics.median(steps))
    samples = [Sample(n, 0, 0, statistics.median(t)) for n, t in prefill.items()]
    mid = CONTEXT + 1 + DECODE_STEPS // 2  # the median step's context
    samples += [Sample(0, b, b * mid * per_token, statistics.median(t)) for b, t in decode.items()]
    return samples, per_token


def measure_and_fit_vllm(repeats: int = 3, timeout_s: float = 600.0) -> ServingTimeModel:
    """Run the measurement in its own process group and fit it."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    with tempfile.TemporaryDirectory(prefix="tieremu-servtime-") as tmp:
        out, log = Path(tmp, "samples.json"), Path(tmp, "vllm.log")
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "tieremu.cluster.servtime_vllm", str(out), str(repeats)],
                                    stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if rc != 0 or not out.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            why = f"did not finish within {timeout_s:g} s" if rc is None else f"failed (exit {rc})"
            raise WorkloadError(f"the vLLM timing run {why}. Last lines:\n{tail}")
        data = json.loads(out.read_text())
    samples = [Sample(**s) for s in data["samples"]]
    return fit(samples, name="vllm-cpu-tiny", kv_bytes_per_token=data["kv_bytes_per_token"],
               source=f"measured: vLLM's CPU build serving tieremu's tiny Llama (bf16, one thread), medians of "
                      f"{repeats} timings of {len(samples)} engine-step shapes on this machine (shared vCPUs: noisy)")


def main(argv: list[str]) -> int:
    out, repeats = Path(argv[0]), int(argv[1])
    samples, per_token = _measure(repeats)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"samples": [asdict(s) for s in samples], "kv_bytes_per_token": per_token}))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
