"""`tieremu cluster replay`: several serving instances, as separate processes, sharing KV blocks peer to peer
(`--mode execute`), or a simulated cluster of them under a KV-aware router (`--mode simulate`,
tieremu/cli/cluster_simulate.py); `tieremu cluster fit-servtime`: the simulator's serving-time model.

Each instance replays the requests routed to it (round-robin) in execute mode against its own tiers and policy;
a block missing locally is pulled from the peer that holds it (or recomputed, if the estimate says that is
faster). As root the instances run in network namespaces joined by veth pairs, rate shaped by tbf; otherwise on
loopback, rate paced by the transport. Namespaces and qdiscs are removed at the end, on error and on Ctrl-C.
`--engine vllm`: each instance is vLLM's CPU build with tieremu's KV connector, pulling from peers what its own
store lacks (tieremu/cluster/vllm_replay.py).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from tieremu.cli.cluster_simulate import fit_servtime, simulate
from tieremu.cli.cluster_validate import validate
from tieremu.cluster.faults import FAULT_KINDS
from tieremu.cluster.link import parse_link
from tieremu.cluster.replay import PULL_RULES, SHARING, TRANSPORTS, ClusterSpec, cluster_replay
from tieremu.cluster.result import ClusterResult
from tieremu.cluster.ring import INDEXES
from tieremu.cluster.simulate import parse_pd
from tieremu.cluster.vllm_replay import ENGINES, VllmOptions, vllm_cluster_replay
from tieremu.errors import ConfigError, WorkloadError

MODES = ("execute", "simulate")
# Options that mean something in one mode only: given in the other, they are refused rather than ignored.
EXECUTE_ONLY = ("pull", "index", "transport", "shm_node", "link_text", "faults", "namespaces", "capacity_blocks",
                "block_kib", "time_scale", "engine")
SIMULATE_ONLY = ("slo_ms", "servtime", "token_budget", "max_batch")


@click.group()
def cluster() -> None:
    """Several serving instances sharing KV blocks peer to peer, with no central cache server."""


@cluster.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--tiers", "tier_file", type=click.Path(dir_okay=False), default=None,
              help="execute (required): the tier map of one instance; a `kind: peer` tier may carry the link "
                   "(link: {latency_us, gbps}). simulate: the cluster spec (each instance's tiers, the link, prices; "
                   "default configs/cluster/sim-hbm-dram.yaml).")
@click.option("--instances", type=click.IntRange(min=1), default=None,
              help="Serving instances: processes (execute, default 3) or simulated ones (simulate, default 8).")
@click.option("--sharing", type=click.Choice(SHARING), default="p2p", show_default=True,
              help="none recomputes (prefills) every block missing locally; p2p pulls it from a peer that holds it.")
@click.option("--pull", type=click.Choice(PULL_RULES), default="estimate", show_default=True,
              help="execute, p2p: pull a peer-held block when the estimate says it beats recomputing it, or always "
                   "(the estimator's error is measured either way).")
@click.option("--index", default="broadcast", show_default=True, help=f"{' | '.join(INDEXES)}: every instance "
              "keeps a replica fed by ZeroMQ pub-sub events, or each block's home instances (consistent hashing) "
              "know its holders.")
@click.option("--transport", default="tcp", show_default=True,
              help=f"{' | '.join(TRANSPORTS)}: blocks cross TCP sockets, or a shared-memory pool bound to --shm-node "
                   "and mapped by every instance (a CXL pool; emulated by a node with CPUs; instances on loopback, "
                   "rate paced by the transport), or each holder's registered staging slot read by Mooncake's Transfer "
                   "Engine (mooncake: TCP, P2P handshake, over the veths or loopback like tcp; needs "
                   "`bash scripts/setup-mooncake.sh`).")
@click.option("--shm-node", type=int, default=0, show_default=True,
              help="--transport shm: the memory node the shared pool is bound to (mbind, checked with move_pages).")
@click.option("--link", "link_text", default=None, metavar="LATENCY_US,GBPS",
              help="Every link: one-way latency in microseconds and bandwidth in Gb/s (default: the peer tier's).")
@click.option("--max-requests", type=int, default=None, help="Replay only the trace's first N requests.")
@click.option("--fault", "faults", multiple=True, metavar="KIND@N",
              help=f"Inject a fault when request N is dispatched (repeatable): {', '.join(FAULT_KINDS)}.")
@click.option("--mode", type=click.Choice(MODES), default="execute", show_default=True,
              help="execute: real instance processes, real blocks, real links. simulate: a discrete-event cluster "
                   "simulation (8-256 instances, whole traces, every figure labelled simulated).")
@click.option("--router", "router_specs", multiple=True, default=("round-robin",), show_default=True,
              help="round-robin | least-loaded | prefix | cost | weighted, parameters as NAME:key=value,... (prefix: "
                   "load_threshold, min_match; weighted: overlap_weight); repeat to compare routers on one trace. "
                   "execute routes round-robin only.")
@click.option("--pd", "pd_text", default=None, metavar="P:D",
              help="P prefill and D decode instances (P + D = --instances); prefill hands KV to decode. execute: "
                   "request k is prefilled on instance k mod P, then decode instance P + k mod D pulls its blocks from "
                   "it over TCP (the peer transport, whatever --sharing says; --sharing p2p still shares among the "
                   "prefill instances; --transport tcp, no --fault, --engine tieremu) and runs min(output, 16) decode "
                   "steps over them: TTFT to the first step, TPOT, hand-off bytes and time.")
@click.option("--slo-ms", type=float, default=None,
              help="simulate: TTFT SLO in ms; a request predicted to miss it is rejected (counted).")
@click.option("--servtime", default="reference", show_default=True,
              help="simulate: the serving-time model, a JSON file from `cluster fit-servtime` or `cluster validate "
                   "--json` (its TTFT and throughput errors are then shown beside the results), or `reference` "
                   "(assumed A100-class).")
@click.option("--token-budget", type=click.IntRange(min=1), default=8192, show_default=True,
              help="simulate: tokens per continuous-batching iteration.")
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="simulate: requests per iteration.")
@click.option("--policy", default="lru", show_default=True, help="Each instance's placement policy.")
@click.option("--capacity-blocks", type=int, default=4096, show_default=True,
              help="Blocks each local tier of each instance holds.")
@click.option("--block-kib", type=int, default=64, show_default=True,
              help="Memory one block takes here (the trace's 512-token block, scaled down).")
@click.option("--time-scale", type=float, default=0.05, show_default=True,
              help="Wall seconds per trace second.")
@click.option("--namespaces/--no-namespaces", default=None,
              help="Run instances in network namespaces (root) or on loopback (default: namespaces when root).")
@click.option("--engine", type=click.Choice(ENGINES), default="tieremu", show_default=True,
              help="execute: tieremu's own decode instances, or vLLM's CPU build (the tiny Llama, 64-token blocks, "
                   "outputs capped at 16 tokens) with tieremu's KV connector, whose misses are pulled from peers "
                   "(loopback only; always pulls; no faults).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replay(trace: str, tier_file: str | None, instances: int | None, sharing: str, pull: str, index: str,
           transport: str, shm_node: int, link_text: str | None, max_requests: int | None, faults: tuple[str, ...],
           mode: str,
           router_specs: tuple[str, ...], pd_text: str | None, slo_ms: float | None, servtime: str,
           token_budget: int, max_batch: int, policy: str, capacity_blocks: int, block_kib: int, time_scale: float,
           namespaces: bool | None, engine: str, as_json: bool) -> None:
    """Replay TRACE on N instances sharing KV blocks peer to peer (execute), or simulate it over a cluster under a
    KV-aware router (simulate): TTFT/TPOT tails, hit ratios local / peer / miss, link bytes, and per mode the
    pull-or-recompute estimator's error (execute) or SLO attainment, load imbalance and cost (simulate)."""
    _refuse_other_mode(click.get_current_context(), mode)
    if mode == "simulate":
        simulate(trace, router_specs, instances or 8, pd_text, slo_ms, sharing, policy, tier_file, servtime,
                 max_requests, token_budget, max_batch, as_json)
        return
    if tier_file is None:
        raise ConfigError("--tiers: cluster replay --mode execute needs the tier map of one instance (e.g. "
                          "configs/tiers/cluster-peer.yaml)")
    if router_specs != ("round-robin",):
        raise ConfigError(f"--router {', '.join(router_specs)}: --mode execute routes round-robin; the other routers "
                          "run in --mode simulate")
    instances = instances or 3
    if transport != "shm" and click.get_current_context().get_parameter_source("shm_node") is \
            ParameterSource.COMMANDLINE:
        raise ConfigError(f"--shm-node {shm_node}: only used with --transport shm (this run uses {transport})")
    pd = None
    if pd_text is not None:
        if engine == "vllm":
            raise ConfigError(f"--pd {pd_text} with --engine vllm: prefill/decode instances are tieremu's own "
                              "(--engine tieremu)")
        pd = parse_pd(pd_text)
    spec = ClusterSpec(trace=Path(trace), tiers=Path(tier_file), instances=instances, sharing=sharing, pull=pull,
                       index=index, transport=transport, link=None if link_text is None else parse_link(link_text),
                       max_requests=max_requests, faults=faults, mode=mode, namespaces=namespaces, policy=policy,
                       capacity_blocks=capacity_blocks, block_kib=block_kib, time_scale=time_scale, shm_node=shm_node,
                       pd=pd)
    if engine == "vllm":
        ctx = click.get_current_context()
        if ctx.get_parameter_source("block_kib") is ParameterSource.COMMANDLINE:
            raise ConfigError("--block-kib with --engine vllm: a vLLM block's size is the model's KV per token x "
                              "64 tokens")
        if ctx.get_parameter_source("pull") is not ParameterSource.COMMANDLINE:
            spec = replace(spec, pull="always")
        run = vllm_cluster_replay(spec, VllmOptions())
        result, doc = run.cluster, run.to_json()
    else:
        result = cluster_replay(spec)
        doc = {"engine": "tieremu", **result.to_json()}
    for note in doc["notes"]:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        Console(width=max(120, Console().width)).print(_table(result, engine))
    if result.corrupted_blocks:
        raise WorkloadError(f"{result.corrupted_blocks} corrupted blocks were detected (and not used)")


