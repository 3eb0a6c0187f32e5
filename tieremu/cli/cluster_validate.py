"""`tieremu cluster validate SPEC` (registered by tieremu/cli/cluster.py): the cluster simulator against the median of
K executed runs of the same small configuration and trace prefix (tieremu.cluster.validate), errors printed beside
every simulated figure and marked pass/fail against the limits (TTFT p50 10%, p99 20%), and a line per executed run
with the machine's load over it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tieremu.cluster.validate import ValidationReport


@click.command("validate")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--repeats", type=int, default=None, metavar="K",
              help="Executed runs, 1..20 (overrides the spec's `repeats`; default 3): each is simulated from the "
                   "model fitted to it and the check takes the median of the runs' errors; the executed median is "
                   "shown with a 95% confidence interval of it when K >= 6 (else min..max).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with every request's two TTFTs).")
def validate(spec_file: Path, repeats: int | None, as_json: bool) -> None:
    """Run SPEC's cluster executed K times (real instance processes, real prefill and pulls; the machine's load and
    steal time recorded over each run, a noisy run flagged), simulate each run with the same arrival times, routing,
    instances, capacities and sharing from the serving-time model fitted to what that run's instances measured (the
    model anchored to the run: the machine's speed moves between runs), and print TTFT p50/p99 and throughput: the
    executed median over the runs with its distribution-free confidence interval, the simulated figure, the median
    over the runs of each run's relative error (pass: |p50| < 10%, |p99| < 20%) with their range, each run's
    figures, and beside them one model fitted to all runs pooled, simulated once, against the executed median (the
    model the JSON report saves for `--servtime`). SPEC is a YAML file: name, tiers (one instance's tier map),
    repeats and the keys of a `kind: cluster` job (trace, max_requests, instances, sharing, pull, index, transport,
    link, policy, capacity_blocks, block_kib, time_scale, namespaces); e.g. configs/cluster/validate-3.yaml. Exits
    1 when the check fails."""
    from tieremu.cluster.validate import P50_LIMIT, P99_LIMIT, load_validate_spec, run_validation, with_repeats

    spec = with_repeats(load_validate_spec(spec_file), repeats)  # every key checked before any process starts
    report = run_validation(spec)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=_jsonable))
    else:
        console = Console(width=120)
        console.print(_table(report, P50_LIMIT, P99_LIMIT))
        console.print(_runs_table(report))
    if not report.validation.passed:
        raise SystemExit(1)


def _jsonable(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _table(r: ValidationReport, p50_limit: float, p99_limit: float) -> Table:
    v = r.validation
    refs = r.executed_reference or {}
    where = "namespaces" if r.namespaces else "loopback"
    table = Table(title=f"cluster validate {r.spec}: {r.instances} instances, sharing {r.sharing} (pull {r.pull}), "
                        f"{r.requests} requests, time scale {r.time_scale} ({where}), executed runs: {r.repeats}")
    coverage = min((ref.ci.coverage for ref in refs.values()), default=math.nan)
    reached = all(ref.ci.reached for ref in refs.values())
    ci_name = "95% CI" if reached else "no CI (1 run)" if r.repeats == 1 else f"min..max ({coverage:.0%} CI)"
    # (origins in parentheses: rich would take "[emulated]" for markup and drop it)
    for column in ("figure", f"executed median ({r.executed_origin})", ci_name, "run CV",
                   f"simulated ({r.simulated_origin})", "error", "runs' errors", "limit", "check"):
        table.add_column(column, justify="right")
    rows = [("TTFT p50 ms", "ttft_p50_ms", v.ttft_p50_error, p50_limit),
            ("TTFT p99 ms", "ttft_p99_ms", v.ttft_p99_error, p99_limit),
            ("throughput tokens/s", "throughput_tokens_per_s", v.throughput_error, None)]
    for name, key, error, limit in rows:
        verdict = "-" if limit is None or error is None else ("pass" if abs(error) < limit else "FAIL")
        ref = refs.get(key)
        errors = [run.own_fit_errors[key] for run in r.executed_runs
                  if run.own_fit_errors and key in run.own_fit_errors]
        table.add_row(name, f"{v.executed.get(key, math.nan):.1f}",
                      "-" if ref is None else f"{ref.ci.low:.1f}..{ref.ci.high:.1f}",
                      "-" if ref is None else f"{ref.cv:.1%}",
                      f"{v.simulated.get(key, math.nan):.1f}",
                      "-" if error is None else f"{error:+.1%}",
                      f"{min(errors):+.1%}..{max(errors):+.1%}" if errors else "-",
                      "-" if limit is None else f"{limit:.0%}", verdict)
    fit = r.model.get("fit") or {}
    hits = ", ".join(f"{k} {r.executed_hits[k]:.3f}/{r.simulated_hits[k]:.3f}" for k in ("local", "peer", "miss"))
    pooled = ""
    if r.pooled is not None and r.repeats > 1:
        p = r.pooled
        inside = refs.get("ttft_p50_ms")
        pooled = (f"; one fit over all {r.repeats} runs, simulated once, against the executed median: TTFT p50 "
                  f"{p.simulated['ttft_p50_ms']:.1f} ms ({p.ttft_p50_error:+.1%}"
                  f"{'' if inside is None else ', inside the interval' if inside.simulated_inside else ', outside'}"
                  f"), p99 {p.simulated['ttft_p99_ms']:.1f} ms ({p.ttft_p99_error:+.1%})")
    table.caption = (f"{'PASS' if v.passed else 'FAIL'}: each run simulated from the model fitted to it, error = "
                     f"median over the runs of (simulated - executed) / executed{pooled}; per-request TTFT error "
                     f"p50 {r.per_request_error_p50:.1%}, p90 {r.per_request_error_p90:.1%}; hit ratio "
                     f"executed/simulated: {hits}; pooled model {r.model['name']} fitted on {fit.get('samples', 0)} "
                     f"requests (mean error {fit.get('mean_rel', math.nan):.1%}): "
                     f"{r.model['base_s'] * 1e3:.2f} ms + {r.model['prefill_token_s'] * 1e6:.2f} us per computed "
                     f"token, CPU contention {r.contention:.2f} per other busy instance; pull "
                     f"{r.pull_block_ms:.2f} ms per block ({'measured' if r.pull_measured else 'link + probe'}); "
                     f"executed wall {r.executed_wall_s:.1f} s")
    return table


def _runs_table(r: ValidationReport) -> Table:
    """One line per executed run: its figures, the same run simulated from the model fitted to it and the errors (the
    check's parts), and the machine's load over it (a noisy run is flagged, not hidden)."""
    table = Table(title=f"executed runs ({r.repeats}): the median above is over these")
    for column in ("run", "TTFT p50 ms", "TTFT p99 ms", "throughput tokens/s", "completed", "wall s",
                   "load 1m/CPUs", "steal", "noisy", "simulated p50/p99 ms", "error p50/p99"):
        table.add_column(column, justify="right")
    for run in r.executed_runs:
        f, load, own, sim = run.figures, run.load, run.own_fit_errors, run.own_fit_simulated
        table.add_row(str(run.run), f"{f['ttft_p50_ms']:.1f}", f"{f['ttft_p99_ms']:.1f}",
                      f"{f.get('throughput_tokens_per_s', math.nan):.0f}", str(run.completed), f"{run.wall_s:.1f}",
                      f"{load.loadavg_1m:.1f}/{load.cpus}", f"{load.steal_fraction:.1%}",
                      "NOISY" if run.noisy else "no",
                      "-" if not sim else f"{sim['ttft_p50_ms']:.1f}/{sim['ttft_p99_ms']:.1f}",
                      "-" if not own else f"{own['ttft_p50_ms']:+.1%}/{own['ttft_p99_ms']:+.1%}")
    table.caption = "simulated: the run simulated from the model fitted to that run alone; the check is the median"
    return table
