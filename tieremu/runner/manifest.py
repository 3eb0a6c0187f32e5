"""What a result was measured on: machine, kernel, knobs, topology, versions, revision and command line.

Every result folder gets one, so that a figure can be traced to the exact conditions that produced it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tieremu import __version__
from tieremu.lab import active_profiles
from tieremu.numa import syscalls
from tieremu.numa.topology import Topology, topology_summary
from tieremu.tiers.resolve import in_vm

PACKAGES = ("numpy", "torch", "psutil", "pyyaml", "click", "rich")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Manifest:
    created_utc: str
    command: list[str]
    tieremu_version: str
    git_revision: str | None
    git_dirty: bool | None
    hostname: str
    cpu_model: str | None
    cpus: int
    kernel: str
    python: str
    packages: dict[str, str]
    in_vm: bool
    cap_sys_nice: bool
    topology: dict[str, Any]
    knobs: dict[str, Any]
    lab_profiles: list[dict[str, Any]]  # active lab profiles and the values read now (tieremu lab)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(topology: Topology, **extra: Any) -> Manifest:
    revision, dirty = _git_state()
    return Manifest(
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=list(sys.argv),
        tieremu_version=__version__,
        git_revision=revision,
        git_dirty=dirty,
        hostname=socket.gethostname(),
        cpu_model=_cpu_model(),
        cpus=len(os.sched_getaffinity(0)),
        kernel=f"{platform.system()} {platform.release()} {platform.version()}",
        python=platform.python_version(),
        packages={p: _version(p) for p in PACKAGES},
        in_vm=in_vm(),
        cap_sys_nice=syscalls.has_cap_sys_nice(),
        topology=topology_summary(topology),
        knobs=asdict(topology.knobs),
        lab_profiles=active_profiles(),
        extra=extra,
    )


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_state() -> tuple[str | None, bool | None]:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return rev, bool(status.strip())
