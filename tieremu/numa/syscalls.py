"""The NUMA memory-policy and migration system calls, through ctypes.

No PyPI binding covers mbind/move_pages (DESIGN.md), and Debian's libnuma lacks MPOL_PREFERRED_MANY and
MPOL_WEIGHTED_INTERLEAVE, so these call `syscall(2)` directly. ctypes drops the GIL around foreign calls, so
a long move_pages does not stall other Python threads. Every failure becomes a NumaError that names the call,
the nodes and, in words, why.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_mod
import os
from collections.abc import Iterable, Sequence
from typing import NoReturn

import numpy as np

from tieremu.errors import CapabilityError, InvalidNodeError, NodeFullError, NumaError
from tieremu.numa.sysfs import format_list, parse_list

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS_MBIND = 237
SYS_SET_MEMPOLICY = 238
SYS_GET_MEMPOLICY = 239
SYS_MIGRATE_PAGES = 256
SYS_MOVE_PAGES = 279

# A node mask wide enough for any machine the kernel supports (MAX_NUMNODES is at most 1024).
MASK_BITS = 1024
_MASK_WORDS = MASK_BITS // 64
# The kernel reads maxnode - 1 bits, so pass one more than the mask holds.
_MAXNODE = MASK_BITS + 1

# mbind flags
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2
# get_mempolicy flags
MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1
MPOL_F_MEMS_ALLOWED = 1 << 2
# move_pages flag
MPOL_MF_MOVE_FLAG = MPOL_MF_MOVE

# Per-call page batch for move_pages: large enough to amortise the call, small enough to keep the
# kernel's temporary arrays and our status buffers modest.
MOVE_BATCH = 1 << 16


class Policy(enum.IntEnum):
    """Memory policy modes (include/uapi/linux/mempolicy.h)."""

    DEFAULT = 0
    PREFERRED = 1
    BIND = 2
    INTERLEAVE = 3
    LOCAL = 4
    PREFERRED_MANY = 5
    WEIGHTED_INTERLEAVE = 6

    @classmethod
    def from_name(cls, name: str) -> Policy:
        key = name.strip().lower().replace("-", "_")
        for member in cls:
            if member.name.lower() == key:
                return member
        valid = ", ".join(m.name.lower() for m in cls)
        raise ValueError(f"unknown memory policy {name!r}; valid: {valid}")

    @property
    def takes_nodes(self) -> bool:
        return self not in (Policy.DEFAULT, Policy.LOCAL)


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _call(number: int, *args: object) -> int:
    """Issue one syscall; returns its result or raises OSError with errno."""
    ctypes.set_errno(0)
    result = _syscall(ctypes.c_long(number), *args)
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def node_mask(nodes: Iterable[int]) -> ctypes.Array[ctypes.c_ulong]:
    mask = (ctypes.c_ulong * _MASK_WORDS)()
    for n in nodes:
        if not 0 <= n < MASK_BITS:
            raise InvalidNodeError(
                f"node {n} is out of range; node ids run from 0 to {MASK_BITS - 1}", call="nodemask", nodes=(n,)
            )
        mask[n // 64] |= 1 << (n % 64)
    return mask


def mask_nodes(mask: ctypes.Array[ctypes.c_ulong]) -> tuple[int, ...]:
    return tuple(w * 64 + b for w in range(_MASK_WORDS) for b in range(64) if mask[w] >> b & 1)


def memory_nodes(sysfs: str = "/sys") -> tuple[int, ...]:
    """Nodes of the running kernel that have memory: the valid targets named in error messages.

    Always the real kernel's view, never a fixture root: these calls act on the real kernel.
    """
    try:
        with open(f"{sysfs}/devices/system/node/has_memory") as f:
            return parse_list(f.read())
    except OSError:
        return (0,)


def _raise(call: str, err: int, nodes: Sequence[int], detail: str = "") -> NoReturn:
    where = f" (nodes {format_list(list(nodes))})" if nodes else ""
    head = f"{call}{where} failed: {os.strerror(err)}"
    valid = memory_nodes()
    if err == errno_mod.EPERM:
        raise CapabilityError(
            f"{head}; the kernel requires CAP_SYS_NICE for this (moving pages of another process, "
            "MPOL_MF_MOVE_ALL, or binding inside a restricted container): run as root or grant "
            "CAP_SYS_NICE, otherwise placement is not enforced",
            call=call, errno=err, nodes=tuple(nodes),
        )
    if err in (errno_mod.EINVAL, errno_mod.ENODEV, errno_mod.EACCES) and any(n not in valid for n in nodes):
        bad = [n for n in nodes if n not in valid]
        only = "the only valid node" if len(valid) == 1 else "valid nodes"
        raise InvalidNodeError(
            f"{head}: node {format_list(bad)} does not exist or has no memory on this machine; "
            f"{only}: {format_list(list(valid))}",
            call=call, errno=err, nodes=tuple(bad),
        )
    if err == errno_mod.ENOMEM:
        raise NodeFullError(
            f"{head}: not enough free memory on node {format_list(list(nodes)) or '?'} for the request"
            f"{detail}", call=call, errno=err, nodes=tuple(nodes),
        )
    raise NumaError(f"{head}{detail}", call=call, errno=err, nodes=tuple(nodes))


def mbind(addr: int, length: int, policy: Policy, nodes: Sequence[int] = (), *,
          move: bool = False, strict: bool = False, mode_flags: int = 0) -> None:
    """Set the memory policy of [addr, addr+length); with move=True migrate existing pages to fit it."""
    nodes = tuple(nodes) if policy.takes_nodes else ()
    flags = (MPOL_MF_MOVE if move else 0) | (MPOL_MF_STRICT if strict else 0)
    mask = node_mask(nodes)
    try:
        _call(SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(length), ctypes.c_int(int(policy) | mode_flags),
              mask if nodes else None, ctypes.c_ulong(_MAXNODE if nodes else 0), ctypes.c_uint(flags))
    except OSError as exc:
        detail = " (MPOL_MF_STRICT: some pages could not be moved)" if exc.errno == errno_mod.EIO else ""
        _raise(f"mbind({policy.name.lower()})", exc.errno, nodes, detail)


def set_mempolicy(policy: Policy, nodes: Sequence[int] = (), *, mode_flags: int = 0) -> None:
    """Set the calling thread's default memory policy."""
    nodes = tuple(nodes) if policy.takes_nodes else ()
    mask = node_mask(nodes)
    try:
        _call(SYS_SET_MEMPOLICY, ctypes.c_int(int(policy) | mode_flags), mask if nodes else None,
              ctypes.c_ulong(_MAXNODE if nodes else 0))
    except OSError as exc:
        _raise(f"set_mempolicy({policy.name.lower()})", exc.errno, nodes)


