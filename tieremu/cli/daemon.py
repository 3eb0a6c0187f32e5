"""`tieremu daemon --pid PID --policy NAME`: attach to a running process and move its pages between NUMA nodes.

Registered in tieremu/cli.py (`from tieremu.cli.daemon import daemon`, added to the subcommand groups).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from tieremu.cli import units
from tieremu.cli.replay import Number, parse_params
from tieremu.daemon.attach import (
    DEFAULT_EPOCH_S,
    DEFAULT_SAMPLE_PAGES,
    KERNEL_POLICY,
    AttachConfig,
    AttachResult,
    TargetExitedError,
    attach,
)
from tieremu.daemon.proctrack import DEFAULT_CHUNK_BYTES
from tieremu.numbers import MAX_GBPS, MAX_MIB, MAX_SECONDS
from tieremu.policy.registry import names


@click.command("daemon")
@click.option("--pid", type=int, required=True, help="The process whose memory is tracked and moved.")
@click.option("--policy", required=True,
              help=f"Policy name: {', '.join(names())}, package.module:Class, or {KERNEL_POLICY} (move nothing; "
              "watch the kernel's own tiering).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A policy parameter (repeatable).")
@click.option("--epoch-ms", type=Number(0, MAX_SECONDS * 1e3), default=DEFAULT_EPOCH_S * 1e3,
              show_default=True, help="Epoch: how often the process is sampled and the plan carried out.")
@click.option("--duration", type=Number(0, MAX_SECONDS), default=None,
              help="Seconds to run (default: until Ctrl-C).")
@click.option("--budget-gbps", type=Number(0, MAX_GBPS), default=None,
              help="Migration bandwidth budget in GB/s (default: unlimited).")
@click.option("--tiers", "tier_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Tier map (configs/tiers/*.yaml), fastest first; capacity_mib limits a tier. Default: one tier "
              "per memory node, by memory tier and distance.")
@click.option("--chunk-mib", type=Number(0, MAX_MIB), default=DEFAULT_CHUNK_BYTES / 2**20,
              show_default=True, help="Chunk size: the unit tracked and moved (a multiple of the page size).")
@click.option("--min-region-mib", type=Number(0, MAX_MIB, lo_open=False), default=None,
              help="Smallest anonymous region tracked (default: one chunk).")
@click.option("--sample-pages", type=click.IntRange(min=0), default=DEFAULT_SAMPLE_PAGES, show_default=True,
              help="Pages per chunk asked where they are each epoch (0: every page).")
@click.option("--json", "as_json", is_flag=True, help="Print the result, with every migration and epoch, as JSON.")
def daemon(pid: int, policy: str, params: tuple[str, ...], epoch_ms: float, duration: float | None,
           budget_gbps: float | None, tier_file: Path | None, chunk_mib: float, min_region_mib: float | None,
           sample_pages: int, as_json: bool) -> None:
    """Attach to process PID and migrate its memory between NUMA nodes under a placement policy.

    Needs CAP_SYS_NICE (root) to move another process's pages, and two or more NUMA nodes. Its accesses are
    tracked per 2 MiB chunk (pagemap) and per region (clear_refs + smaps Referenced). Ends after --duration,
    on Ctrl-C, or with an error when the process exits (the summary of what was done is printed first).
    """
    config = AttachConfig(
        pid=pid, policy=policy, params=parse_params(params), epoch_s=epoch_ms / 1e3, budget_gbps=budget_gbps,
        tier_file=tier_file, chunk_bytes=int(chunk_mib * 2**20),
        min_region_bytes=None if min_region_mib is None else int(min_region_mib * 2**20), sample_pages=sample_pages)
    running = attach(config)
    if not as_json:
        click.echo(f"attached to process {pid}: policy {policy}, tiers "
                   + ", ".join(f"{t.name} (node {','.join(map(str, t.nodes))})" for t in running.tiers)
                   + (f", for {duration:g} s" if duration else ", until Ctrl-C"), err=True)
    try:
        result = running.run(duration)
    except TargetExitedError as exc:
        _show(exc.result, as_json)
        raise
    _show(result, as_json)


def _show(result: AttachResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    console = Console(width=max(120, Console().width))
    console.print(summary_table(result))
    click.echo(summary_text(result))


def summary_table(result: AttachResult) -> Table:
    """Per tier: nodes, capacity, chunks at the end, and the migrations into it."""
    last = result.epochs[-1].chunks_by_tier if result.epochs else {}
    origin = "measured in the QEMU guest: speeds are emulation artefacts" if result.vm else "measured"
    table = Table(title=f"process {result.pid} under {result.policy} ({result.ended}, {origin})")
    for col in ("tier", "nodes", "capacity chunks", "chunks at end", "moved in", "bytes moved in"):
        table.add_column(col, justify="left" if col in ("tier", "nodes") else "right")
    for tier in result.tiers:
        into = [m for m in result.migrations if m.target_tier == tier.name]
        table.add_row(tier.name, ",".join(map(str, tier.nodes)),
                      "unlimited" if tier.capacity_chunks is None else f"{tier.capacity_chunks:,}",
                      f"{last.get(tier.name, 0):,}", f"{sum(1 for m in into if m.moved):,}",
                      units.amount(sum(m.bytes for m in into)))
    return table


def summary_text(result: AttachResult) -> str:
    r = result
    failed = ", ".join(f"{k} {v:,}" for k, v in sorted(r.failed_pages.items())) or "none"
    skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(r.skipped.items())) or "none"
    lines = [
        f"epochs {len(r.epochs):,} of {r.epoch_s * 1e3:g} ms over {r.duration_s:,.1f} s  chunks tracked "
        f"{r.chunks_tracked:,} ({units.size(r.chunk_bytes)})  daemon CPU {r.cpu_s:.2f} s",
        f"migrations {len(r.migrations):,} (promotions {r.count('promote'):,}, demotions {r.count('demote'):,})  "
        f"moved {units.amount(r.moved_bytes)} at {units.rate(r.gbps)} in move_pages, {units.rate(r.rate_gbps)} over "
        f"the run" + ("" if r.budget_gbps is None else f" (budget {units.rate(r.budget_gbps)})"),
        f"failed pages by reason: {failed}  skipped moves: {skipped}  chunks moved by others: {r.moved_by_others:,}  "
        f"ping-pongs {r.ping_pongs:,}",
        f"tracking: {r.tracking}",
    ]
    if r.kernel is not None:
        k = r.kernel
        demoted = ", ".join(f"{kind} {n:,}" for kind, n in k.demoted_by_kind.items() if n) or "none"
        lines.append(f"kernel (machine-wide, pages): promoted {k.promoted:,}, demoted {k.demoted:,} ({demoted}), "
                     f"NUMA hint faults {k.hint_faults:,}; {k.knobs.describe()}")
    return "\n".join(lines)
