"""Every action kind a lab profile can use, by the `kind` name profiles give it."""

from __future__ import annotations

from tieremu.lab.actions.base import Action, Reading
from tieremu.lab.actions.cgroup import Cgroup
from tieremu.lab.actions.cpus import Governor, NodeCpus
from tieremu.lab.actions.hugepages import HugePages
from tieremu.lab.actions.knobs import Aslr, Demotion, Ksm, NmiWatchdog, NumaBalancing, Smt, Turbo
from tieremu.lab.actions.resctrl import ResctrlMba
from tieremu.lab.actions.swap import Swap
from tieremu.lab.actions.thp import Thp
from tieremu.lab.actions.uncore import Uncore

KINDS: dict[str, type[Action]] = {cls.kind: cls for cls in (
    NodeCpus, Uncore, ResctrlMba, NumaBalancing, Demotion, Thp, HugePages, NmiWatchdog, Aslr, Ksm, Smt, Turbo,
    Governor, Swap, Cgroup,
)}

__all__ = ["KINDS", "Action", "Reading"]
