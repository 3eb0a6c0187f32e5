"""swapoff(2) and swapon(2) through ctypes: turning swap off needs no shell and no util-linux.

In test mode (a sysfs root other than /) the calls never reach the kernel: `fixture_swap_syscall` plays them on
the fixture's proc/swaps instead, so a fixture naming a real swap area cannot turn the host's swap off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

# include/linux/swap.h: a priority is only honoured with SWAP_FLAG_PREFER; without it the kernel
# assigns the next automatic (negative) priority.
SWAP_FLAG_PREFER = 0x8000
SWAP_FLAG_PRIO_MASK = 0x7FFF

# (operation "off" or "on", device path as /proc/swaps names it, swapon flags) -> None, OSError on failure.
SwapSyscall = Callable[[str, str, int], None]


def swap_flags(priority: int | None) -> int:
    """swapon flags that give a swap area back its priority; None means the kernel's automatic one."""
    if priority is None:
        return 0
    if not 0 <= priority <= SWAP_FLAG_PRIO_MASK:
        raise ValueError(f"swap priority {priority} is outside 0..{SWAP_FLAG_PRIO_MASK}")
    return SWAP_FLAG_PREFER | priority


def real_swap_syscall(op: str, device: str, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    path = os.fsencode(device)
    if op == "off":
        rc = libc.swapoff(ctypes.c_char_p(path))
    elif op == "on":
        rc = libc.swapon(ctypes.c_char_p(path), ctypes.c_int(flags))
    else:
        raise ValueError(f"unknown swap operation {op!r}")
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), device)


FIXTURE_OFF = ".tieremu-swaps-off.json"  # in a fixture root: the /proc/swaps lines of areas swapped off


def fixture_swap_syscall(root: Path) -> SwapSyscall:
    """swapoff/swapon played on `<root>/proc/swaps`: the area's line is set aside on swapoff (in FIXTURE_OFF
    under root) and put back with its priority on swapon, the way the kernel's table changes."""
    swaps = root / "proc" / "swaps"
    store = root / FIXTURE_OFF

    def call(op: str, device: str, flags: int) -> None:
        lines = swaps.read_text().splitlines(keepends=True) if swaps.is_file() else ["Filename Type Size Used "
                                                                                      "Priority\n"]
        off: dict[str, list[str]] = json.loads(store.read_text()) if store.is_file() else {}
        index = next((i for i, line in enumerate(lines[1:], 1) if _device(line) == device), None)
        if op == "off":
            if index is None:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), device)
            off[device] = lines.pop(index).split()
        elif op == "on":
            if index is not None or device not in off:
                raise OSError(errno.EBUSY if index is not None else errno.ENOENT, "fixture swapon", device)
            fields = off.pop(device)
            fields[3] = "0"
            fields[4] = str(flags & SWAP_FLAG_PRIO_MASK) if flags & SWAP_FLAG_PREFER else "-2"
            lines.append("\t".join(fields) + "\n")
        else:
            raise ValueError(f"unknown swap operation {op!r}")
        swaps.write_text("".join(lines))
        if off:
            store.write_text(json.dumps(off))
        else:
            store.unlink(missing_ok=True)

    return call


def _device(line: str) -> str | None:
    fields = line.split()
    return fields[0].replace("\\040", " ") if fields else None
