"""Shared test set-up: tests marked numa_vm need several NUMA nodes and skip, with the reason, elsewhere."""

from __future__ import annotations

import pytest

from tieremu.numa.topology import discover


def _memory_nodes() -> tuple[int, ...]:
    return discover("/").memory_nodes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    nodes = _memory_nodes()
    if len(nodes) >= 2:
        return
    skip = pytest.mark.skip(
        reason=f"needs 2+ NUMA memory nodes, this machine has {len(nodes)}: runs inside the multi-node QEMU "
        "guest (scripts/test.sh does that after the host suite; or: tieremu vm run -- "
        ".venv/bin/python -m pytest -m numa_vm)"
    )
    for item in items:
        if "numa_vm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def memory_nodes() -> tuple[int, ...]:
    return _memory_nodes()


@pytest.fixture
def missing_node(memory_nodes: tuple[int, ...]) -> int:
    """A node id that has no memory on this machine."""
    return max(memory_nodes) + 1


@pytest.fixture
def meshes_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The network namespaces this test's cluster replays create (other runs on the machine may have theirs)."""
    from cluster_helpers import record_meshes

    return record_meshes(monkeypatch)
