"""The bookkeeping of pages.migrate, driven by scripted kernel answers (multi-node moves run in the guest)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from tieremu.numa import pages, syscalls


class FakeKernel:
    """Scripted move_pages: where pages start, what a move reports, where a re-query finds them."""

    def __init__(self, before: list[int], move_status: list[int], after: list[int]) -> None:
        self.before, self.move_status, self.after = before, move_status, after
        self.queries = 0
        self.moved: list[int] = []

    def query(self, addrs: np.ndarray, pid: int = 0) -> np.ndarray:
        self.queries += 1
        source = self.before if self.queries == 1 else self.after
        index = ((addrs - np.uint64(BASE)) // np.uint64(pages.PAGE_SIZE)).astype(int)
        return np.array([source[i] for i in index], dtype=np.int32)

    def move(self, addrs: np.ndarray, node: int, pid: int = 0, *, move_all: bool = False,
             batch: int = 0) -> np.ndarray:
        index = ((addrs - np.uint64(BASE)) // np.uint64(pages.PAGE_SIZE)).astype(int)
        self.moved = list(index)
        return np.array([self.move_status[i] for i in index], dtype=np.int32)


BASE = 0x7F0000000000


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def install(before: list[int], move_status: list[int], after: list[int]) -> FakeKernel:
        fake = FakeKernel(before, move_status, after)
        monkeypatch.setattr(syscalls, "query_pages", fake.query)
        monkeypatch.setattr(syscalls, "move_pages", fake.move)
        return fake
    return install


def test_pages_already_there_and_absent_pages_are_not_moved(kernel) -> None:  # type: ignore[no-untyped-def]
    fake = kernel(before=[1, 0, -errno.ENOENT, 0], move_status=[9, 1, 9, 1], after=[])
    r = pages.migrate(BASE, 4 * pages.PAGE_SIZE, 1)
    assert fake.moved == [1, 3]  # only the present pages not yet on node 1
    assert (r.pages, r.moved, r.already, r.absent, r.failed) == (4, 2, 1, 1, {})
    assert r.bytes_moved == 2 * pages.PAGE_SIZE


def test_thp_ebusy_is_rechecked_before_counting_a_failure(kernel) -> None:  # type: ignore[no-untyped-def]
    busy = -errno.EBUSY
    fake = kernel(before=[0, 0, 0, 0], move_status=[2, busy, 2, busy], after=[2, 2, 2, 0])
    r = pages.migrate(BASE, 4 * pages.PAGE_SIZE, 2)
    assert fake.queries == 2  # the second query asks only about the EBUSY pages
    assert r.busy_rechecked == 2
    assert r.moved == 3 and r.failed == {"on node 0": 1} and not r.ok


def test_per_page_errors_are_counted_by_errno(kernel) -> None:  # type: ignore[no-untyped-def]
    kernel(before=[0, 0, 0], move_status=[-errno.ENOMEM, 1, -errno.EACCES], after=[])
    r = pages.migrate(BASE, 3 * pages.PAGE_SIZE, 1)
    assert r.failed == {"ENOMEM": 1, "EACCES": 1} and r.moved == 1
