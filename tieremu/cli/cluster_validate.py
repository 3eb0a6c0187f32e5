"""`tieremu cluster validate SPEC` (registered by tieremu/cli/cluster.py): the cluster simulator against the executed
cluster on the same small configuration and trace prefix (tieremu.cluster.validate), errors printed beside every
simulated figure and marked pass/fail against the limits (TTFT p50 10%, p99 20%)."""

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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with every request's two TTFTs).")
def validate(spec_file: Path, as_json: bool) -> None:
    """Run SPEC's cluster executed (real instance processes, real prefill and pulls), fit the serving-time model to
    what its instances measured in that run, simulate the same requests with the same arrival times, routing,
    instances, capacities and sharing, and print TTFT p50/p99 and throughput of both with the relative errors
    (pass: |p50| < 10%, |p99| < 20%). SPEC is a YAML file: name, tiers (one instance's tier map) and the keys of a
    `kind: cluster` job (trace, max_requests, instances, sharing, pull, index, transport, link, policy,
    capacity_blocks, block_kib, time_scale, namespaces); e.g. configs/cluster/validate-3.yaml. Exits 1 when the
    check fails."""
    from tieremu.cluster.validate import P50_LIMIT, P99_LIMIT, load_validate_spec, run_validation

    spec = load_validate_spec(spec_file)  # every key checked before any process starts
    report = run_validation(spec)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=_jsonable))
    else:
        Console(width=120).print(_table(report, P50_LIMIT, P99_LIMIT))
    if not report.validation.passed:
        raise SystemExit(1)


def _jsonable(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _table(r: ValidationReport, p50_limit: float, p99_limit: float) -> Table:
    v = r.validation
    where = "namespaces" if r.namespaces else "loopback"
    table = Table(title=f"cluster validate {r.spec}: {r.instances} instances, sharing {r.sharing} (pull {r.pull}), "
                        f"{r.requests} requests, time scale {r.time_scale} ({where})")
    for column in ("figure", f"executed [{r.executed_origin}]", f"simulated [{r.simulated_origin}]", "error",
                   "limit", "check"):
        table.add_column(column, justify="right")
    rows = [("TTFT p50 ms", "ttft_p50_ms", v.ttft_p50_error, p50_limit),
            ("TTFT p99 ms", "ttft_p99_ms", v.ttft_p99_error, p99_limit),
            ("throughput tokens/s", "throughput_tokens_per_s", v.throughput_error, None)]
    for name, key, error, limit in rows:
        verdict = "-" if limit is None or error is None else ("pass" if abs(error) < limit else "FAIL")
        table.add_row(name, f"{v.executed.get(key, math.nan):.1f}", f"{v.simulated.get(key, math.nan):.1f}",
                      "-" if error is None else f"{error:+.1%}", "-" if limit is None else f"{limit:.0%}", verdict)
    fit = r.model.get("fit") or {}
    hits = ", ".join(f"{k} {r.executed_hits[k]:.3f}/{r.simulated_hits[k]:.3f}" for k in ("local", "peer", "miss"))
    table.caption = (f"{'PASS' if v.passed else 'FAIL'}; per-request TTFT error p50 {r.per_request_error_p50:.1%}, "
                     f"p90 {r.per_request_error_p90:.1%}; hit ratio executed/simulated: {hits}; model "
                     f"{r.model['name']} fitted on {fit.get('samples', 0)} requests (mean error "
                     f"{fit.get('mean_rel', math.nan):.1%}): {r.model['base_s'] * 1e3:.2f} ms + "
                     f"{r.model['prefill_token_s'] * 1e6:.2f} us per computed token, CPU contention "
                     f"{r.contention:.2f} per other busy instance; pull "
                     f"{r.pull_block_ms:.2f} ms per block ({'measured' if r.pull_measured else 'link + probe'}); "
                     f"executed wall {r.executed_wall_s:.1f} s")
    return table
