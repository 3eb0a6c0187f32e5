"""Simulated against executed: the relative errors of TTFT p50, p99 and throughput on the same configuration and
trace prefix (`tieremu cluster validate SPEC`).

`run_validation` runs the executed cluster (tieremu.cluster.replay: real instance processes, real prefill, real
pulls) K times (`repeats`: on a shared machine one executed run moves as much as the target). Each run is then
simulated with the same arrival times (scaled by time_scale), round-robin routing, instance count, capacities and
sharing on the cluster simulator's serial serving (tieremu.cluster.simulate: one request at a time per instance, as
an executed instance serves), from the serving-time model fitted to what that run's instances measured (each
request's serve time against its local and computed blocks; the mean time of a pull): the model is anchored to the
run, as every emulation here is, because the machine's speed moves between runs (measured: runs at different loads
pooled into one fit gave a model that matched none of them). What is validated is then what the simulator adds to
the measured serving times: the queues, the routing, the caches and the sharing.

An error is (simulated - executed) / executed per run; the check takes the median over the K runs and passes when
|TTFT p50 error| < 10% and |p99 error| < 20%. Beside it the report gives the median of the executed runs per figure
with a distribution-free confidence interval, and a second comparison: one model fitted to all K runs pooled,
simulated once, against that median (`pooled`; its model is the one the report saves for `--servtime`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tieremu.cluster.instance import DEFAULT_OVERHEAD_S, local_tiers
from tieremu.cluster.job import ClusterJob, ClusterParams
from tieremu.cluster.replay import Checked, Cluster, _result, check, run_cluster
from tieremu.cluster.replay import ClusterSpec as ReplaySpec
from tieremu.cluster.result import ClusterResult
from tieremu.cluster.routers import RoundRobin
from tieremu.cluster.servtime import FEATURES, Sample, ServingTimeModel, fit
from tieremu.cluster.simulate import ClusterSim, Link, SimSettings, SimTierSpec
from tieremu.cluster.simulate import ClusterSpec as SimClusterSpec
from tieremu.configfile import Section, load_yaml
from tieremu.errors import ConfigError, WorkloadError
from tieremu.numbers import Range
from tieremu.record.origin import Origin
from tieremu.record.stats import LoadMeter, MachineLoad, MedianCI, Summary, median_ci
from tieremu.tiers.config import load_tier_map
from tieremu.workloads.execute import scaled_layout
from tieremu.workloads.simulate import Tail
from tieremu.workloads.trace import Request

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


# -- `tieremu cluster validate SPEC` -----------------------------------------------------------------------------

MAX_VALIDATE_REQUESTS = 5000  # the executed side runs in real time
DEFAULT_REPEATS = 3
MAX_REPEATS = 20  # each repeat is a whole executed run, in real time
REPEATS = Range(1, MAX_REPEATS, integer=True)


@dataclass(frozen=True)
class ValidateSpec:
    """A validation: one small executed configuration (the keys of a `kind: cluster` job) and its tier map."""

    name: str
    source: str
    tiers: str
    params: ClusterParams
    repeats: int = DEFAULT_REPEATS  # executed runs, the reference being their median

    def cluster_spec(self) -> ReplaySpec:
        p = self.params
        return ReplaySpec(trace=Path(p.trace), tiers=Path(self.tiers), instances=p.instances, sharing=p.sharing,
                          pull=p.pull, index=p.index, transport=p.transport, link=p.link, max_requests=p.max_requests,
                          namespaces=p.namespaces, policy=p.policy, capacity_blocks=p.capacity_blocks,
                          block_kib=p.block_kib, time_scale=p.time_scale)


def load_validate_spec(path: str | Path) -> ValidateSpec:
    """A validation spec file (configs/cluster/validate-*.yaml); see `parse_validate_spec`."""
    return parse_validate_spec(load_yaml(path))


def parse_validate_spec(doc: Section) -> ValidateSpec:
    """`name`, `tiers` (one instance's tier map), `repeats` (executed runs, 1..20, default 3) and the keys of a
    `kind: cluster` job (tieremu.cluster.job); no faults (the simulator has none), `max_requests` required. Every
    key checked, nothing started."""
    name = doc.get("name", str, doc.source.stem)
    try:
        repeats = doc.get("repeats", int, DEFAULT_REPEATS, valid=REPEATS)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the number of executed runs: an integer 1..{MAX_REPEATS})") from None
    tiers = doc.relative_path(doc.get("tiers", str))
    if not tiers.is_file():
        raise doc.error("tiers", f"{tiers}: no such tier map file")
    params = ClusterJob.parse(doc)  # the job's keys, checked; any other key is refused there
    if params.faults:
        raise doc.error("faults", "a validation runs without faults (the simulator injects none); remove the key")
    if params.pd is not None:
        raise doc.error("pd", "a validation serves round-robin without prefill/decode disaggregation; remove the key")
    if params.max_requests is None or params.max_requests > MAX_VALIDATE_REQUESTS:
        raise doc.error("max_requests", f"give 1..{MAX_VALIDATE_REQUESTS}: the executed cluster replays the prefix "
                                        "in real time")
    return ValidateSpec(name=name, source=str(doc.source), tiers=str(tiers), params=params, repeats=repeats)


def with_repeats(spec: ValidateSpec, repeats: int | None) -> ValidateSpec:
    """The spec with `--repeats` over its own (None: the spec's), checked before any work."""
    if repeats is None:
        return spec
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
        raise ConfigError(f"--repeats {repeats!r}: give an integer 1..{MAX_REPEATS} (the executed runs)")
    return replace(spec, repeats=repeats)


@dataclass(frozen=True)
class RequestPair:
    """One request of one executed run on both sides: where to look for a model gap."""

    index: int
    instance: int
    executed_ms: float
    simulated_ms: float
    serve_ms: float  # the executed instance's own time on it (its TTFT less its wait)
    local: int
    peer: int
    miss: int
    run: int = 0  # which executed run


@dataclass(frozen=True)
class ExecutedRun:
    """One of the K executed runs: its figures (computed as the simulated side's are) and the machine's load over it
    (a noisy run is flagged, and kept)."""

    run: int
    figures: dict[str, float]  # ttft_p50_ms, ttft_p99_ms, throughput_tokens_per_s
    completed: int
    pulls: int
    wall_s: float
    load: MachineLoad
    noisy: bool
    # The check's parts: this run simulated from a fit to this run alone, and its errors against this run (None: the
    # run served too few requests to fit).
    own_fit_simulated: dict[str, float] | None = None
    own_fit_errors: dict[str, float] | None = None


@dataclass(frozen=True)
class Reference:
    """One executed figure over the K runs: the median the simulation is compared with, a distribution-free
    confidence interval of that median (order statistics; when K is too small for 95%, `ci.reached` is False and the
    interval is min..max with the coverage it has), the runs' spread, and whether the simulated value lies inside
    the interval."""

    median: float
    ci: MedianCI
    min: float
    max: float
    cv: float  # coefficient of variation over the runs: sample stdev / mean (0 for one run)
    simulated: float
    simulated_inside: bool


def reference(values: Sequence[float], simulated: float) -> Reference:
    """The reference of one figure from its K executed values."""
    summary = Summary.of(list(values))
    ci = median_ci(values)
    return Reference(median=summary.median, ci=ci, min=summary.min, max=summary.max,
                     cv=summary.stdev / summary.mean if summary.mean else 0.0, simulated=simulated,
                     simulated_inside=ci.low <= simulated <= ci.high)


@dataclass(frozen=True)
class ValidationReport:
    """What `cluster validate` prints: the K executed runs, their median and its interval per figure, the simulated
    figures, their errors against the medians, the model the simulation used."""

    spec: str
    requests: int
    completed_executed: int  # the fewest any executed run completed
    completed_simulated: int
    instances: int
    sharing: str
    pull: str
    time_scale: float
    namespaces: bool
    validation: Validation  # its `executed` figures are the medians over the runs
    per_request_error_p50: float  # median over requests (of every run) of |simulated - executed| / executed TTFT
    per_request_error_p90: float
    model: dict[str, object]  # the serving-time model fitted from the executed instances' per-request times
    contention: float  # fitted: the slowdown each other busy instance causes (instances share the CPUs)
    pull_block_ms: float  # per pulled block, measured in the runs (or the probe's figure when nothing was pulled)
    pull_measured: bool
    executed_hits: dict[str, float]  # local / peer / miss shares of block references, all runs
    simulated_hits: dict[str, float]
    executed_origin: str
    simulated_origin: str
    executed_wall_s: float  # all runs together
    notes: tuple[str, ...]
    per_request: tuple[RequestPair, ...] = ()
    repeats: int = 1
    executed_runs: tuple[ExecutedRun, ...] = ()
    executed_median: dict[str, float] | None = None
    executed_reference: dict[str, Reference] | None = None  # per figure: median, CI, spread, pooled sim inside
    pooled: Validation | None = None  # one fit over every run, simulated once, against the executed median

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        for run, d in zip(self.executed_runs, out["executed_runs"], strict=True):
            d["load"] = run.load.to_dict()
        return out


@dataclass(frozen=True)
class _Served:
    """One request as an executed instance served it (the instance's `served` log)."""

    instance: int
    index: int
    local: int
    peer: int
    miss: int
    serve_s: float
    pull_s: float
    run: int = 0


@dataclass(frozen=True)
class _Run:
    """What one executed run left: its result, its instances' own reports, its TTFTs, the load over it."""

    index: int
    result: ClusterResult
    reports: list[dict]
    served: list[_Served]
    ttft_ms: dict[int, float]
    load: MachineLoad


def run_validation(spec: ValidateSpec) -> ValidationReport:
    """Execute the spec's cluster `spec.repeats` times; simulate each run from a model fitted to it (same arrival
    times, round-robin, instances, capacities, sharing, serial serving) and take the median of the runs' errors (the
    check); beside it, one model fitted to all runs pooled, simulated once, against the executed median."""
    checked = check(spec.cluster_spec())  # every input checked before any process or namespace exists
    scaled_layout(spec.params.block_kib, layers=1)  # a bad block_kib refused before any process starts too
    runs = [_execute_run(checked, k) for k in range(spec.repeats)]
    served = [s for run in runs for s in run.served]
    if len(served) < len(FEATURES):
        raise WorkloadError(f"cluster validate: {len(served)} requests served; the fit needs {len(FEATURES)} or more "
                            "(raise max_requests)")
    requests = checked.requests
    trace0 = requests[0].arrival_s
    arrivals = [(r.arrival_s - trace0) * checked.spec.time_scale for r in requests]
    fitted = _fit_and_simulate(checked, runs, arrivals)  # beside the check: one fit over every run
    model, contention, pull_s, measured, never, sim = fitted
    sim_ttft = _sim_ttft(sim)
    tokens = [r.input_length for r in requests]
    simulated = _side(sim_ttft, arrivals, tokens)
    executed = [_figures(_side(run.ttft_ms, arrivals, tokens), "executed") for run in runs]
    sim_figures = _figures(simulated, "simulated")
    # The check: each run simulated from its own fit (no executed time added), its errors against that run.
    own: list[dict[str, float] | None] = [sim_figures] if len(runs) == 1 else [
        _figures(_side(_sim_ttft(_fit_and_simulate(checked, [run], arrivals)[-1]), arrivals, tokens), "simulated")
        if len(run.served) >= len(FEATURES) else None for run in runs]
    refs = {key: reference([e[key] for e in executed], sim_figures[key]) for key in sim_figures
            if all(key in e for e in executed)}
    medians = {key: ref.median for key, ref in refs.items()}
    pooled = compare(simulated, {"ttft_ms": {"p50": medians["ttft_p50_ms"], "p99": medians["ttft_p99_ms"]},
                                 **{k: v for k, v in medians.items() if k == "throughput_tokens_per_s"}})
    anchored = [(o, e) for o, e in zip(own, executed, strict=True) if o is not None]
    validation = pooled if not anchored else anchored_validation(anchored, medians)
    pairs = tuple(RequestPair(s.index, s.instance, run.ttft_ms[s.index], sim_ttft[s.index], s.serve_s * 1e3,
                              s.local, s.peer, s.miss, k)
                  for k, run in enumerate(runs) for s in sorted(run.served, key=lambda s: s.index)
                  if s.index in run.ttft_ms and s.index in sim_ttft)
    per_request = sorted(abs(p.simulated_ms - p.executed_ms) / p.executed_ms for p in pairs if p.executed_ms > 0)
    hits = [sum(getattr(s, k) for s in served) for k in ("local", "peer", "miss")]
    inst = sim.inst
    sim_hits = [sum(sum(i.hits) for i in inst), sum(i.peer_hits for i in inst), sum(i.misses for i in inst)]
    notes = list(dict.fromkeys(note for run in runs for note in run.result.notes))
    if never and spec.params.sharing == "p2p":
        notes.append("the executed instances recomputed every peer-held block (their estimate said so): the "
                     "simulation does too")
    elif not measured and spec.params.sharing == "p2p":
        notes.append("no block was pulled in the executed runs: the simulated pull cost is the link's plus the "
                     "instances' probed overhead")
    noisy = [k for k, run in enumerate(runs) if run.load.noisy]
    if noisy:
        notes.append(f"executed run(s) {', '.join(map(str, noisy))} ran on a noisy machine (load or steal time over "
                     "the limits): kept in the median, flagged")
    if not all(ref.ci.reached for ref in refs.values()):
        notes.append(f"{spec.repeats} executed run(s) are too few for a 95% confidence interval of the median (6 or "
                     "more are needed): the interval shown is min..max, with the coverage it has")
    first = runs[0].result
    return ValidationReport(
        spec=spec.name, requests=len(requests), completed_executed=min(len(run.ttft_ms) for run in runs),
        completed_simulated=len(sim_ttft), instances=checked.spec.instances, sharing=checked.spec.sharing,
        pull=checked.spec.pull, time_scale=checked.spec.time_scale, namespaces=first.namespaces,
        validation=validation, per_request_error_p50=_quantile(per_request, 0.5),
        per_request_error_p90=_quantile(per_request, 0.9), model=model.to_dict(), contention=contention,
        pull_block_ms=pull_s * 1e3, pull_measured=measured, executed_hits=_shares(hits),
        simulated_hits=_shares(sim_hits), executed_origin=first.origin, simulated_origin=Origin.SIMULATED.value,
        executed_wall_s=math.fsum(run.result.wall_s for run in runs), notes=tuple(notes), per_request=pairs,
        repeats=spec.repeats,
        executed_runs=tuple(ExecutedRun(run=k, figures=e, completed=len(run.ttft_ms),
                                        pulls=sum(len(r["pull_ms"]) for r in run.reports), wall_s=run.result.wall_s,
                                        load=run.load, noisy=run.load.noisy, own_fit_simulated=o,
                                        own_fit_errors=None if o is None else {
                                            key: _error(o[key], e[key]) for key in o if key in e})
                            for k, (run, e, o) in enumerate(zip(runs, executed, own, strict=True))),
        executed_median=medians, executed_reference=refs, pooled=pooled)


def anchored_validation(pairs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]],
                        executed_median: Mapping[str, float]) -> Validation:
    """The check over (simulated from its own fit, executed) figure pairs, one per run: per figure the median over
    the runs of (simulated - executed) / executed, and the median of the simulated figures; `executed` is the
    executed runs' median (all runs)."""
    def median_error(key: str) -> float | None:
        errors = [_error(sim[key], exe[key]) for sim, exe in pairs if key in sim and key in exe]
        return statistics.median(errors) if errors else None

    p50, p99 = median_error("ttft_p50_ms"), median_error("ttft_p99_ms")
    assert p50 is not None and p99 is not None  # every figure set has both TTFTs (_figures)
    simulated = {key: statistics.median(sim[key] for sim, _ in pairs) for key in pairs[0][0]}
    return Validation(ttft_p50_error=p50, ttft_p99_error=p99, throughput_error=median_error("throughput_tokens_per_s"),
                      simulated=simulated, executed=dict(executed_median),
                      passed=abs(p50) < P50_LIMIT and abs(p99) < P99_LIMIT)


