"""Processes this checkout's tests started and that are still alive: an orphan after a command returned is a bug."""

from __future__ import annotations

import sys
from pathlib import Path


def our_processes(module: str) -> list[str]:
    """`pid: command line` of live processes running `module` under this interpreter's path (another checkout's test
    run on the same machine is not ours)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if module in cmdline and cmdline.startswith(sys.executable):
                found.append(f"{entry.name}: {cmdline}")
    return found
