"""`tieremu cluster replay --mode simulate` (called by tieremu/cli/cluster.py): a request trace over a simulated
cluster of serving instances under a router; and `tieremu cluster fit-servtime`: fit the serving-time model from
timed iterations of tieremu's decode model.

Every setting is checked (router and its parameters, --pd against --instances, the SLO, the cluster spec and the
serving-time model) before the trace is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

SHIPPED = Path(__file__).resolve().parents[2] / "configs"


def _shipped(*parts: str) -> str:
    path = SHIPPED.joinpath(*parts)
    return str(path if path.exists() else Path("configs", *parts))


def simulate(trace: str, router_specs: tuple[str, ...], instances: int, pd_text: str | None, slo_ms: float | None,
             sharing: str, policy: str, tiers_file: str | None, servtime: str, max_requests: int | None,
             token_budget: int, max_batch: int, as_json: bool) -> None:
    """Simulate TRACE (Mooncake JSONL) over a cluster of serving instances: routing, per-instance tiered KV caches,
    peer pulls, P/D handoffs and continuous batching, all simulated. Reports TTFT/TPOT tails, SLO attainment,
    rejected requests, load imbalance (max/mean requests per instance), hit ratios (local by tier, peer, miss), link
    bytes and, with prices in the spec, cost per million tokens."""
    from tieremu.cluster.routers import parse_router
    from tieremu.cluster.servtime import reference
    from tieremu.cluster.simulate import SimSettings, check_settings, load_cluster_spec, parse_pd, simulate_cluster
    from tieremu.cluster.validate import load_servtime
    from tieremu.policy.registry import get_policy
    from tieremu.workloads.trace import read_trace

    routers = [parse_router(spec) for spec in router_specs]
    pd = parse_pd(pd_text) if pd_text is not None else None
    check_settings(instances, sharing, pd, slo_ms, token_budget, max_batch)
    get_policy(policy)  # an unknown or offline policy is refused before the trace is read
    spec = load_cluster_spec(tiers_file or _shipped("cluster", "sim-hbm-dram.yaml"))
    model, validation = (reference(), None) if servtime == "reference" else load_servtime(servtime)
    requests = read_trace(trace)
    if max_requests is not None:
        requests = requests[:max_requests]
    results = []
    for router in routers:
        settings = SimSettings(instances=instances, router=router, sharing=sharing, pd=pd, slo_ms=slo_ms,
                               token_budget=token_budget, max_batch=max_batch, policy=policy)
        result = simulate_cluster(requests, spec, settings, model).to_dict()
        # The model's validation against the executed cluster, beside every result; null says it had none.
        result["validation"] = validation
        results.append(result)
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2, default=_jsonable))
        return
    console = Console(width=120)
    for result in results:
        console.print(_table(result))


def _jsonable(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _table(d: dict) -> Table:
    table = Table(title=f"cluster simulation ({d['origin']}): {d['router']['router']}, {d['n_instances']} instances, "
                        f"policy {d['policy']}"
                        f"{', P/D ' + ':'.join(map(str, d['pd'])) if d['pd'] else ''}, sharing {d['sharing']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    hr = d["hit_ratio"]
    v = d.get("validation")
    ttft_error = throughput_error = " (not validated: `tieremu cluster validate`)"
    if v is not None:  # what the validation of this serving-time model found, beside the figures it bears on
        ttft_error = f" (validated: {v['ttft_p50_error']:+.1%} / {v['ttft_p99_error']:+.1%})"
        throughput_error = "" if v.get("throughput_error") is None else f" (validated: {v['throughput_error']:+.1%})"
    rows = [
        ("requests (completed / rejected)", f"{d['requests']} ({d['completed']} / {d['rejected']})"),
        ("TTFT p50 / p99 ms", f"{d['ttft_ms']['p50']:.1f} / {d['ttft_ms']['p99']:.1f}{ttft_error}"),
        ("TPOT p50 / p99 ms", f"{d['tpot_ms']['p50']:.2f} / {d['tpot_ms']['p99']:.2f}"),
        ("SLO attainment", "-" if d["slo_attainment"] is None else f"{d['slo_attainment']:.3f}"),
        ("load imbalance (max/mean)", f"{d['load_imbalance']:.2f}"),
        ("hit ratio local / peer / miss", f"{hr['local']:.3f} / {hr['peer']:.3f} / {hr['miss']:.3f}"),
        ("local hits by tier", ", ".join(f"{k} {v:.3f}" for k, v in hr["by_tier"].items())),
        ("peer / P-D link GB", f"{d['peer_bytes'] / 1e9:.2f} / {d['pd_bytes'] / 1e9:.2f}"),
        ("throughput tokens/s", f"{d['throughput_tokens_per_s']:.0f}{throughput_error}"),
        ("cost per Mtok / tokens per $", "-" if d["cost_per_mtok"] is None else
         f"${d['cost_per_mtok']:.4f} / {d['tokens_per_dollar']:.0f}"),
        ("serving-time model", f"{d['servtime']['name']} ({d['servtime']['origin']})"),
        ("wall s / events", f"{d['wall_s']:.2f} / {d['events']}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


@click.command("fit-servtime")
@click.option("--engine", type=click.Choice(["tieremu", "vllm"]), default="tieremu", show_default=True,
              help="Time tieremu's own decode model, or vLLM's CPU build serving the tiny Llama (its own process).")
@click.option("--preset", default="tiny", show_default=True,
              help="tieremu engine: the model preset to time (tiny, small, 1b).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed repeats per iteration shape (the median is fitted).")
@click.option("--tiers", "tiers_file", type=click.Path(dir_okay=False), default=None,
              help="tieremu engine: decode over the tiered KV cache of this tier map (all in its first memory tier, "
                   "split, all in its second) to fit a cost per byte for the slower tier (emulated tiers: the fit "
                   "is labelled emulated).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder the model's JSON is written to (created if missing).")
@click.option("--name", default=None, metavar="FILE",
              help="File name of the model in --out (default: servtime-<engine>-<preset>.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the fitted model's summary as JSON.")
def fit_servtime(engine: str, preset: str, repeats: int, tiers_file: str | None, out_dir: Path, name: str | None,
                 as_json: bool) -> None:
    """Time prefill and decode iterations of tieremu's decode model (or vLLM's) on this machine, fit the
    serving-time model (least squares) and write it with the fit's error."""
    from tieremu.errors import ConfigError

    file_name = name or f"servtime-{engine}-{preset if engine == 'tieremu' else 'tiny'}.json"
    if Path(file_name).name != file_name or file_name in (".", ".."):
        raise ConfigError(f"--name {file_name!r}: a file name, not a path (the folder is --out)")
    out = out_dir / file_name
    if engine == "tieremu":
        from tieremu.workloads.llama import preset as model_preset

        model_preset(preset)  # an unknown preset is refused before any timing
    if tiers_file is not None:
        from tieremu.tiers.config import load_tier_map

        load_tier_map(tiers_file)  # a bad tier map is refused before any timing
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create the folder ({exc.strerror})") from None
    if engine == "vllm":
        from tieremu.cluster.servtime_vllm import measure_and_fit_vllm

        model = measure_and_fit_vllm(repeats=repeats)
    else:
        from tieremu.cluster.servtime import measure_and_fit

        model = measure_and_fit(preset, repeats=repeats, tiers_file=tiers_file)
    model.save(out)
    fit = model.fit
    if as_json:
        click.echo(json.dumps({"model": str(out), "name": model.name, "samples": fit.samples if fit else 0,
                               "mean_rel_error": fit.mean_rel if fit else None,
                               "max_rel_error": fit.max_rel if fit else None}))
        return
    click.echo(f"{out}: {model.name}, fit over {fit.samples if fit else 0} shapes, mean relative error "
               f"{fit.mean_rel if fit else float('nan'):.1%}, max {fit.max_rel if fit else float('nan'):.1%}")
