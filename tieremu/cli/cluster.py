"""`tieremu cluster replay`: several serving instances, as separate processes, sharing KV blocks peer to peer.

Each instance replays the requests routed to it (round-robin) in execute mode against its own tiers and policy;
a block missing locally is pulled from the peer that holds it (or recomputed, if the estimate says that is
faster). As root the instances run in network namespaces joined by veth pairs, rate shaped by tbf; otherwise on
loopback, rate paced by the transport. Namespaces and qdiscs are removed at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from tieremu.cluster.faults import FAULT_KINDS
from tieremu.cluster.link import parse_link
from tieremu.cluster.replay import SHARING, TRANSPORTS, ClusterSpec, cluster_replay
from tieremu.cluster.result import ClusterResult
from tieremu.cluster.ring import INDEXES
from tieremu.errors import WorkloadError


@click.group()
def cluster() -> None:
    """Several serving instances sharing KV blocks peer to peer, with no central cache server."""


@cluster.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--tiers", "tier_file", required=True, type=click.Path(dir_okay=False),
              help="Tier map of one instance; a `kind: peer` tier may carry the link (link: {latency_us, gbps}).")
@click.option("--instances", type=int, default=3, show_default=True, help="Serving instances (processes).")
@click.option("--sharing", default="p2p", show_default=True, help=f"{' | '.join(SHARING)}: none recomputes every "
              "block missing locally; p2p pulls it from a peer that holds it.")
@click.option("--index", default="broadcast", show_default=True, help=f"{' | '.join(INDEXES)}: every instance "
              "keeps a replica fed by ZeroMQ pub-sub events, or each block's home instances (consistent hashing) "
              "know its holders.")
@click.option("--transport", default="tcp", show_default=True,
              help=f"{' | '.join(TRANSPORTS)} (shm and mooncake are not built yet).")
@click.option("--link", "link_text", default=None, metavar="LATENCY_US,GBPS",
              help="Every link: one-way latency in microseconds and bandwidth in Gb/s (default: the peer tier's).")
@click.option("--max-requests", type=int, default=None, help="Replay only the trace's first N requests.")
@click.option("--fault", "faults", multiple=True, metavar="KIND@N",
              help=f"Inject a fault when request N is dispatched (repeatable): {', '.join(FAULT_KINDS)}.")
@click.option("--mode", default="execute", show_default=True, help="execute: real instances, real blocks.")
@click.option("--policy", default="lru", show_default=True, help="Each instance's placement policy.")
@click.option("--capacity-blocks", type=int, default=4096, show_default=True,
              help="Blocks each local tier of each instance holds.")
@click.option("--block-kib", type=int, default=64, show_default=True,
              help="Memory one block takes here (the trace's 512-token block, scaled down).")
@click.option("--time-scale", type=float, default=0.05, show_default=True,
              help="Wall seconds per trace second.")
@click.option("--namespaces/--no-namespaces", default=None,
              help="Run instances in network namespaces (root) or on loopback (default: namespaces when root).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replay(trace: str, tier_file: str, instances: int, sharing: str, index: str, transport: str,
           link_text: str | None, max_requests: int | None, faults: tuple[str, ...], mode: str, policy: str,
           capacity_blocks: int, block_kib: int, time_scale: float, namespaces: bool | None, as_json: bool) -> None:
    """Replay TRACE on N instances sharing KV blocks peer to peer."""
    spec = ClusterSpec(trace=Path(trace), tiers=Path(tier_file), instances=instances, sharing=sharing, index=index,
                       transport=transport, link=None if link_text is None else parse_link(link_text),
                       max_requests=max_requests, faults=faults, mode=mode, namespaces=namespaces, policy=policy,
                       capacity_blocks=capacity_blocks, block_kib=block_kib, time_scale=time_scale)
    result = cluster_replay(spec)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        Console(width=max(120, Console().width)).print(_table(result))
    if result.corrupted_blocks:
        raise WorkloadError(f"{result.corrupted_blocks} corrupted blocks were detected (and not used)")


def _table(r: ClusterResult) -> Table:
    where = "namespaces (tbf)" if r.namespaces else "loopback"
    table = Table(title=f"cluster replay: {r.instances_n} instances, sharing {r.sharing}, index {r.index}, "
                  f"{r.transport} over {where}, {r.completed}/{r.requests} requests [{r.origin}]")
    for column in ("instance", "requests", "local", "peer", "miss", "TTFT p50 ms", "TTFT p99 ms", "pulled MiB",
                   "stale", "failed", "corrupt"):
        table.add_column(column, justify="right")
    for row in r.instances:
        name = f"{row.instance}" + (f".{row.incarnation}" if row.incarnation else "") + (" killed" if row.killed
                                                                                        else "")
        table.add_row(name, str(row.requests), str(row.local), str(row.peer), str(row.miss),
                      f"{row.ttft_ms.p50:.1f}", f"{row.ttft_ms.p99:.1f}", f"{row.peer_bytes / 2**20:.1f}",
                      str(row.stale_misses), str(row.pulls_failed), str(row.corrupted_blocks))
    error = "n/a" if r.estimator_error is None else f"{r.estimator_error:.2f}"
    table.caption = (f"hit ratio local {r.hit_ratio.local:.3f} peer {r.hit_ratio.peer:.3f} miss "
                     f"{r.hit_ratio.miss:.3f}; TTFT p50 {r.ttft_ms.p50:.1f} ms p99 {r.ttft_ms.p99:.1f} ms; pull p50 "
                     f"{r.pull_ms.p50:.2f} ms p99 {r.pull_ms.p99:.2f} ms; estimator error {error}; stale misses "
                     f"{r.stale_misses}; index stale entries {r.index_stale_entries}")
    return table