def _fit_and_simulate(checked: Checked, runs: Sequence[_Run], arrivals: Sequence[float]
                      ) -> tuple[ServingTimeModel, float, float, bool, bool, ClusterSim]:
    """The model fitted to the runs' served requests pooled (each run's overlaps its own), the pull time per block
    over all their pulls, and the simulation of the requests with them: (model, contention, pull seconds per block,
    whether pulls were measured, whether the instances never pulled, the simulation)."""
    layout = scaled_layout(checked.spec.block_kib, layers=1)
    served = [s for run in runs for s in run.served]
    overlap = {}  # which instances were busy together is each run's own
    for run in runs:
        overlap |= {(run.index, i): v for i, v in _overlap(run.served, run.ttft_ms, arrivals).items()}
    model, contention = fit_executed(served, overlap, layout.block_bytes, layout.block_tokens)
    pull_s, measured = _pull_block_s([r for run in runs for r in run.reports], checked, layout.block_bytes)
    # The executed instances decided pull or recompute per request; when they never pulled, neither does the
    # simulation (its own cost comparison decides only where they did both).
    never = sum(run.result.decisions.get("pull", 0) for run in runs) == 0
    sim = _simulate(checked, model, contention, pull_s, layout.block_bytes, layout.block_tokens, arrivals,
                    "none" if never else checked.spec.sharing)
    return model, contention, pull_s, measured, never, sim


