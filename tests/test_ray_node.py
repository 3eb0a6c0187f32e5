"""`tieremu ray-node --head --start` makes a head that `tieremu run --backend ray --address` sweeps on, as a user
would do it (token authentication included), then `ray stop`. Ray missing: skipped, or failed under CI=true."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_guard import require_ray

from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import expand

# After the imports: a missing Ray is a stated skip here, an error under CI.
require_ray()
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = REPO / "configs" / "experiments" / "small.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head() -> Iterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    started = subprocess.run([str(BIN / "tieremu"), "ray-node", "--head", "--port", str(port), "--num-cpus", "2",
                              "--start"], capture_output=True, text=True, timeout=120, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}"
    finally:  # always: a head left running would outlive the test session
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=60, env=env)


def test_a_sweep_on_a_head_started_by_ray_node(head: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "token"}
    done = subprocess.run([str(BIN / "tieremu"), "run", str(SMALL), "--backend", "ray", "--address", head,
                           "--out", str(tmp_path), "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode in (0, 3), done.stderr[-2000:]
    out = json.loads(done.stdout)
    # lru, hotcold and belady at both capacities; all-fastest and all-slowest once (the fast tier's size is not theirs)
    assert out["failed"] == 0 and len(out["runs"]) == len(expand(load_experiment(SMALL))) == 8
    folder = Path(out["path"])
    assert all((folder / "runs" / r["run_id"] / "host.json").exists() for r in out["runs"])