def _refuse_other_mode(ctx: click.Context, mode: str) -> None:
    """An option of the other mode, given explicitly, is an error: it would otherwise be silently ignored."""
    other = SIMULATE_ONLY if mode == "execute" else EXECUTE_ONLY
    given = [p.opts[0] for p in ctx.command.params
             if p.name in other and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    if given:
        raise ConfigError(f"{', '.join(given)}: not used by cluster replay --mode {mode} (valid only with --mode "
                          f"{'simulate' if mode == 'execute' else 'execute'})")


cluster.add_command(fit_servtime)
cluster.add_command(validate)


def _table(r: ClusterResult, engine: str = "tieremu") -> Table:
    where = "namespaces (tbf)" if r.namespaces else "loopback"
    if r.transport == "shm":
        where = f"a pool on node {r.shaping.get('pool_node', '?')} ({r.shaping.get('pool_memory', '?')})"
    table = Table(title=f"cluster replay: {r.instances_n} {engine} instances, sharing {r.sharing}, index {r.index}, "
                  f"{r.transport} over {where}, {r.completed}/{r.requests} requests [{r.origin}]")
    pd_columns = ("role", "decoded", "handed MiB", "TPOT p50 ms") if r.pd else ()
    for column in ("instance", "requests", "local", "peer", "miss", "TTFT p50 ms", "TTFT p99 ms", "pulled MiB",
                   "stale", "failed", "corrupt", *pd_columns):
        table.add_column(column, justify="right")
    for row in r.instances:
        name = f"{row.instance}" + (f".{row.incarnation}" if row.incarnation else "") + (" killed" if row.killed
                                                                                        else "")
        pd_cells = (row.role, str(row.decoded), f"{row.pd_bytes / 2**20:.1f}",
                    "-" if row.tpot_ms is None else f"{row.tpot_ms.p50:.2f}") if r.pd else ()
        table.add_row(name, str(row.requests), str(row.local), str(row.peer), str(row.miss),
                      f"{row.ttft_ms.p50:.1f}", f"{row.ttft_ms.p99:.1f}", f"{row.peer_bytes / 2**20:.1f}",
                      str(row.stale_misses), str(row.pulls_failed), str(row.corrupted_blocks), *pd_cells)
    error = "n/a" if r.estimator_error is None else f"{r.estimator_error:.2f}"
    table.caption = (f"hit ratio local {r.hit_ratio.local:.3f} peer {r.hit_ratio.peer:.3f} miss "
                     f"{r.hit_ratio.miss:.3f}; TTFT p50 {r.ttft_ms.p50:.1f} ms p99 {r.ttft_ms.p99:.1f} ms; pull p50 "
                     f"{r.pull_ms.p50:.2f} ms p99 {r.pull_ms.p99:.2f} ms; estimator error {error}; stale misses "
                     f"{r.stale_misses}; index stale entries {r.index_stale_entries}")
    if r.pd:
        tpot = "n/a" if r.tpot_ms is None else f"p50 {r.tpot_ms.p50:.2f} ms p99 {r.tpot_ms.p99:.2f} ms"
        handoff = "n/a" if r.handoff_ms is None else f"p50 {r.handoff_ms.p50:.1f} ms p99 {r.handoff_ms.p99:.1f} ms"
        table.caption += (f"; P:D {r.pd}: TPOT {tpot}; handed {r.pd_bytes / 2**20:.1f} MiB ({r.pd_handed} blocks, "
                          f"{r.pd_local} already held, {r.pd_recomputed} recomputed), hand-off {handoff}")
    return table
