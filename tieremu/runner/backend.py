"""Where the runs of a sweep execute: `local` (one after another on this machine, each in a fresh worker process:
tieremu.runner.worker) or `ray` (each run a Ray task on whichever host of a cluster can run it:
tieremu.runner.ray_backend, the only module that imports Ray). Either way the driver writes every result into the
one result folder, with the same run ids and files."""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tieremu.errors import ConfigError
from tieremu.record.runs import LoadSample
from tieremu.runner.needs import RunNeeds
from tieremu.runner.spec import BACKENDS
from tieremu.runner.sweep import PlannedRun
from tieremu.runner.worker import RunOutcome, RunTask

__all__ = ["BACKENDS", "Backend", "RunResult", "Submission", "choose", "open_backend"]

ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable: the cluster to join when --address is not given


@dataclass(frozen=True)
class RunResult:
    """A run's outcome as it comes home: what the worker returned, the machine's load around it, the files the run
    left in its working folder on its host (relative path → bytes) and, for a remote run, that host's manifest."""

    outcome: RunOutcome
    before: LoadSample
    after: LoadSample
    files: dict[str, bytes] = field(default_factory=dict)
    host: dict[str, Any] | None = None


@dataclass(frozen=True)
class Submission:
    """One run handed to a backend: its task (job, params, context), what it needs of a host, its time limit."""

    run: PlannedRun
    task: RunTask
    needs: RunNeeds
    timeout_s: float


class Backend(Protocol):
    name: str

    def execute(self, batch: list[Submission]) -> Generator[tuple[PlannedRun, RunResult], None, None]:
        """Run every submission; yield each as it ends (failures too: never raise for one run's failure). Closing
        the generator early stops the runs still going."""
        ...

    def close(self) -> None: ...


def choose(option: str | None, spec_backend: str) -> str:
    """The backend: the command line's, else the spec's (`backend:`), else local."""
    name = option or spec_backend
    if name not in BACKENDS:
        raise ConfigError(f"backend {name!r}: valid: {', '.join(BACKENDS)}")
    return name


def open_backend(name: str, address: str | None = None) -> Backend | None:
    """None for local (run_experiment's own loop, unchanged); a connected RayBackend for ray, at `address`, else
    $RAY_ADDRESS, else a Ray instance started here for this sweep."""
    if choose(name, "local") == "local":
        if address is not None:
            raise ConfigError(f"--address {address}: only the ray backend joins a cluster (use --backend ray)")
        return None
    from tieremu.runner.ray_backend import RayBackend  # Ray is an optional extra: imported only when asked for

    return RayBackend.connect(address or os.environ.get(ADDRESS_ENV) or None)
