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
              help="Executed runs, 1..20 (overrides the spec's `repeats`; default 3): the reference is their "
                   "median, with a 95% confidence interval of it when K >= 6 (else min..max).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with every request's two TTFTs).")
def validate(spec_file: Path, repeats: int | None, as_json: bool) -> None:
    """Run SPEC's cluster executed K times (real instance processes, real prefill and pulls; the machine's load and
    steal time recorded over each run, a noisy run flagged), fit the serving-time model once to what the instances
    measured in all K runs, simulate the same requests once with the same arrival times, routing, instances,
    capacities and sharing, and print TTFT p50/p99 and throughput: the executed median over the runs with its
    distribution-free confidence interval, the simulated figure, the relative error against the median (pass:
    |p50| < 10%, |p99| < 20%), and each executed run's figures. SPEC is a YAML file: name, tiers (one instance's tier
    map), repeats and the keys of a `kind: cluster` job (trace, max_requests, instances, sharing, pull, index,
    transport, link, policy, capacity_blocks, block_kib, time_scale, namespaces); e.g.
    configs/cluster/validate-3.yaml. Exits 1 when the check fails."""
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
                   f"simulated ({r.simulated_origin})", "in CI", "error", "limit", "check"):
        table.add_column(column, justify="right")
    rows = [("TTFT p50 ms", "ttft_p50_ms", v.ttft_p50_error, p50_limit),
            ("TTFT p99 ms", "ttft_p99_ms", v.ttft_p99_error, p99_limit),
            ("throughput tokens/s", "throughput_tokens_per_s", v.throughput_error, None)]
    for name, key, error, limit in rows:
        verdict = "-" if limit is None or error is None else ("pass" if abs(error) < limit else "FAIL")
        ref = refs.get(key)
        table.add_row(name, f"{v.executed.get(key, math.nan):.1f}",
                      "-" if ref is None else f"{ref.ci.low:.1f}..{ref.ci.high:.1f}",
                      "-" if ref is None else f"{ref.cv:.1%}",
                      f"{v.simulated.get(key, math.nan):.1f}",
                      "-" if ref is None else ("yes" if ref.simulated_inside else "no"),
                      "-" if error is None else f"{error:+.1%}", "-" if limit is None else f"{limit:.0%}", verdict)
    fit = r.model.get("fit") or {}
    hits = ", ".join(f"{k} {r.executed_hits[k]:.3f}/{r.simulated_hits[k]:.3f}" for k in ("local", "peer", "miss"))
    table.caption = (f"{'PASS' if v.passed else 'FAIL'} (errors against the executed median); per-request TTFT "
                     f"error p50 {r.per_request_error_p50:.1%}, p90 {r.per_request_error_p90:.1%}; hit ratio "
                     f"executed/simulated: {hits}; model {r.model['name']} fitted on {fit.get('samples', 0)} "
                     f"requests of {r.repeats} runs (mean error {fit.get('mean_rel', math.nan):.1%}): "
                     f"{r.model['base_s'] * 1e3:.2f} ms + {r.model['prefill_token_s'] * 1e6:.2f} us per computed "
                     f"token, CPU contention {r.contention:.2f} per other busy instance; pull "
                     f"{r.pull_block_ms:.2f} ms per block ({'measured' if r.pull_measured else 'link + probe'}); "
                     f"executed wall {r.executed_wall_s:.1f} s")
    return table


def _runs_table(r: ValidationReport) -> Table:
    """One line per executed run: its figures and the machine's load over it (a noisy run is flagged, not hidden),
    and, as a diagnostic, the errors of the run simulated from a fit to that run alone."""
    table = Table(title=f"executed runs ({r.repeats}): the median above is over these")
    for column in ("run", "TTFT p50 ms", "TTFT p99 ms", "throughput tokens/s", "completed", "wall s",
                   "load 1m/CPUs", "steal", "noisy", "own-fit error p50/p99"):
        table.add_column(column, justify="right")
    for run in r.executed_runs:
        f, load, own = run.figures, run.load, run.own_fit_errors
        table.add_row(str(run.run), f"{f['ttft_p50_ms']:.1f}", f"{f['ttft_p99_ms']:.1f}",
                      f"{f.get('throughput_tokens_per_s', math.nan):.0f}", str(run.completed), f"{run.wall_s:.1f}",
                      f"{load.loadavg_1m:.1f}/{load.cpus}", f"{load.steal_fraction:.1%}",
                      "NOISY" if run.noisy else "no",
                      "-" if not own else f"{own['ttft_p50_ms']:+.1%}/{own['ttft_p99_ms']:+.1%}")
    table.caption = ("own fit: the run simulated from a model fitted to that run alone (a diagnostic; the check "
                     "above uses one fit over every run)")
    return table