def _sim_ttft(sim: ClusterSim) -> dict[int, float]:
    return {q.index: (q.first_token - q.arrival) * 1e3 for q in sim.reqs if q.first_token >= 0}


def _execute_run(checked: Checked, k: int) -> _Run:
    """Executed run k, the machine's load measured over it."""
    meter = LoadMeter()
    cluster, result = _execute(checked)
    load = meter.stop()
    reports = [p.result for p in cluster.procs.values() if p.result is not None]
    served = [_Served(p.me, *row, run=k) for p in cluster.procs.values() if p.result is not None
              for row in p.result["served"]]
    return _Run(index=k, result=result, reports=reports, served=served, ttft_ms=dict(cluster.ttft), load=load)


CONTENTION_GRID = tuple(k / 20 for k in range(41))  # 0 to 2 in steps of 0.05


def fit_executed(served: Sequence[_Served], overlap: Mapping[tuple[int, int], float], block_bytes: int,
                 block_tokens: int) -> tuple[ServingTimeModel, float]:
    """The serving-time model of the executed instances and their CPU contention. Each request's serve time less its
    pulls is (base + per computed token (the misses' blocks, whole) + per byte read locally) x (1 + contention x the
    mean number of other instances busy while it was served): for each contention on a grid the model is fitted
    (tieremu.cluster.servtime.fit, on seconds) to the serve times divided by that factor, and the contention whose
    fit leaves the least squared error in seconds wins. `served` may pool several runs: `overlap` is keyed by
    (run, request index), each run's overlaps its own."""
    best: tuple[float, ServingTimeModel, float] | None = None
    runs = len({s.run for s in served})
    for contention in CONTENTION_GRID:
        factor = [1 + contention * overlap.get((s.run, s.index), 0.0) for s in served]
        samples = [Sample(prefill_tokens=s.miss * block_tokens, decode_seqs=0, kv_bytes=s.local * block_bytes,
                          seconds=max(s.serve_s - s.pull_s, 1e-9) / f) for s, f in zip(served, factor, strict=True)]
        model = fit(samples, name="executed-instances", kv_bytes_per_token=max(1, block_bytes // block_tokens),
                    relative=False,
                    source=f"measured: {len(samples)} requests served by the executed instances of {runs} run(s) "
                           f"(serve time less pulls against local and computed blocks, CPU contention "
                           f"{contention:.2f} per other busy instance; shared vCPUs)")
        error = math.fsum((model.predict(x) * f - x.seconds * f) ** 2 for x, f in zip(samples, factor, strict=True))
        if best is None or error < best[0]:
            best = (error, model, contention)
    assert best is not None
    return best[1], best[2]


def _overlap(served: Sequence[_Served], ttft_ms: Mapping[int, float], arrivals: Sequence[float]) -> dict[int, float]:
    """Per request of one run: the mean number of other instances serving while the executed instance served it."""
    spans = [(s.instance, arrivals[s.index] + ttft_ms[s.index] / 1e3 - s.serve_s, arrivals[s.index]
              + ttft_ms[s.index] / 1e3, s.index) for s in served if s.index in ttft_ms]
    out = {}
    for me, start, end, index in spans:
        if end <= start:
            continue
        busy = math.fsum(max(0.0, min(end, e) - max(start, b)) for other, b, e, _ in spans if other != me)
        out[index] = busy / (end - start)
    return out


def _execute(checked: Checked) -> tuple[Cluster, ClusterResult]:
    """cluster_replay's run, keeping the instances' own reports (their per-request logs)."""
    cluster, wall_s = run_cluster(checked)
    return cluster, _result(cluster, checked, wall_s)


def _pull_block_s(results: Sequence[Mapping], checked: Checked, block_bytes: int) -> tuple[float, bool]:
    """Seconds per pulled block: the mean over every pull the instances' reports (of all runs) measured, else the
    link's time plus the probed overhead."""
    pulls = [ms for r in results for ms in r["pull_ms"]]
    if pulls:
        return math.fsum(pulls) / len(pulls) / 1e3, True
    overheads = sorted(v for r in results for v in r["overhead_ms"].values())
    overhead_s = overheads[len(overheads) // 2] / 1e3 if overheads else DEFAULT_OVERHEAD_S
    return checked.link.seconds(block_bytes) + overhead_s, False


def _simulate(checked: Checked, model: ServingTimeModel, contention: float, pull_s: float, block_bytes: int,
              block_tokens: int, arrivals: Sequence[float], sharing: str) -> ClusterSim:
    """The same requests on the simulator's serial serving: every block whole (the executed prefill computes whole
    blocks), the link at the measured per-block pull time, every local tier at the fitted local read cost."""
    spec = checked.spec
    link_gbps = min(1e5, block_bytes / pull_s / 1e9)
    local_gbps = min(1e5, 1 / (model.kv_byte_s * 1e9)) if model.kv_byte_s > 0 else 1e5
    tiers = tuple(SimTierSpec(t.name, spec.capacity_blocks, max(link_gbps, local_gbps))
                  for t in local_tiers(load_tier_map(spec.tiers)).tiers)
    sim_spec = SimClusterSpec(name=f"validate:{spec.tiers.name}", tiers=tiers, link=Link(0.0, link_gbps))
    settings = SimSettings(instances=spec.instances, router=RoundRobin(), sharing=sharing,
                           block_tokens=block_tokens, policy=spec.policy, serving="serial",
                           pull="always" if spec.pull == "always" else "cheaper", contention=contention)
    requests = [Request(r.timestamp_ms, len(r.hash_ids) * block_tokens, 1, r.hash_ids) for r in checked.requests]
    sim = ClusterSim(sim_spec, settings, model)
    sim.run(requests, arrivals)
    return sim


def _side(ttft_ms: Mapping[int, float], arrivals: Sequence[float], tokens: Sequence[int]) -> dict[str, object]:
    """One side's figures: TTFT p50/p99 and throughput (prompt tokens of the completed requests over the time from
    the first arrival to the last first token), computed the same way for both sides."""
    values = sorted(ttft_ms.values())
    end = max((arrivals[i] + ms / 1e3 for i, ms in ttft_ms.items()), default=0.0)
    span = max(end - arrivals[0], 1e-9)
    tail = Tail.of(values)
    return {"ttft_ms": {"p50": tail.p50, "p99": tail.p99},
            "throughput_tokens_per_s": sum(tokens[i] for i in ttft_ms) / span}


def load_servtime(path: str | Path) -> tuple[ServingTimeModel, dict[str, object] | None]:
    """A serving-time model file (`cluster fit-servtime`), or a `cluster validate --json` report: its fitted model
    and its validation (the errors, to show beside simulated results), else None."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: serving-time model file not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a serving-time model or validation report JSON ({exc})") from None
    if isinstance(data, dict) and "validation" in data and "model" in data:
        # The report saves the model fitted to all runs pooled: the errors shown with it are that model's.
        v = data["pooled"] if isinstance(data.get("pooled"), dict) else data["validation"]
        if not isinstance(v, dict) or not all(isinstance(v.get(k), int | float) for k in ("ttft_p50_error",
                                                                                          "ttft_p99_error")):
            raise ConfigError(f"{path}: a validation report without TTFT errors; rerun `tieremu cluster validate`")
        return ServingTimeModel.from_dict(data["model"], str(path)), {
            "spec": data.get("spec"), "ttft_p50_error": v["ttft_p50_error"], "ttft_p99_error": v["ttft_p99_error"],
            "throughput_error": v.get("throughput_error"), "passed": v.get("passed")}
    return ServingTimeModel.from_dict(data, str(path)), None


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def _shares(counts: Sequence[int]) -> dict[str, float]:
    total = sum(counts) or 1
    return dict(zip(("local", "peer", "miss"), (c / total for c in counts), strict=True))
