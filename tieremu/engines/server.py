"""vLLM's OpenAI server started by tieremu (`engine replay --serve`): a real server process, reached over HTTP.

The server is `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` script fails on this package's name),
in-process executor and one OMP thread as the offline arm, tieremu's connector configured through
--kv-transfer-config (kv_connector_module_path) with a stats file in the run's folder. It runs in its own process
group, led by a guard (tieremu.engines.guard, with PR_SET_PDEATHSIG) that kills the group if tieremu dies outright,
and `serving()` kills the whole group when the block ends however it ends (return, error, Ctrl-C, SIGTERM), so no
server process outlives the command. Readiness is the model list answering; a server that exits or does not answer
in time is an EngineError with its last log lines.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tieremu.engines.client import Endpoint, ServedModel, ServerError, models
from tieremu.engines.procs import EngineError, kill_group
from tieremu.processes import terminate_raises

SERVED_NAME = "tieremu-engine"
ENTRY = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class ServerSpec:
    model: str
    block_size: int
    max_model_len: int
    dtype: str
    kv_cache_gib: float
    connector: dict[str, object] | None  # kv_connector_extra_config; None: no connector
    seed: int = 0


@dataclass(frozen=True)
class RunningServer:
    endpoint: Endpoint
    model: ServedModel
    pid: int
    ready_s: float  # from spawn to answering
    log: Path


def server_argv(spec: ServerSpec, port: int) -> list[str]:
    argv = [sys.executable, "-m", ENTRY, "--model", spec.model, "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", spec.dtype,
            "--max-model-len", str(spec.max_model_len), "--block-size", str(spec.block_size),
            "--enforce-eager", "--skip-tokenizer-init", "--no-enable-prefix-caching",
            "--enable-prompt-tokens-details", "--seed", str(spec.seed), "--disable-uvicorn-access-log",
            "--uvicorn-log-level", "warning"]
    if spec.connector is not None:
        argv += ["--kv-transfer-config", json.dumps({
            "kv_connector": "TieredKVConnector", "kv_connector_module_path": "tieremu.engines.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": spec.connector})]
    return argv


def engine_env(kv_cache_gib: float) -> dict[str, str]:
    """The engine's environment: scheduler and worker in one process (the connector's store is shared between
    them), one OMP thread (two busy cores here), the KV cache size."""
    return dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1",
                VLLM_CPU_KVCACHE_SPACE=f"{kv_cache_gib:g}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(spec: ServerSpec, rundir: Path, start_timeout_s: float) -> Iterator[RunningServer]:
    """A server for the block; killed with its whole process group when the block ends."""
    port = free_port()
    log_path = rundir / "server.log"
    t0 = time.monotonic()
    with terminate_raises(), log_path.open("w") as log:
        # The guard (tieremu.engines.guard) leads the server's process group and kills it when the pipe's write end,
        # held only here, closes: when this process exits, however it exits.
        lifeline_r, lifeline_w = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "tieremu.engines.guard", *server_argv(spec, port)],
                                    stdin=lifeline_r, stdout=log, stderr=subprocess.STDOUT,
                                    env=engine_env(spec.kv_cache_gib), cwd=rundir, start_new_session=True)
        except BaseException:
            os.close(lifeline_w)
            raise
        finally:
            os.close(lifeline_r)
        try:
            ep = Endpoint("http", "127.0.0.1", port, "")
            model = _wait_ready(proc, ep, log_path, t0 + start_timeout_s, start_timeout_s)
            yield RunningServer(ep, model, proc.pid, time.monotonic() - t0, log_path)
        finally:
            kill_group(proc)
            os.close(lifeline_w)


def _wait_ready(proc: subprocess.Popen[bytes], ep: Endpoint, log: Path, deadline: float,
                timeout_s: float) -> ServedModel:
    while True:
        rc = proc.poll()
        if rc is not None:
            raise EngineError(f"the vLLM server exited (code {rc}) before it answered: {reason(log)}\n"
                              f"Last lines:\n{tail(log)}")
        try:
            return models(ep, timeout_s=5.0)[0]
        except ServerError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise EngineError(f"the vLLM server did not answer on {ep.url} within {timeout_s:g} s; it was stopped. "
                              f"Last lines:\n{tail(log)}")
        time.sleep(0.5)  # polling for readiness: the server starts in tens of seconds


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b[^:]*:")


def reason(log: Path) -> str:
    """The engine's own last error line (ours, or the Python exception in its log; when that one only points at a
    root cause logged above it, as vLLM's "Engine core initialization failed" does, the first one as well)."""
    lines = log.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if "tieremu-engine-error: " in line:
            return line.split("tieremu-engine-error: ", 1)[1]
    errors = [text for text in (line.split("] ", 1)[-1].strip() for line in lines) if _ERROR_LINE.match(text)]
    if not errors:
        return "no error message (killed by a signal, or out of memory?)"
    if len(errors) > 1 and "root cause" in errors[-1]:
        return f"{errors[0]} (then: {errors[-1]})"
    return errors[-1]


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
