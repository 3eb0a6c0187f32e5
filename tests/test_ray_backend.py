"""The ray backend against a real local Ray cluster: a head declaring this host's resources and a second node
process declaring one more (`second`); a third, `doomed`, is started and killed mid-sweep. Ray is an optional extra
that scripts/bootstrap.sh installs: without it these tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from ray_guard import require_ray

from tieremu.cli.run import run as run_cmd
from tieremu.lab import active_profiles
from tieremu.numa.topology import discover
from tieremu.record.runs import DONE, FAILED, RunRecord
from tieremu.runner.experiment import run_experiment
from tieremu.runner.needs import host_offer
from tieremu.runner.ray_backend import RayBackend
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import PlannedRun

# After the imports: a missing Ray is a stated skip here, an error under CI.
ray = require_ray()
Cluster = ray.cluster_utils.Cluster
REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "experiments" / "small.yaml"
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"
MIB = 1 << 20
# Figures that are time measured while the run went (the policy's CPU time) or derived from the run-start anchor
# of the timing models (a re-measure of this machine's local memory, different on every run: read rates, the TTFT
# estimate, and the migration rate, as every move is charged its bytes over the tier pair's bandwidth): the rest of
# a simulate replay is accounting, equal on any backend.
TIMED = ("policy_cpu_s", "ttft_ms", "read_gb_per_s", "migration_gbps")
# A dead node is noticed within seconds, not Ray's default of about 15-30.
FAST_FAILURE = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}


def _offer(*extra: str) -> dict[str, float]:
    return host_offer(discover(), lab_profiles=[p["name"] for p in active_profiles() if p.get("applied_utc")],
                      extra=extra).resources


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head (1 CPU, this host's resources and `main`) and a second node process (1 CPU, the same and `second`)."""
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": _offer("main"), "object_store_memory": 80 * MIB, "include_dashboard": False,
        "_system_config": FAST_FAILURE})
    try:
        c.second = c.add_node(num_cpus=1, resources=_offer("second"), object_store_memory=80 * MIB)
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def _backend(cluster: Any) -> RayBackend:
    return RayBackend.connect(cluster.address)


def _run(spec: Path, out: Path, backend: RayBackend | None, **kw: Any) -> Any:
    try:
        return run_experiment(load_experiment(spec), out, backend=backend, report=False, **kw)
    finally:
        if backend is not None:
            backend.close()


def _spec(tmp_path: Path, name: str, jobs: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\ntiers: {TIERS}\nrun_timeout_s: 60\njobs:\n{jobs}")
    return p


def _metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]


