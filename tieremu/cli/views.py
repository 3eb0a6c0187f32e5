"""Terminal tables for what the commands compute; the data itself stays in dataclasses."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from rich.table import Table

from tieremu.numa.sysfs import format_list

if TYPE_CHECKING:  # types only: importing the benches would pull numpy and torch into every table
    from tieremu.bench.emulation import EmulationBench
    from tieremu.bench.kv import KVBench
    from tieremu.bench.placement import PlacementBench
    from tieremu.numa.topology import Topology
    from tieremu.tiers.check import TierCheck
    from tieremu.workloads.roundtrip import Hop


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def topology_table(topo: Topology) -> Table:
    table = Table(title=f"NUMA topology ({topo.root})")
    for col in ("node", "cpus", "cpu-less", "memory MiB", "free MiB", "distances", "HMAT read lat/bw",
                "HMAT write lat/bw", "memory tier"):
        table.add_column(col)
    for n in topo.nodes.values():
        acc = n.access.get(0) or n.access.get(1)
        read = f"{acc.read_latency_ns} ns / {acc.read_bandwidth_mbps} MB/s" if acc else "-"
        write = f"{acc.write_latency_ns} ns / {acc.write_bandwidth_mbps} MB/s" if acc else "-"
        table.add_row(str(n.id), format_list(n.cpus) or "-", "yes" if n.cpuless else "no",
                      _mib(n.mem_total_bytes), _mib(n.mem_free_bytes),
                      " ".join(str(n.distances[d]) for d in sorted(n.distances)), read, write,
                      "-" if n.memory_tier is None else str(n.memory_tier))
    k = topo.knobs
    table.caption = (f"numa_balancing={k.numa_balancing} demotion_enabled={k.demotion_enabled} "
                     f"THP={k.thp_enabled} memory tiers: "
                     + (" ".join(f"{t}:{format_list(ns)}" for t, ns in topo.memory_tiers.items()) or "-"))
    if topo.node_memory_underreported:
        table.caption += ("\nnote: per-node MemTotal adds up to less than the system's: this kernel defers "
                          "memory init, so per-node free memory under-reports here")
    return table


def checks_table(checks: list[TierCheck]) -> Table:
    table = Table(title="Tier placement check")
    for col in ("tier", "backing", "nodes", "status", "on nodes", "reason"):
        table.add_column(col, overflow="fold")
    style = {"enforced": "green", "emulated": "yellow", "not enforced": "red"}
    for c in checks:
        table.add_row(c.tier, c.backing, format_list(c.nodes), f"[{style[c.status]}]{c.status}[/]",
                      f"{c.achieved_fraction:.1%}", c.reason)
    return table


def hops_table(hops: list[Hop]) -> Table:
    table = Table(title="Migration round trip (pages asked of the kernel after every hop)")
    for col in ("hop", "node", "origin", "pages", "moved", "already", "failed", "GB/s", "on target", "data", "note"):
        table.add_column(col, overflow="fold")
    for h in hops:
        table.add_row(f"{h.source} → {h.target}", str(h.target_node), h.origin, str(h.pages), str(h.moved),
                      str(h.already), str(sum(h.failed.values())), f"{h.gb_per_s:.2f}" if h.gb_per_s else "-",
                      f"{h.fraction_on_target:.1%}", "intact" if h.checksum_ok else "[red]CORRUPT[/]", h.note)
    return table


def placement_bench_table(b: PlacementBench) -> Table:
    page = "2 MiB THP" if b.hugepages else f"{b.page_size // 1024} KiB"
    table = Table(title=f"Placement bench: {b.size_bytes >> 20} MiB region, {page} pages, "
                        f"median of {b.repeats} ({b.origin})")
    for col in ("operation", "median", "min", "max", "spread"):
        table.add_column(col)
    for label, s, unit in (("placement query (move_pages, no nodes)", b.query_pages_per_s, "pages/s"),
                           ("move_pages to current node (no-op)", b.noop_move_pages_per_s, "pages/s")):
        table.add_row(label, f"{s.median:,.0f} {unit}", f"{s.min:,.0f}", f"{s.max:,.0f}", f"{s.spread:.1%}")
    for m in b.migrations:
        s = m.gb_per_s
        table.add_row(f"migrate node {m.source} → {m.target}", f"{s.median:.2f} GB/s", f"{s.min:.2f}",
                      f"{s.max:.2f}", f"{s.spread:.1%}")
    load = b.load
    table.caption = (f"load {load.loadavg_1m:.2f} on {load.cpus} CPUs, steal {load.steal_fraction:.1%}"
                     + (" — NOISY run" if load.noisy else ""))
    return table


def emulation_bench_table(b: EmulationBench) -> Table:
    from tieremu.bench.emulation import TOLERANCE
    from tieremu.probe.latency import DESCHEDULED_NS

    table = Table(title=f"Emulated tiers vs targets (local: {b.calibration.latency_ns:.0f} ns, "
                        f"read {b.calibration.bandwidth_gbps['read']:.1f} GB/s; median of repeats)")
    for col in ("metric", "ratio to local", "target", "achieved", "error", "spread", "descheduled", "verdict"):
        table.add_column(col)
    for p in b.points:
        verdict = "[green]ok[/]" if p.ok else f"[red]off by more than {TOLERANCE:.0%}[/]"
        left_out = f"{p.descheduled_ns / 1e6:.0f} ms" if p.metric == "latency_ns" else ""
        table.add_row(p.metric, f"{p.ratio:g}x", f"{p.target:.2f}", f"{p.achieved.median:.2f}", f"{p.error:+.1%}",
                      f"{p.achieved.spread:.1%}", left_out, verdict)
    overhead = ", ".join(f"{k} {v:+.2%}" for k, v in b.overhead.items())
    noisy = " — NOISY run" if b.load.noisy else ""
    table.caption = (f"descheduled: time the latency chase left out (gaps over {DESCHEDULED_NS / 1e3:g} µs: "
                     "preempted or stolen); "
                     f"pacer bookkeeping overhead (clock read and account per chunk, never waiting): {overhead}; "
                     f"load {b.load.loadavg_1m:.2f} on {b.load.cpus} CPUs, steal {b.load.steal_fraction:.1%}{noisy}")
    return table


def kv_bench_table(b: KVBench) -> Table:
    s = b.spec
    table = Table(title=f"KV cache, {b.model} model, {b.layout}: batch {s.batch}, ~{s.prompt_tokens}-token prompts, "
                        f"{s.decode_steps} decode steps (medians of alternating rounds)")
    for col in ("measurement", "figure", "spread", "note"):
        table.add_column(col)
    goal = "ok" if b.paged_ratio <= 1.3 else "over the 1.3x goal"
    table.add_row("TPOT paged, all local", f"{b.paged_tpot_ms.median:.2f} ms", f"{b.paged_tpot_ms.spread:.1%}", "")
    table.add_row("TPOT contiguous KV", f"{b.contiguous_tpot_ms.median:.2f} ms", f"{b.contiguous_tpot_ms.spread:.1%}",
                  "")
    table.add_row("paged / contiguous", f"{b.paged_ratio:.3f}x", "", goal)
    table.add_row("decode attention KV read, in place", f"{b.attention_gbps.median:.2f} GB/s",
                  f"{b.attention_gbps.spread:.1%}", f"{b.attention_gbps.median / b.probe_read_gbps:.0%} of probe read")
    table.add_row("gather into contiguous K/V", f"{b.gather_gbps.median:.2f} GB/s", f"{b.gather_gbps.spread:.1%}",
                  f"{b.gather_gbps.median / b.probe_read_gbps:.0%} of probe read")
    table.add_row("probe read bandwidth, 1 thread", f"{b.probe_read_gbps:.2f} GB/s", "", "")
    for p in b.placements:
        per_token = ", ".join(f"{t} {v / 1024:.0f} KiB" for t, v in p.kv_bytes_per_token.items() if v)
        table.add_row(f"TPOT {p.name}", f"{p.tpot_ms.median:.2f} ms", f"{p.tpot_ms.spread:.1%}",
                      f"KV per token: {per_token}; injected {p.injected_s * 1e3:.1f} ms")
    ordered = [p.tpot_ms.median for p in b.placements]
    if len(ordered) > 1:
        verdict = "increasing" if all(a < b_ for a, b_ in itertools.pairwise(ordered)) else "NOT increasing"
        table.add_row("TPOT order across placements", " < ".join(f"{v:.2f}" for v in ordered), "", verdict)
    low, high = b.overhead_range
    goal = "ok" if b.accounting_share < 0.02 else "over the 2% goal"
    noise = "; rounds range over 0: run-time difference within noise" if low <= 0 <= high else ""
    table.add_row("emulation, no slowdown asked: run time over plain", f"{b.overhead:+.2%}",
                  f"{low:+.1%}..{high:+.1%}", f"bookkeeping, timed directly: {b.accounting_share:.2%} of run time, "
                  f"{goal} (goal: under 2%){noise}")
    load = b.load
    table.caption = (f"load {load.loadavg_1m:.2f} on {load.cpus} CPUs, steal {load.steal_fraction:.1%}"
                     + (" — NOISY run" if load.noisy else ""))
    return table
