"""Choosing a backend and deriving what a run needs of a host: pure, no Ray needed (tests/test_ray_backend.py runs
the ray backend itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tieremu.errors import ConfigError
from tieremu.numa.topology import discover
from tieremu.runner.backend import choose, open_backend
from tieremu.runner.experiment import plan_experiment
from tieremu.runner.needs import HOST, RunNeeds, host_offer, node_resource, run_needs
from tieremu.runner.spec import load_experiment

REPO = Path(__file__).resolve().parents[1]
TIERS = REPO / "configs" / "tiers" / "cxl-expander.yaml"
SYNTHETIC = "  - kind: synthetic\n    policies: [lru]\n    tokens: 4\n    requests: 2\n"


def _spec(tmp_path: Path, head: str = "", job: str = "") -> Path:
    p = tmp_path / "e.yaml"
    p.write_text(f"name: e\ntiers: {TIERS}\n{head}jobs:\n{SYNTHETIC}{job}")
    return p


def test_the_command_line_wins_over_the_spec_and_local_is_the_default(tmp_path: Path) -> None:
    assert load_experiment(_spec(tmp_path)).backend == "local"
    spec = load_experiment(_spec(tmp_path, "backend: ray\n"))
    assert spec.backend == "ray"
    assert choose(None, spec.backend) == "ray"
    assert choose("local", spec.backend) == "local"
    assert open_backend("local") is None


@pytest.mark.parametrize(("head", "job", "message"), [
    ("backend: slurm\n", "", r"backend: .*slurm.*local, ray"),
    ("", "    requires: [cxl, 'no spaces']\n", r"jobs\[0\]\.requires\[1\]: resource name 'no spaces': use letters"),
    ("", "    requires: [3]\n", r"jobs\[0\]\.requires\[0\]: expected a resource name, got 3"),
])
def test_bad_backend_and_requires_name_the_key(tmp_path: Path, head: str, job: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(_spec(tmp_path, head, job))


def test_an_address_without_the_ray_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--address h:1: only the ray backend joins a cluster"):
        open_backend("local", "h:1")


def test_requires_places_a_run_without_changing_its_id(tmp_path: Path) -> None:
    plain = plan_experiment(load_experiment(_spec(tmp_path)))
    placed_spec = load_experiment(_spec(tmp_path, job="    requires: [cxl]\n"))
    assert [r.run_id for r in plan_experiment(placed_spec).runs] == [r.run_id for r in plain.runs]
    assert placed_spec.jobs[0].requires == ("cxl",)


def test_needs_come_from_the_resolved_tiers_and_a_timed_run_takes_the_host(tmp_path: Path) -> None:
    plan = plan_experiment(load_experiment(_spec(tmp_path)))
    resolved = plan.resolved[plan.spec.tiers]
    untimed = run_needs(resolved, timed=False, lab_profile=None, requires=("cxl",))
    assert untimed.resources == {node_resource(0): 1, "tieremu_cxl": 1}  # the emulated tiers live on node 0
    timed = run_needs(resolved, timed=True, lab_profile="cxl-cpuless-node1")
    assert timed.resources[HOST] == 1 and timed.resources["tieremu_lab_cxl-cpuless-node1"] == 1
    offer = host_offer(discover(), extra=["cxl"]).resources
    assert untimed.met_by(offer | {"CPU": 2})
    assert not timed.met_by(offer | {"CPU": 2})
    assert timed.missing(offer | {"CPU": 2}) == ["tieremu_lab_cxl-cpuless-node1=1"]
    assert RunNeeds(gpus=1).missing({"CPU": 1}) == ["GPU=1"]


def test_ray_node_prints_a_ray_start_with_this_hosts_resources() -> None:
    cmd = host_offer(discover(), extra=["cxl"]).ray_start(head=False, address="h:6379", num_cpus=2)
    assert cmd[:6] == ["ray", "start", "--address", "h:6379", "--num-cpus", "2"]
    declared = json.loads(cmd[-1])
    assert declared[HOST] == 1 and declared["tieremu_cxl"] > 0 and declared[node_resource(0)] > 0
