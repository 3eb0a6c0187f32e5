"""Simulated against executed: the relative errors of TTFT p50, p99 and throughput on the same configuration and
trace prefix (the `cluster validate` of the scheduling issue; the executed side is the executed cluster's result).

An error is (simulated - executed) / executed; the check passes when |TTFT p50 error| < 10% and |p99 error| < 20%.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from tieremu.errors import ConfigError

P50_LIMIT = 0.10
P99_LIMIT = 0.20
THROUGHPUT_KEYS = ("throughput_tokens_per_s", "tokens_per_s")


@dataclass(frozen=True)
class Validation:
    ttft_p50_error: float
    ttft_p99_error: float
    throughput_error: float | None  # None when either side reports no throughput
    simulated: dict[str, float]
    executed: dict[str, float]
    passed: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _figures(result: Mapping[str, object], side: str) -> dict[str, float]:
    ttft = result.get("ttft_ms")
    if not isinstance(ttft, Mapping) or not all(isinstance(ttft.get(k), int | float) for k in ("p50", "p99")):
        raise ConfigError(f"the {side} result has no ttft_ms with p50 and p99; give a cluster result JSON")
    out = {"ttft_p50_ms": float(ttft["p50"]), "ttft_p99_ms": float(ttft["p99"])}
    for key in THROUGHPUT_KEYS:
        value = result.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out["throughput_tokens_per_s"] = float(value)
            break
    return out


def _error(simulated: float, executed: float) -> float:
    if executed == 0:
        return 0.0 if simulated == 0 else math.inf
    return (simulated - executed) / executed


def compare(simulated: Mapping[str, object], executed: Mapping[str, object]) -> Validation:
    """The errors of a simulated result against an executed one (both as their JSON dicts)."""
    sim, exe = _figures(simulated, "simulated"), _figures(executed, "executed")
    p50 = _error(sim["ttft_p50_ms"], exe["ttft_p50_ms"])
    p99 = _error(sim["ttft_p99_ms"], exe["ttft_p99_ms"])
    throughput = None
    if "throughput_tokens_per_s" in sim and "throughput_tokens_per_s" in exe:
        throughput = _error(sim["throughput_tokens_per_s"], exe["throughput_tokens_per_s"])
    return Validation(ttft_p50_error=p50, ttft_p99_error=p99, throughput_error=throughput, simulated=sim,
                      executed=exe, passed=abs(p50) < P50_LIMIT and abs(p99) < P99_LIMIT)