def get_mempolicy(addr: int | None = None) -> tuple[Policy, tuple[int, ...]]:
    """The policy and node mask of the thread (addr None) or of the VMA holding addr.

    Never use MPOL_F_NODE|MPOL_F_ADDR to ask where a page is: that faults the page in. Use query_pages.
    """
    mode = ctypes.c_int(0)
    mask = node_mask(())
    flags = MPOL_F_ADDR if addr is not None else 0
    try:
        _call(SYS_GET_MEMPOLICY, ctypes.byref(mode), mask, ctypes.c_ulong(_MAXNODE),
              ctypes.c_void_p(addr or 0), ctypes.c_ulong(flags))
    except OSError as exc:
        _raise("get_mempolicy", exc.errno, ())
    # Mode flags (static/relative nodes, numa balancing) share the int; keep only the mode.
    return Policy(mode.value & 0xFF), mask_nodes(mask)


def allowed_nodes() -> tuple[int, ...]:
    """Nodes this process may allocate on (its cpuset's mems)."""
    mode = ctypes.c_int(0)
    mask = node_mask(())
    try:
        _call(SYS_GET_MEMPOLICY, ctypes.byref(mode), mask, ctypes.c_ulong(_MAXNODE), None,
              ctypes.c_ulong(MPOL_F_MEMS_ALLOWED))
    except OSError as exc:
        _raise("get_mempolicy(mems_allowed)", exc.errno, ())
    return mask_nodes(mask)


def _move_pages(pid: int, pages: np.ndarray, nodes: np.ndarray | None, status: np.ndarray, flags: int) -> None:
    _call(SYS_MOVE_PAGES, ctypes.c_int(pid), ctypes.c_ulong(len(pages)),
          ctypes.c_void_p(pages.ctypes.data),
          ctypes.c_void_p(nodes.ctypes.data) if nodes is not None else None,
          ctypes.c_void_p(status.ctypes.data), ctypes.c_int(flags))


def query_pages(pages: np.ndarray, pid: int = 0) -> np.ndarray:
    """Where each page is: node id, or -errno (-2 not present, -14 zero page/unmapped).

    move_pages with a NULL node array only reports; it neither moves nor faults pages in.
    """
    pages = np.ascontiguousarray(pages, dtype=np.uint64)
    status = np.empty(len(pages), dtype=np.int32)
    for lo in range(0, len(pages), MOVE_BATCH):
        hi = min(lo + MOVE_BATCH, len(pages))
        try:
            _move_pages(pid, pages[lo:hi], None, status[lo:hi], 0)
        except OSError as exc:
            _raise(f"move_pages(query, pid {pid})", exc.errno, ())
    return status


def move_pages(pages: np.ndarray, node: int, pid: int = 0, *, move_all: bool = False,
               batch: int = MOVE_BATCH) -> np.ndarray:
    """Move pages to node, `batch` pages per call; returns per-page status (node reached, or -errno).

    A page that is already on node comes back with node as its status. Errors of the call itself
    (bad node, no permission) raise; per-page failures are in the status.
    """
    pages = np.ascontiguousarray(pages, dtype=np.uint64)
    status = np.empty(len(pages), dtype=np.int32)
    batch = max(1, min(batch, MOVE_BATCH))
    targets = np.full(min(len(pages), batch), node, dtype=np.int32)
    flags = MPOL_MF_MOVE_ALL if move_all else MPOL_MF_MOVE_FLAG
    for lo in range(0, len(pages), batch):
        hi = min(lo + batch, len(pages))
        try:
            _move_pages(pid, pages[lo:hi], targets[: hi - lo], status[lo:hi], flags)
        except OSError as exc:
            _raise(f"move_pages(to node {node}, pid {pid})", exc.errno, (node,))
    return status


def migrate_pages(pid: int, old_nodes: Sequence[int], new_nodes: Sequence[int]) -> int:
    """Move all pages of process pid from old_nodes to new_nodes; returns how many could not be moved."""
    try:
        return _call(SYS_MIGRATE_PAGES, ctypes.c_int(pid), ctypes.c_ulong(_MAXNODE),
                     node_mask(old_nodes), node_mask(new_nodes))
    except OSError as exc:
        _raise(f"migrate_pages(pid {pid})", exc.errno, tuple(old_nodes) + tuple(new_nodes))


def has_cap_sys_nice(status_path: str = "/proc/self/status") -> bool:
    """Whether the process holds CAP_SYS_NICE in its effective set (bit 23)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 23 & 1)
    except OSError:
        pass
    return False


def errno_name(code: int) -> str:
    """'EBUSY' for 16 or -16: status codes are negative errnos."""
    return errno_mod.errorcode.get(abs(code), f"E{abs(code)}")
