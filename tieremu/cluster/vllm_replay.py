"""Cluster replay on real vLLM engines (`tieremu cluster replay --engine vllm`): N instance processes
(tieremu.cluster.vllm_instance), each vLLM's CPU build in process with tieremu's tiered KV connector, sharing KV
blocks peer to peer through the connector's peer source: the peer index (broadcast or hash) and the block transport
over loopback TCP, the link's latency and bandwidth paid by the transport.

The process handling, routing (round-robin), dispatch in real time and the result are tieremu.cluster.replay's
(`Cluster`, `_result`); what differs is the process each instance runs, its settings (the model, the connector's
tier map, the engine's block size) and its start-up time (an engine takes tens of seconds to build here). Each
instance's stderr (vLLM's log) goes to a file whose last lines an error quotes; every instance's process group is
killed on the way out, on success, error or Ctrl-C (the instances also die with this process: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from tieremu.cluster.replay import Checked, Cluster, ClusterSpec, Proc, _result, check
from tieremu.cluster.result import ClusterResult
from tieremu.engines.models import DTYPE_BYTES, model_info, tiny_model
from tieremu.engines.procs import EngineError, kill_group
from tieremu.engines.prompts import build_prompts
from tieremu.engines.server import engine_env, reason, tail
from tieremu.engines.store import check_capacities
from tieremu.errors import ConfigError
from tieremu.kv.cache import MIB
from tieremu.processes import terminate_raises
from tieremu.tiers.config import load_tier_map

ENGINES = ("tieremu", "vllm")
DTYPES = ("float32", "bfloat16")
START_TIMEOUT_S = 600.0  # building N engines at once on a few busy cores


@dataclass(frozen=True)
class VllmOptions:
    """What a vLLM cluster needs beyond ClusterSpec."""

    model: Path | None = None  # None: the tiny Llama built here (tieremu.engines.models)
    block_tokens: int = 64  # tokens per hash id and per vLLM KV block
    dtype: str = "float32"  # float32: vLLM's bf16 linear layers are slow on these CPUs (tieremu.engines.replay)
    max_output_tokens: int | None = 16  # cap on each request's output (None: the trace's own)
    kv_cache_gib: float = 1.0  # vLLM's own KV cache per instance
    start_timeout_s: float = START_TIMEOUT_S


@dataclass(frozen=True)
class VllmClusterResult:
    """A ClusterResult (the same keys as the tieremu-engine replay) and what only real engines have: each
    request's generated tokens and the tokens vLLM did not compute, each instance's build time and connector."""

    cluster: ClusterResult
    model: str
    block_tokens: int
    outputs: dict[int, list[int]]  # request index -> generated token ids (greedy)
    cached_tokens: dict[int, int]  # request index -> prompt tokens loaded by the connector (not computed)
    instances: list[dict[str, Any]]  # per instance: construct_s, the connector's store counters
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc = self.cluster.to_json()
        doc["notes"] = list(doc["notes"]) + list(self.notes)
        return {"engine": "vllm", **doc, "vllm": {
            "model": self.model, "block_tokens": self.block_tokens,
            "outputs": {str(i): t for i, t in sorted(self.outputs.items())},
            "cached_tokens": {str(i): n for i, n in sorted(self.cached_tokens.items())},
            "instances": self.instances}}


def check_vllm(spec: ClusterSpec, opts: VllmOptions) -> Checked:
    """ClusterSpec's checks, and what vLLM instances refuse, before any process exists."""
    if spec.pd is not None:
        raise ConfigError(f"--pd {spec.pd[0]}:{spec.pd[1]} with --engine vllm: prefill/decode instances are "
                          "tieremu's own (--engine tieremu)")
    if spec.faults:
        raise ConfigError("--fault with --engine vllm: fault injection is built for tieremu's own instances only")
    if spec.transport != "tcp":
        raise ConfigError(f"--transport {spec.transport} with --engine vllm: vLLM instances pull over tcp only")
    if spec.namespaces:
        raise ConfigError("--namespaces with --engine vllm: vLLM instances run on loopback (the link's latency and "
                          "bandwidth paid by the transport); use --no-namespaces")
    if spec.sharing == "p2p" and spec.pull != "always":
        raise ConfigError(f"--pull {spec.pull} with --engine vllm: vLLM instances pull whenever a peer holds a "
                          "block (no pull-or-recompute estimate of vLLM's prefill); give --pull always")
    if opts.dtype not in DTYPES:
        raise ConfigError(f"--dtype {opts.dtype!r}: valid: {', '.join(DTYPES)}")
    if opts.block_tokens < 1 or opts.block_tokens % 16:
        raise ConfigError(f"--block-tokens {opts.block_tokens}: give a positive multiple of 16 (vLLM's CPU block "
                          "sizes)")
    if opts.max_output_tokens is not None and opts.max_output_tokens < 1:
        raise ConfigError(f"--max-output-tokens {opts.max_output_tokens}: give 1 or more")
    return check(replace(spec, namespaces=False))


