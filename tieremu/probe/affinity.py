"""Pinning the calling thread to CPUs for the duration of a measurement."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tieremu.errors import ProbeError


@contextmanager
def pinned(cpus: Iterable[int]) -> Iterator[None]:
    """Run the calling thread (not the process: pid 0 means this thread on Linux) on cpus, then restore."""
    wanted = set(cpus)
    before = os.sched_getaffinity(0)
    if not wanted <= before:
        raise ProbeError(f"CPUs {sorted(wanted - before)} are not available to this process "
                         f"(allowed: {sorted(before)})")
    os.sched_setaffinity(0, wanted)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