def test_small_spec_gives_the_same_ids_schema_and_figures_on_local_and_ray(cluster: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    local = _run(SMALL, tmp_path / "local", None)
    local_s = time.monotonic() - started
    started = time.monotonic()
    remote = _run(SMALL, tmp_path / "ray", _backend(cluster))
    ray_s = time.monotonic() - started
    print(f"small.yaml: local {local_s:.1f} s, ray {ray_s:.1f} s")
    assert [r.status for r in local.records] == [DONE] * len(local.records)
    assert [r.status for r in remote.records] == [DONE] * len(remote.records)
    assert [r.run_id for r in remote.records] == [r.run_id for r in local.records]

    def keyed(folder: Path) -> dict[tuple[Any, ...], float]:
        return {(m["run"], m["metric"], m["unit"], m["origin"], m["tier"], m["phase"], m["seq"]): m["value"]
                for m in _metrics(folder)}

    a, b = keyed(local.path), keyed(remote.path)
    assert a.keys() == b.keys()  # the same metric schema, row for row
    same = {k for k in a if k[1] not in TIMED}
    differ = sorted({k[1] for k in same if a[k] != b[k]})
    assert same and not differ, f"simulate accounting differs between backends: {differ}"
    for k in a.keys() - same:  # anchored: the same order of magnitude, not the same figure (CPU time: anything)
        assert k[1] == "policy_cpu_s" or (a[k] == b[k] == 0) or 0.2 < (b[k] + 1e-9) / (a[k] + 1e-9) < 5, k
    assert (local.path / "summary.csv").read_text().splitlines()[0] == \
        (remote.path / "summary.csv").read_text().splitlines()[0]
    for record in remote.records:  # everything came home: the worker's log and the host's manifest
        run_dir = remote.path / "runs" / record.run_id
        host = json.loads((run_dir / "host.json").read_text())
        assert host["hostname"] and host["kernel"] and "nodes" in host["topology"]
        assert host["extra"]["ray_node_id"]
        assert (run_dir / "worker.log").exists()
    # resume across backends: the ray folder, continued locally, has nothing left to do
    again = _run(SMALL, tmp_path / "ray", None, resume=remote.path)
    assert all(r.reused for r in again.records)


def test_a_run_needing_the_second_nodes_resource_runs_there(cluster: Any, tmp_path: Path) -> None:
    spec = _spec(tmp_path, "placed", "  - kind: synthetic\n    policies: [lru]\n    tokens: 4\n    requests: 2\n"
                                     "    requires: [second]\n")
    result = _run(spec, tmp_path / "out", _backend(cluster))
    assert [r.status for r in result.records] == [DONE] * 3
    for record in result.records:
        host = json.loads((result.path / "runs" / record.run_id / "host.json").read_text())
        assert host["extra"]["ray_node_id"] == cluster.second.node_id
        assert json.loads((result.path / "runs" / record.run_id / "status.json").read_text())["host"] == \
            host["hostname"]


class _KillWhenDone:
    """Kills `node` once every run that does not need it has finished (so those are complete, the others lost)."""

    def __init__(self, cluster: Any, node: Any, survivors: int) -> None:
        self.cluster, self.node, self.left = cluster, node, survivors
        self.killed_at: float | None = None

    def planned(self, plan: Any, todo: int) -> None: ...

    def started(self, run: PlannedRun) -> None: ...

    def finished(self, run: PlannedRun, record: RunRecord) -> None:
        if run.job_index == 0:
            self.left -= 1
        if self.left == 0 and self.killed_at is None:
            self.killed_at = time.monotonic()
            self.cluster.remove_node(self.node, allow_graceful=False)


def test_a_host_lost_mid_sweep_fails_its_runs_with_the_reason_and_resume_reruns_them(
        cluster: Any, tmp_path: Path) -> None:
    doomed = cluster.add_node(num_cpus=1, resources=_offer("doomed"), object_store_memory=80 * MIB)
    cluster.wait_for_nodes()
    release = tmp_path / "release"  # once it exists the doomed runs finish at once (for --resume)
    spec = _spec(tmp_path, "lost", "  - kind: synthetic\n    policies: [lru]\n    tokens: 4\n    requests: 2\n"
                                   "    requires: [main]\n"
                                   "  - kind: synthetic\n    policies: [hotcold]\n    tokens: 4\n    requests: 2\n"
                                   f"    requires: [doomed]\n    crash: hang\n    crash_unless: {release}\n")
    killer = _KillWhenDone(cluster, doomed, survivors=3)
    result = _run(spec, tmp_path / "out", _backend(cluster), listener=killer)
    assert killer.killed_at is not None
    assert time.monotonic() - killer.killed_at < 30, "the driver took too long to notice the lost host"
    by_job = {0: [], 1: []}
    for run, record in zip(result.plan.runs, result.records, strict=True):
        by_job[run.job_index].append(record)
    assert [r.status for r in by_job[0]] == [DONE] * 3
    assert [r.status for r in by_job[1]] == [FAILED] * 3
    for record in by_job[1]:
        assert "lost" in (record.error or ""), record.error
    release.touch()
    resumed = _run(spec, tmp_path / "out", None, resume=result.path)  # the lost runs again, here
    assert [r.status for r in resumed.records] == [DONE] * 6
    assert sum(r.reused for r in resumed.records) == 3


def test_a_run_no_host_can_take_is_recorded_unschedulable_at_once(cluster: Any, tmp_path: Path) -> None:
    spec = _spec(tmp_path, "nowhere", "  - kind: synthetic\n    policies: [lru]\n    tokens: 4\n    requests: 2\n"
                                      "    requires: [no-such-lab]\n")
    started = time.monotonic()
    result = _run(spec, tmp_path / "out", _backend(cluster))
    assert time.monotonic() - started < 30
    assert [r.status for r in result.records] == [FAILED] * 3
    assert "unschedulable" in result.records[0].error
    assert "tieremu_no-such-lab=1" in result.records[0].error


def test_an_unreachable_address_is_a_clear_error_quickly(tmp_path: Path) -> None:
    started = time.monotonic()
    res = CliRunner().invoke(run_cmd, [str(SMALL), "--out", str(tmp_path), "--backend", "ray",
                                       "--address", "127.0.0.1:9"])
    assert time.monotonic() - started < 15
    assert res.exit_code != 0
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in str(res.exception or res.output)
    assert not (tmp_path / "small").exists()
