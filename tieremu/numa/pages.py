"""Where the pages of an address range are, and moving them: the kernel's answer, never an assumption."""

from __future__ import annotations

import errno as errno_mod
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from tieremu.numa import syscalls

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def page_addresses(start: int, length: int, page_size: int = PAGE_SIZE) -> np.ndarray:
    """The base address of every page that [start, start+length) touches."""
    if length <= 0:
        return np.empty(0, dtype=np.uint64)
    first = start - start % page_size
    return np.arange(first, start + length, page_size, dtype=np.uint64)


@dataclass(frozen=True)
class Placement:
    """Per-node page counts of a range, as move_pages reports them.

    `absent` counts pages with no node, by errno name: ENOENT (never touched), EFAULT (zero page or
    unmapped). A fraction is of all pages in the range, so untouched pages count against it.
    """

    pages: int
    by_node: dict[int, int]
    absent: dict[str, int] = field(default_factory=dict)
    page_size: int = PAGE_SIZE

    @classmethod
    def from_status(cls, status: np.ndarray, page_size: int = PAGE_SIZE) -> Placement:
        values, counts = np.unique(status, return_counts=True)
        by_node = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v >= 0}
        absent = {syscalls.errno_name(int(v)): int(c) for v, c in zip(values, counts, strict=True) if v < 0}
        return cls(pages=int(status.size), by_node=by_node, absent=absent, page_size=page_size)

    def fraction_on(self, nodes: Iterable[int]) -> float:
        if self.pages == 0:
            return 0.0
        return sum(self.by_node.get(n, 0) for n in set(nodes)) / self.pages

    @property
    def present(self) -> int:
        return sum(self.by_node.values())

    def describe(self) -> str:
        parts = [f"node {n}: {c} ({c / self.pages:.1%})" for n, c in sorted(self.by_node.items())]
        parts += [f"{name}: {c}" for name, c in sorted(self.absent.items())]
        return f"{self.pages} pages; " + ", ".join(parts or ["empty"])


def placement(start: int, length: int) -> Placement:
    """Ask the kernel where each page of [start, start+length) is (without faulting anything in)."""
    return Placement.from_status(syscalls.query_pages(page_addresses(start, length)))


@dataclass(frozen=True)
class MigrationResult:
    """What one migration call did. `failed` counts pages that did not reach the target, by errno name."""

    target: int
    pages: int
    moved: int
    already: int
    absent: int
    failed: dict[str, int]
    busy_rechecked: int
    seconds: float
    page_size: int = PAGE_SIZE

    @property
    def bytes_moved(self) -> int:
        return self.moved * self.page_size

    @property
    def gb_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def migrate(start: int, length: int, node: int, *, batch: int = syscalls.MOVE_BATCH) -> MigrationResult:
    """Move the present pages of [start, start+length) to node with batched move_pages.

    Pages already on node are not moved and counted apart; pages never touched are skipped (there is
    nothing to move). A page reported EBUSY is asked again: with transparent huge pages the kernel
    reports one 4 KiB subpage EBUSY although its huge page moved.
    """
    pages = page_addresses(start, length)
    before = syscalls.query_pages(pages)
    present = before >= 0
    already = int(np.count_nonzero(before == node))
    to_move = pages[present & (before != node)]

    t0 = time.perf_counter()
    status = syscalls.move_pages(to_move, node, batch=batch) if to_move.size else np.empty(0, dtype=np.int32)
    seconds = time.perf_counter() - t0

    busy = status == -errno_mod.EBUSY
    rechecked = int(np.count_nonzero(busy))
    if rechecked:
        status = status.copy()
        status[busy] = syscalls.query_pages(to_move[busy])
    failed_codes = status[status != node]
    failed = Counter(syscalls.errno_name(int(c)) if c < 0 else f"on node {int(c)}" for c in failed_codes)
    return MigrationResult(
        target=node,
        pages=int(pages.size),
        moved=int(np.count_nonzero(status == node)),
        already=already,
        absent=int(np.count_nonzero(~present)),
        failed=dict(failed),
        busy_rechecked=rechecked,
        seconds=seconds,
    )
