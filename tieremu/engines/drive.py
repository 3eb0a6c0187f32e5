"""A trace's prompts against an OpenAI server (a real server process): each request sent at its time-scaled arrival
on its own connection, its tokens streamed back and stamped as they arrive; the result has the offline arm's shape
(tieremu.engines.arm.ArmResult), so both are summarised by the same code.

TTFT is the time from a request's scheduled arrival to the first streamed event carrying a token, TPOT the time from
there to its last token over the tokens after the first, both on the client's clock (HTTP and the server's
streaming included, as a user of the server sees them). The connector's figures come from the stats file it writes
inside the server (tieremu.engines.vllm); `wait_stats` waits until it has seen every request finish.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tieremu.engines.arm import ArmResult
from tieremu.engines.client import Endpoint, Streamed, stream_completion
from tieremu.engines.procs import EngineError
from tieremu.errors import TieremuError


def drive(ep: Endpoint, model: str, prompts: Sequence[Sequence[int]], output_tokens: Sequence[int],
          arrivals_s: Sequence[float], timeout_s: float, construct_s: float = 0.0) -> ArmResult:
    """Every prompt streamed at its arrival (seconds after the start); EngineError on the first request that fails
    or when the run passes timeout_s. Stops at nothing partial: either every request completed or an error."""
    n = len(prompts)
    done: list[Streamed | None] = [None] * n
    failed: list[BaseException] = []

    def one(i: int) -> None:
        try:
            done[i] = stream_completion(ep, model, list(prompts[i]), output_tokens[i], timeout_s)
        except BaseException as exc:  # reported by the main thread
            failed.append(exc)

    start = time.monotonic()
    deadline = start + timeout_s
    threads = []
    for i in range(n):
        while (wait := start + arrivals_s[i] - time.monotonic()) > 0:
            _check(failed)
            time.sleep(min(wait, 0.05))  # waiting for the request's arrival time, as the trace says
        thread = threading.Thread(target=one, args=(i,), name=f"tieremu-request-{i}", daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        while thread.is_alive():
            _check(failed)
            if time.monotonic() > deadline:
                raise EngineError(f"the server did not finish the {n} requests within {timeout_s:g} s "
                                  f"({sum(d is not None for d in done)} done)")
            thread.join(0.1)
    _check(failed)
    wall = max(d.last_token_s for d in done if d is not None) - start
    streamed = [d for d in done if d is not None]
    assert len(streamed) == n
    for i, (d, prompt) in enumerate(zip(streamed, prompts, strict=True)):
        if d.prompt_tokens is not None and d.prompt_tokens != len(prompt):
            raise EngineError(f"request {i}: the server counted {d.prompt_tokens} prompt tokens, tieremu sent "
                              f"{len(prompt)}")
    arrived = [start + a for a in arrivals_s]
    result = ArmResult(
        ttft_s=[d.first_token_s - t for d, t in zip(streamed, arrived, strict=True)],
        finish_s=[d.last_token_s - t for d, t in zip(streamed, arrived, strict=True)],
        prompt_tokens=[len(p) for p in prompts], cached_tokens=[d.cached_tokens or 0 for d in streamed],
        output_token_ids=[d.token_ids for d in streamed], wall_s=wall, construct_s=construct_s)
    result.cached_reported = all(d.cached_tokens is not None for d in streamed)
    return result


def _check(failed: list[BaseException]) -> None:
    if failed:
        exc = failed[0]
        if isinstance(exc, TieremuError):
            raise EngineError(f"a request failed: {exc}") from exc
        raise EngineError(f"a request failed: {type(exc).__name__}: {exc}") from exc


def read_stats(path: Path) -> dict[str, object]:
    """The connector's stats file (tieremu.engines.vllm.Shared.write_stats); EngineError when it is missing or not
    the connector's."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"connector stats {path}: no such file; the server's connector writes it when its "
                          "kv_connector_extra_config has \"stats_file\" (once its KV cache is allocated)") from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"connector stats {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict) or not {"connector", "finished_requests", "kv_placement"} <= set(data):
        raise EngineError(f"connector stats {path}: not a stats file of tieremu's connector")
    return data


def wait_stats(path: Path, finished: int, timeout_s: float = 30.0) -> dict[str, object]:
    """The stats once the connector has seen `finished` requests finish (it writes them after each), EngineError
    if it does not within timeout_s: figures that miss requests are never passed off as the run's."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = read_stats(path)
        seen = data["finished_requests"]
        assert isinstance(seen, int)
        if seen >= finished:
            return data
        if time.monotonic() > deadline:
            raise EngineError(f"connector stats {path}: the connector saw {seen} requests finish, {finished} were "
                              f"expected, after {timeout_s:g} s")
        time.sleep(0.05)  # the connector writes the file after each request it lets go of


TIER_FORMAT_KEYS = ("format", "layout", "ratio", "block_bytes", "raw_block_bytes")


def delta(after: Mapping[str, object], before: Mapping[str, object],
          keep: Sequence[str] = ("resident_by_tier", "block_tokens", "policy", "tier_map", "kv_tier")) -> dict:
    """What changed between two snapshots of a server's counters (numbers and dicts of numbers subtracted; `keep`
    and anything else taken from `after`): a running server's figures for this run alone."""
    out: dict[str, object] = {}
    for key, value in after.items():
        old = before.get(key)
        if key in keep or isinstance(value, bool) or value is None:
            out[key] = value
        elif isinstance(value, int | float) and isinstance(old, int | float):
            out[key] = value - old
        elif isinstance(value, dict) and isinstance(old, dict):
            # A compressed tier's format figures are properties, not counters (store.TierCompressionStats).
            out[key] = delta(value, old, keep=TIER_FORMAT_KEYS)
        else:
            out[key] = value
    return out
