"""The ray backend: every run of a sweep a Ray task, placed on a host that declares what the run needs
(tieremu.runner.needs), run there in a fresh worker process exactly as locally (tieremu.runner.worker), and sent
home whole: rows, outcome, the files it left, the host's manifest. The only module that imports Ray.

A run no live host can take is recorded failed as unschedulable at once (Ray would queue it for ever); a host that
leaves mid-sweep fails the runs it held, and the runs only it could take, with the reason, and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tieremu.errors import BackendError
from tieremu.record.runs import LoadSample
from tieremu.runner.backend import RunResult, Submission
from tieremu.runner.needs import RunNeeds, host_offer
from tieremu.runner.sweep import PlannedRun
from tieremu.runner.worker import RunOutcome, RunTask, run_isolated

CONNECT_TIMEOUT_S = 5.0  # an address that does not answer in this long is reported, not waited on
POLL_S = 1.0  # between checks that the hosts the waiting runs need are still alive
DEFAULT_PORT = 6379  # `ray start --head`'s GCS port
CLIENT_PORT = 10001  # ray:// (Ray Client) addresses
AUTH_MODE_ENV = "RAY_AUTH_MODE"
MISSING_RAY = ("--backend ray needs Ray, an optional extra: pip install 'tieremu[ray]' (scripts/bootstrap.sh "
               "installs it)")


@dataclass(frozen=True)
class Host:
    """A live Ray node as the driver sees it."""

    node_id: str
    hostname: str
    address: str
    resources: Mapping[str, float]

    def describe(self) -> str:
        return f"{self.hostname} ({self.address}, node {self.node_id[:8]})"


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def connect(cls, address: str | None) -> RayBackend:
        """Join the cluster at `address` (host:port of its head, or ray://host:port), else start a Ray instance on
        this machine declaring this host's resources, for this sweep only. An address that does not answer is a
        BackendError within CONNECT_TIMEOUT_S (Ray itself retries for a minute)."""
        try:
            import ray
        except ImportError:
            raise BackendError(MISSING_RAY) from None
        if address is not None and address != "auto":
            _check_reachable(address)
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.WARNING}
        if address is None:  # a private instance: it has to declare what tieremu's runs ask for, as ray-node would
            from tieremu.lab import active_profiles
            from tieremu.numa.topology import discover

            profiles = [str(p["name"]) for p in active_profiles() if p.get("applied_utc") and p.get("name")]
            options["resources"] = host_offer(discover(), lab_profiles=profiles).resources
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            hint = ""
            if address is not None and AUTH_MODE_ENV not in os.environ:
                # Ray 2.60's `ray start` turns token authentication on, and a driver joining by address sends its
                # token only when asked to (so that it never hands it to a wrong address): say how.
                hint = (f"; if the cluster was started with `ray start` (tieremu ray-node --start) it uses token "
                        f"authentication: set {AUTH_MODE_ENV}=token, with the head's token in ~/.ray/auth_token "
                        "or $RAY_AUTH_TOKEN")
            raise BackendError(f"cannot join the Ray cluster at {address or 'a new local instance'}: {exc}"
                               f"{hint}") from None
        return cls(address)

    def execute(self, batch: list[Submission]) -> Generator[tuple[PlannedRun, RunResult], None, None]:
        import ray
        from ray.exceptions import RayError

        remote = ray.remote(run_on_host)
        pending: dict[Any, Submission] = {}
        hosts = _alive_hosts()
        seen = {h.node_id: h for h in hosts}
        try:
            for sub in batch:
                if not any(sub.needs.met_by(h.resources) for h in hosts):
                    yield sub.run, _failed(unschedulable(sub.needs, hosts))
                    continue
                ref = remote.options(num_cpus=sub.needs.cpus, num_gpus=sub.needs.gpus, resources=sub.needs.resources,
                                     max_retries=0, retry_exceptions=False,
                                     name=f"tieremu-{sub.run.run_id}").remote(sub.task, sub.timeout_s)
                pending[ref] = sub
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    sub = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayError as exc:  # its worker or its whole host died: the run is lost, not the sweep
                        result = _failed(f"the run was lost on its Ray host: {type(exc).__name__}: "
                                         f"{_first_line(exc)}")
                    yield sub.run, result
                if ready:
                    continue
                hosts = _alive_hosts()
                seen |= {h.node_id: h for h in hosts}
                gone = [h for node_id, h in seen.items() if node_id not in {a.node_id for a in hosts}]
                for ref, sub in list(pending.items()):
                    if any(sub.needs.met_by(h.resources) for h in hosts):
                        continue
                    # Ray would keep it waiting for a host that may never come back: the run fails here, with why.
                    _cancel(ref)
                    del pending[ref]
                    left = ", ".join(h.describe() for h in gone) or "none seen"
                    yield sub.run, _failed(f"lost: no live host can run it any more (hosts that left the cluster: "
                                           f"{left}); {unschedulable(sub.needs, hosts)}")
        finally:  # Ctrl-C, or the driver failing: no run goes on without it
            for ref in pending:
                _cancel(ref)

    def close(self) -> None:
        import ray

        ray.shutdown()  # a private instance stops with it; a cluster's hosts stay up


def run_on_host(task: RunTask, timeout_s: float) -> RunResult:
    """The Ray task (runs on the chosen host): the run in a fresh process, in a working folder of its own there,
    then everything it produced sent home and the folder removed, so nothing stays on the worker."""
    with tempfile.TemporaryDirectory(prefix=f"tieremu-{task.context.run_id}-") as tmp:
        workdir = Path(tmp)
        here = replace(task, context=replace(task.context, workdir=workdir))
        before = LoadSample.now()
        outcome = run_isolated(here, timeout_s)
        after = LoadSample.now()
        files = {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
                 if p.is_file() and not p.is_symlink()}
    return RunResult(outcome, before, after, files, host_manifest())


def host_manifest() -> dict[str, Any]:
    """This host as a run's manifest records it: machine, kernel, topology, knobs, lab profiles, versions, and the
    cached calibration (not re-measured: that would cost every run seconds), plus its Ray node."""
    import ray

    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import load_cached
    from tieremu.runner import manifest

    cal = load_cached()
    return manifest.collect(discover(), ray_node_id=ray.get_runtime_context().get_node_id(),
                            ray_node_ip=ray.util.get_node_ip_address(),
                            calibration_cached=cal.to_dict() if cal else None).to_dict()


def unschedulable(needs: RunNeeds, hosts: list[Host]) -> str:
    lacks = "; ".join(f"{h.describe()} lacks {', '.join(needs.missing(h.resources))}" for h in hosts)
    return (f"unschedulable: no live host of the Ray cluster declares what the run needs ({needs.describe()}); "
            f"{lacks or 'the cluster has no live host'}. Declare it on a host that has it: tieremu ray-node")


def _alive_hosts() -> list[Host]:
    import ray

    return [Host(n["NodeID"], n.get("NodeManagerHostname", "?"), n.get("NodeManagerAddress", "?"),
                 dict(n.get("Resources", {})))
            for n in ray.nodes() if n.get("Alive")]


def _cancel(ref: Any) -> None:
    """Stop a task (force: its worker process is killed, and with it the run's own process); a task whose host is
    already gone cannot be reached, and needs no stopping."""
    import ray
    from ray.exceptions import RayError

    with contextlib.suppress(RayError, ValueError):
        ray.cancel(ref, force=True)


def _failed(reason: str) -> RunResult:
    now = LoadSample.now()
    return RunResult(RunOutcome([], reason, 0.0, None), now, now)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _check_reachable(address: str) -> None:
    """Refuse an address whose port does not answer, quickly and naming it."""
    client = address.startswith("ray://")
    hostport = address.removeprefix("ray://")
    host, sep, port_text = hostport.rpartition(":")
    if not sep:
        host, port_text = hostport, str(CLIENT_PORT if client else DEFAULT_PORT)
    try:
        port = int(port_text)
    except ValueError:
        raise BackendError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS port, {DEFAULT_PORT} by "
                           f"default) or ray://HOST:PORT") from None
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise BackendError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (nothing answered on "
                           f"{host}:{port} within {CONNECT_TIMEOUT_S:g} s); start its head with `tieremu ray-node "
                           f"--head --start`, or give the head's HOST:PORT with --address or $RAY_ADDRESS") from None
