"""`tieremu engine replay`: a Mooncake trace against a real serving engine (vLLM's CPU build) whose KV connector
stores blocks in tieremu's tiers. The engine package is imported only when the command runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tieremu.cli.replay import Number, parse_params
from tieremu.numbers import MAX_SECONDS


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))

@click.group()
def engine() -> None:
    """Real serving engines (vLLM's CPU build) on tieremu's tiers."""


@engine.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--engine", "engine_name", default="vllm", show_default=True, help="The serving engine (vllm).")
@click.option("--tiers", "tier_file", default=None, type=click.Path(dir_okay=False),
              help="Tier map of the connector's store (each tier needs capacity_mib); needed unless --server.")
@click.option("--policy", default="lru", show_default=True, help="Placement policy of the store.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A policy parameter (repeatable).")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="A local Hugging Face model directory; default: a tiny Llama built here from a fixed seed.")
@click.option("--kv-tier", default=None,
              help="Place the engine's own KV tensor on this tier's node (an emulated tier: on its host node, vLLM's "
                   "attention reads charged its timing model, labelled as modelled).")
@click.option("--max-requests", type=click.IntRange(min=1), default=None, help="Only the first N requests.")
@click.option("--block-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per trace hash id; also the engine's KV block size.")
@click.option("--max-output-tokens", type=click.IntRange(min=1), default=None,
              help="Cap each request's output tokens (default: the trace's output_length).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="Model and KV dtype (bf16 linear layers are ~3x slower on CPUs without AMX).")
@click.option("--time-scale", type=Number(0, 1e6), default=0.2, show_default=True,
              help="Wall seconds per trace second.")
@click.option("--timeout", "timeout_s", type=Number(0, MAX_SECONDS), default=900.0, show_default=True,
              help="Seconds an engine run may take before it is stopped.")
@click.option("--check-outputs", is_flag=True,
              help="Run again without the connector and compare generated token ids (vLLM's prefix cache off): "
                   "per request, whether they match and the first generated token where they diverge. A difference "
                   "is an error unless a tier of the map is compressed (lossy: then it is reported).")
@click.option("--serve", is_flag=True,
              help="Start vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server) with tieremu's connector "
                   "and stream the trace to it over HTTP; the server is always stopped afterwards. Default: the "
                   "offline in-process engine.")
@click.option("--server", "server_url", default=None, metavar="URL",
              help="Drive a running vLLM OpenAI server at URL (e.g. http://127.0.0.1:8000) instead; its engine and "
                   "connector are as it was started (no --tiers, --kv-tier, --check-outputs).")
@click.option("--connector-stats", type=click.Path(dir_okay=False), default=None,
              help="With --server: the stats_file its connector writes (kv_connector_extra_config), for the "
                   "connector's figures of this run.")
@click.option("--start-timeout", "start_timeout_s", type=Number(0, MAX_SECONDS), default=600.0, show_default=True,
              help="Seconds a server started by --serve may take to answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def engine_replay_cmd(trace: str, engine_name: str, tier_file: str | None, policy: str, params: tuple[str, ...],
                      model: str | None, kv_tier: str | None, max_requests: int | None, block_tokens: int,
                      max_output_tokens: int | None, dtype: str, time_scale: float, timeout_s: float,
                      check_outputs: bool, serve: bool, server_url: str | None, connector_stats: str | None,
                      start_timeout_s: float, as_json: bool) -> None:
    """Replay a Mooncake-format TRACE against a real engine whose KV connector stores blocks in tieremu's tiers:
    offline in process (default), on a vLLM OpenAI server tieremu starts (--serve), or on a running one
    (--server URL)."""
    from tieremu.engines.replay import EngineReplayConfig, engine_replay
    from tieremu.workloads.trace import read_trace

    requests = read_trace(trace)[:max_requests]
    result = engine_replay(EngineReplayConfig(
        trace_requests=requests, tiers=None if tier_file is None else Path(tier_file), policy=policy,
        policy_params=parse_params(params), engine=engine_name, model=None if model is None else Path(model),
        kv_tier=kv_tier, block_tokens=block_tokens, check_outputs=check_outputs, dtype=dtype, time_scale=time_scale,
        timeout_s=timeout_s, max_output_tokens=max_output_tokens, serve=serve, server=server_url,
        connector_stats=None if connector_stats is None else Path(connector_stats), start_timeout_s=start_timeout_s))
    if as_json:
        _print_json(result.to_dict())
    else:
        hits = result.connector.get("hits_by_tier", {})
        via = {"offline": "in process", "serve": "on a server started here",
               "server": f"on the server at {result.server_url}"}[result.driver]
        click.echo(f"{result.engine} on {result.model} ({via}): {result.requests} requests, policy {result.policy} "
                   f"({result.origin})")
        click.echo(f"TTFT p50 {result.ttft_ms.p50:.1f} ms p99 {result.ttft_ms.p99:.1f} ms; TPOT p50 "
                   f"{result.tpot_ms.p50:.2f} ms p99 {result.tpot_ms.p99:.2f} ms; {result.tokens_per_s:.0f} tokens/s")
        if "stored_blocks" in result.connector:
            click.echo(f"connector: stored {result.connector['stored_blocks']} blocks, loaded "
                       f"{result.connector['loaded_blocks']}; hits by tier {hits}")
        else:
            click.echo(f"connector: no figures ({result.connector.get('source')})")
        compression = result.connector.get("compression")
        for tier, c in (compression.items() if isinstance(compression, dict) else ()):
            click.echo(f"tier {tier} holds blocks {c['format']} ({c['layout']} scales, {c['ratio']:.2f}x): "
                       f"{c['bytes_saved'] / 2**20:.1f} MiB not moved; compress {c['compress_s'] * 1e3:.1f} ms, "
                       f"decompress {c['decompress_s'] * 1e3:.1f} ms")
        if result.kv_placement is not None:
            p = result.kv_placement
            click.echo(f"KV tensor: tier {p['tier']} ({p['backing']}, tier nodes {p['tier_nodes']}) bound to node "
                       f"{p['requested_node']}: {p['achieved_fraction']:.1%} of {p['pages']} pages there")
            reads = p.get("attention_reads")
            if isinstance(reads, dict):
                click.echo(f"attention reads of the {reads['origin']} tier: {reads['charged_bytes'] / 2**20:.1f} MiB "
                           f"over {reads['layer_calls']} layer passes owe {reads['owed_ms']:.1f} ms by its timing "
                           f"model; {reads['injected_ms']:.1f} ms spun")
        if result.outputs_match is not None:
            click.echo(f"outputs match without the connector: {result.outputs_match}")
        check = result.outputs_check
        if check is not None and check.diverged:
            click.echo(f"outputs: {check.identical} requests identical, {check.diverged} diverged; the earliest at "
                       f"generated token {check.earliest_divergence}")
        for note in result.notes:
            click.echo(f"note: {note}")
    if result.outputs_match is False and not result.compressed_tiers:  # lossy tiers may change the text: reported
        raise click.ClickException(f"generated tokens differ with and without the connector for requests "
                                   f"{result.mismatched_requests[:10]}")

