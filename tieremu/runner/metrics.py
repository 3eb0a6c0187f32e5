"""One figure of one run, as every job emits it and every report reads it (a line of metrics.jsonl)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tieremu.errors import TieremuError

ORIGINS = ("measured", "emulated", "simulated", "vm")
FIELDS = ("run", "job", "metric", "value", "unit", "origin", "tier", "sample", "params")

# Metrics the report knows by name; any other metric is still tabulated generically.
SAMPLED = ("ttft_ms", "tpot_ms")  # one row per request / token: reported as p50, p99, max
STANDARD = (*SAMPLED, "tokens_per_s", "hit_ratio", "strr", "star", "migration_gbps", "promotions", "demotions",
            "ping_pongs", "evictions", "kv_bytes_per_token", "injected_delay_s", "latency_ns", "read_gb_per_s",
            "loaded_latency_ns")


class MetricRowError(TieremuError):
    """A metric row is malformed: a missing field, a value that is not a number, an unknown origin.

    (A subclass of TieremuError local to this module: jobs raise it through bad rows, the report turns it
    into a ReportError naming the file and line.)
    """


@dataclass(frozen=True)
class MetricRow:
    run: str
    job: str
    metric: str
    value: float
    unit: str
    origin: str  # measured | emulated | simulated | vm
    tier: str | None = None  # None: the figure is about the whole run, not one tier
    sample: int | None = None  # index of the sample (token, request, epoch, hop); None for a single figure
    params: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise MetricRowError(f"metric {self.metric!r}: origin {self.origin!r} is not valid; "
                                 f"valid: {', '.join(ORIGINS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise MetricRowError(f"metric {self.metric!r}: value {self.value!r} is not a number")
        if not self.metric:
            raise MetricRowError("a metric row needs a metric name")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # JSON has no NaN or infinity: a figure that could not be computed is written as null.
        if not math.isfinite(self.value):
            data["value"] = None
        return data

    @classmethod
    def from_dict(cls, data: Any) -> MetricRow:
        if not isinstance(data, dict):
            raise MetricRowError(f"expected a JSON object with keys {', '.join(FIELDS)}, got {type(data).__name__}")
        missing = [k for k in FIELDS[:6] if k not in data]
        unknown = sorted(set(data) - set(FIELDS))
        if missing or unknown:
            raise MetricRowError(f"not a metric row: missing {missing or 'nothing'}, unknown keys "
                                 f"{unknown or 'none'}; a row has: {', '.join(FIELDS)}")
        value = math.nan if data["value"] is None else data["value"]
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise MetricRowError(f"params must be an object, got {params!r}")
        return cls(run=str(data["run"]), job=str(data["job"]), metric=str(data["metric"]), value=value,
                   unit=str(data["unit"]), origin=str(data["origin"]), tier=data.get("tier"),
                   sample=data.get("sample"), params=params)

    def stamped(self, run: str, job: str, labels: dict[str, object]) -> MetricRow:
        """The row as the sweep records it: its run id and job, and the run's labels under its own params."""
        return replace(self, run=run, job=job, params={**labels, **self.params})