def local_tier_file(tiers: Path, capacity_blocks: int, block_bytes: int, out: Path) -> Path:
    """The connector's tier map: `tiers` without its peer tier(s), each tier lacking capacity_mib given room for
    capacity_blocks blocks (the --capacity-blocks of tieremu's instances), written to `out` (a file tier's relative
    path made absolute)."""
    doc = yaml.safe_load(tiers.read_text())
    local = []
    for tier in doc["tiers"]:
        if tier.get("kind") == "peer":
            continue
        tier = dict(tier)
        tier.setdefault("capacity_mib", max(1, -(-capacity_blocks * block_bytes // MIB)))
        if "path" in tier:  # a file tier's directory, relative to the map it was given in
            tier["path"] = str((tiers.resolve().parent / str(tier["path"])).resolve())
        local.append(tier)
    doc["tiers"] = local
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class VllmCluster(Cluster):
    """tieremu.cluster.replay's Cluster with vLLM instance processes."""

    def __init__(self, c: Checked, base: dict[str, Any], rundir: Path, opts: VllmOptions) -> None:
        super().__init__(c)
        self.base, self.rundir, self.opts = base, rundir, opts
        self.logs: dict[int, Path] = {}
        self._files: list[Any] = []

    def settings(self, i: int, incarnation: int) -> dict[str, Any]:
        peers = {j: {"host": "127.0.0.1", **self.ports_of(j)} for j in range(self.n) if j != i}
        return {**self.base, "me": i, "incarnation": incarnation, "sharing": self.spec.sharing,
                "index": self.spec.index, "link": self.c.link.to_json(), "pace": True, "peers": peers,
                "peer_hosts": ["127.0.0.1"], "mine": self.ports_of(i), "bind": "127.0.0.1",
                "lease_s": self.spec.lease_s, "time_scale": self.spec.time_scale}

    def spawn(self, i: int, incarnation: int) -> Proc:
        env = engine_env(self.opts.kv_cache_gib) | {"PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
        log_path = self.logs[i] = self.rundir / f"instance-{i}.log"
        log = log_path.open("w")
        self._files.append(log)
        popen = subprocess.Popen([sys.executable, "-m", "tieremu.cluster.vllm_instance"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
        proc = self.procs[i] = Proc(i, popen, incarnation)  # recorded at once: stop() kills what it knows
        self._write(proc, self.settings(i, incarnation))
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def start(self) -> None:
        for i in range(self.n):
            self.spawn(i, 0)
        deadline = time.time() + self.opts.start_timeout_s
        # Until every engine is ready, or one has died (its error is the run's: the others are killed).
        self.pump(until=deadline, want=lambda: all(p.ready for p in self.procs.values())
                  or any(not p.alive for p in self.procs.values()))
        for proc in sorted(self.procs.values(), key=lambda p: p.alive):  # a dead one first: its log says why
            if not proc.ready:
                if not proc.alive:  # its stdout closed: it is exiting
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.popen.wait(timeout=5)
                what = (f"exited ({proc.popen.returncode})" if proc.popen.returncode is not None
                        else f"was not ready within {self.opts.start_timeout_s:g} s")
                log = self.logs[proc.me]
                raise EngineError(f"vLLM instance {proc.me} {what}: {reason(log)}\nLast lines of {log.name}:\n"
                                  f"{tail(log)}")
        self.t0 = time.time() + 0.2
        for proc in self.procs.values():
            self._write(proc, {"op": "start", "t0_wall": self.t0, "trace0_s": self.trace0})

    def stop(self) -> None:
        """Every instance's process group gone (not merely signalled) when this returns: those that reported get a
        moment to exit by themselves, then each group is killed and waited for (tieremu.engines.procs)."""
        deadline = time.time() + 5
        for proc in self.procs.values():
            if proc.result is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=max(0.0, deadline - time.time()))
        for proc in self.procs.values():
            kill_group(proc.popen)

    def close_logs(self) -> None:
        for f in self._files:
            f.close()


def vllm_cluster_replay(spec: ClusterSpec, opts: VllmOptions) -> VllmClusterResult:
    """Replay spec.trace on spec.instances vLLM instances; every input is checked before any process starts."""
    checked = check_vllm(spec, opts)
    given = model_info(opts.model) if opts.model is not None else None
    if importlib.util.find_spec("vllm") is None:
        raise EngineError(f"--engine vllm: vLLM is not installed in this environment ({sys.executable}); run "
                          "scripts/setup-vllm.sh")
    model = given if given is not None else model_info(tiny_model())
    prompts = build_prompts(checked.requests, opts.block_tokens, model.vocab_size, max_tokens=model.max_positions)
    cap = opts.max_output_tokens
    longest = max(len(p.token_ids) + (p.output_tokens if cap is None else min(cap, p.output_tokens))
                  for p in prompts)
    block_bytes = model.kv_bytes_per_token(DTYPE_BYTES[opts.dtype]) * opts.block_tokens
    with tempfile.TemporaryDirectory(prefix="tieremu-vllm-cluster-") as tmp:
        rundir = Path(tmp)
        tiers = local_tier_file(spec.tiers, spec.capacity_blocks, block_bytes, rundir / "tiers.yaml")
        check_capacities(load_tier_map(tiers), block_bytes, opts.block_tokens)
        base = {"model": str(model.path), "dtype": opts.dtype, "block_tokens": opts.block_tokens,
                "max_model_len": -(-longest // opts.block_tokens) * opts.block_tokens, "vocab_size": model.vocab_size,
                "max_output_tokens": cap,
                "connector": {"tiers": str(tiers), "policy": spec.policy, "kv_tier": None}}
        cluster = VllmCluster(checked, base, rundir, opts)
        cluster.notes.append("vLLM instances on loopback TCP, the link's rate paced by the transport")
        started = time.time()
        with terminate_raises():
            try:
                cluster.start()
                cluster.dispatch()
                cluster.finish()
            finally:
                try:
                    cluster.stop()
                finally:
                    cluster.close_logs()
        wall = time.time() - started
        missing = [p.me for p in cluster.procs.values() if p.result is None]
        if missing:
            log = cluster.logs[missing[0]]
            raise EngineError(f"vLLM instance {missing[0]} ended without a result: {reason(log)}\nLast lines of "
                              f"{log.name}:\n{tail(log)}")
    result = _result(cluster, checked, wall)
    results = [p.result for p in cluster.procs.values() if p.result is not None]
    outputs = {row["i"]: row["output"] for r in results for row in r["per_request"]}
    cached = {row["i"]: row["cached_tokens"] for r in results for row in r["per_request"]}
    instances = [{"instance": r["me"], "construct_s": r["construct_s"], "connector": r["connector"],
                  "store_origin": r["origin_store"]} for r in sorted(results, key=lambda r: r["me"])]
    notes = ("hit ratios count the whole prompt blocks before each prompt's last token (vLLM computes at least "
             "that one token itself); peer blocks were pulled, saved to the instance's store and loaded by the "
             "connector, so vLLM did not compute them",)
    return VllmClusterResult(result, str(model.path), opts.block_tokens, outputs, cached, instances, notes)
