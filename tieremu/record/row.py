"""One figure of one run, as every job emits it and every report reads it (a line of metrics.jsonl).

Metric names the report knows (any other is still tabulated, generically):
- samples, reported as p50 / p99 / max: `ttft_ms` (one row per request), `tpot_ms` (one row per token);
- single figures: `tokens_per_s`, `hit_ratio` (tier None: overall; else per tier), `strr`, `star`,
  `migration_gbps`, `kv_bytes_per_token` (per tier), `injected_delay_s` (per emulated tier);
- counters, summed per run: `promotions`, `demotions`, `ping_pongs`, `evictions`;
- probe figures per tier: `latency_ns`, `read_gb_per_s` (and write/copy), `loaded_latency_ns` with params
  `mix` and `traffic_gb_per_s` (bandwidth-latency curves).
A row whose params carry `time_s` is a time sample (migrations over time are plotted from those).
What each metric means, its unit and direction: tieremu.record.catalogue.

Facets, typed: `tier` (None: the whole run), `phase` (None, or when in the run: placement at `start` / `end`),
`seq` (which sample of the run: token, request, hop, epoch; None for a single figure), and `params`: the run's
labels (policy, swept values, rep) stamped by the sweep, then whatever the job adds.
Schema 1 folders called `seq` `sample`; they are read all the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tieremu.errors import TieremuError
from tieremu.record.origin import ORIGINS

FIELDS = ("run", "job", "metric", "value", "unit", "origin", "tier", "phase", "seq", "params")
OLD_FIELDS = {"sample": "seq"}  # schema 1 names


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
    phase: str | None = None  # when in the run (start / end), None: the run as a whole
    seq: int | None = None  # index of the sample (token, request, epoch, hop); None for a single figure
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
        data = {OLD_FIELDS.get(k, k): v for k, v in data.items()}
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
                   phase=data.get("phase"), seq=data.get("seq"), params=params)

    def stamped(self, run: str, job: str, labels: dict[str, object]) -> MetricRow:
        """The row as the sweep records it: its run id and job, and the run's labels under its own params."""
        return replace(self, run=run, job=job, params={**labels, **self.params})

    @property
    def policy(self) -> str | None:
        policy = self.params.get("policy")
        return None if policy is None else str(policy)

    @property
    def column(self) -> str:
        """The metric's name in a table: `hit_ratio[dram]` for a per-tier figure."""
        return self.metric if self.tier is None else f"{self.metric}[{self.tier}]"

