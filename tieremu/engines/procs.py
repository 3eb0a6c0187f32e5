"""Engine processes that never outlive tieremu: each in its own process group (killed whole on exit, error or
interrupt), each asking the kernel to kill it when its parent dies (a tieremu killed with SIGKILL runs no cleanup)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time

from tieremu.errors import TieremuError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class EngineError(TieremuError):
    """The engine could not start or failed during the run; the message carries its last words."""


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Send this process signum (SIGKILL by default) when the thread that started it dies (prctl
    PR_SET_PDEATHSIG); exit now if the parent is already gone (init adopted us before the prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


def kill_group(proc: subprocess.Popen[bytes], wait_s: float = 10.0) -> None:
    """SIGKILL the process's whole group (it leads one: start_new_session), reap the leader, and wait (up to wait_s)
    until no member is left running: when this returns, the engine is gone, not merely told to go."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + wait_s
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # SIGKILL is delivered; the kernel is tearing the processes down


def group_members(pgid: int) -> list[int]:
    """The processes of a process group that are still running (zombies, already dead, left out)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


