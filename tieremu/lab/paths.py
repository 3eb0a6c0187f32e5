"""The only kernel files a lab profile may change, relative to the sysfs root.

Every write, mkdir and rmdir is checked against this list, so a bug or a crafted profile cannot reach
anything else (a group name with `..` in it, a node number spliced into another path).
"""

from __future__ import annotations

import re

from tieremu.errors import LabError

CPU_DIR = "sys/devices/system/cpu"
NODE_DIR = "sys/devices/system/node"
UNCORE_DIR = f"{CPU_DIR}/intel_uncore_frequency"
RESCTRL_DIR = "sys/fs/resctrl"
CGROUP_DIR = "sys/fs/cgroup"
THP_DIR = "sys/kernel/mm/transparent_hugepage"
PROC_SWAPS = "proc/swaps"
NUMA_BALANCING = "proc/sys/kernel/numa_balancing"
DEMOTION_ENABLED = "sys/kernel/mm/numa/demotion_enabled"
NMI_WATCHDOG = "proc/sys/kernel/nmi_watchdog"
ASLR = "proc/sys/kernel/randomize_va_space"
KSM_RUN = "sys/kernel/mm/ksm/run"
SMT_CONTROL = f"{CPU_DIR}/smt/control"
NO_TURBO = f"{CPU_DIR}/intel_pstate/no_turbo"
BOOST = f"{CPU_DIR}/cpufreq/boost"

# A resctrl or cgroup group made by a profile: one path component without dots, so it can never be `..`
# nor collide with a cgroup interface file (those all contain a dot).
GROUP_NAME = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}"

_WRITABLE = [re.compile(p) for p in (
    rf"{CPU_DIR}/cpu\d+/online",
    rf"{CPU_DIR}/cpu\d+/cpufreq/scaling_governor",
    rf"{UNCORE_DIR}/package_\d+_die_\d+/(min|max)_freq_khz",
    rf"{RESCTRL_DIR}/{GROUP_NAME}/(schemata|cpus_list)",
    rf"{NODE_DIR}/node\d+/hugepages/hugepages-\d+kB/nr_hugepages",
    rf"{CGROUP_DIR}/cgroup\.subtree_control",
    rf"{CGROUP_DIR}/{GROUP_NAME}/(memory\.max|memory\.high|cpuset\.cpus|cpuset\.mems)",
    *(re.escape(p) for p in (NUMA_BALANCING, DEMOTION_ENABLED, NMI_WATCHDOG, ASLR, KSM_RUN, SMT_CONTROL,
                             NO_TURBO, BOOST, f"{THP_DIR}/enabled", f"{THP_DIR}/defrag")),
)]
_DIRS = [re.compile(p) for p in (rf"{RESCTRL_DIR}/{GROUP_NAME}", rf"{CGROUP_DIR}/{GROUP_NAME}")]
# resctrl reserves these names for its own files and directories.
_RESERVED = {"info", "mon_groups", "mon_data", "tasks", "cpus", "cpus_list", "schemata", "mode", "size"}


def check_writable(rel: str) -> None:
    if not any(p.fullmatch(rel) for p in _WRITABLE) or _has_dots(rel):
        raise LabError(f"refusing to write {rel}: not one of the kernel files a lab profile may change")


def check_dir(rel: str) -> None:
    if not any(p.fullmatch(rel) for p in _DIRS) or _has_dots(rel) or rel.rsplit("/", 1)[-1] in _RESERVED:
        raise LabError(f"refusing to create or remove {rel}: not a resctrl or cgroup group directory")


def valid_group_name(name: str) -> str | None:
    """None when name can be a resctrl/cgroup group made by a profile, else the problem."""
    if not re.fullmatch(GROUP_NAME, name):
        return "must be letters, digits, '_' and '-' (at most 64, not starting with '-')"
    if name in _RESERVED:
        return f"is a name resctrl uses for its own files; reserved: {', '.join(sorted(_RESERVED))}"
    return None


def _has_dots(rel: str) -> bool:
    return any(part in ("", ".", "..") for part in rel.split("/"))
