"""swapoff(2) and swapon(2) through ctypes: turning swap off needs no shell and no util-linux."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

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
