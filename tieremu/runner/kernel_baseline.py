"""The kernel's own tiering as a baseline policy of experiments: `policies: [kernel]` in a decode job.

A run of policy `kernel` places KV blocks as every policy run does (the tiers in order, each up to its capacity),
starts no tieremu daemon, and leaves the pages to Linux: promotion on NUMA hint faults (numa_balancing=2) and
demotion on reclaim (demotion_enabled). The knobs are turned on for the run through the lab profile
`kernel-tiering` (configs/lab/kernel-tiering.yaml), whose journalled actions are restored when the run ends; the
job records the kernel's promotions and demotions from /proc/vmstat and labels its rows `kernel-tiering`.

It can act only where the kernel has somewhere to demote to: two or more memory tiers (a multi-node server, or the
QEMU guest). On one node a spec naming it is refused at planning, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tieremu.daemon.kernel import PROFILE, KernelTiering
from tieremu.lab.held import profile_held

KERNEL_POLICY = "kernel"


def kernel_policy_problem(root: str | None = None) -> str | None:
    """Why policy `kernel` cannot act on this machine, or None."""
    where = KernelTiering(root).applicability()
    if where.applicable:
        return None
    return (f"policy {KERNEL_POLICY!r} (Linux's own tiering: numa_balancing=2 and demotion, labelled "
            f"kernel-tiering) cannot act here: {where.reason}")


@contextmanager
def run_environment(policy: str | None) -> Iterator[None]:
    """What a run of `policy` needs of the machine while it runs: for `kernel`, the lab profile held."""
    if policy != KERNEL_POLICY:
        yield
        return
    with profile_held(PROFILE):
        yield
