"""Shared by the cluster replay tests: a crafted trace whose cross-instance reuse is spaced so that a peer hit does not
depend on the machine's speed, the child processes of a process (to check none is left), and the namespaces a
test's own runs create (other runs on the machine may have theirs meanwhile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tieremu.cluster import netns, replay


def reuse_trace(path: Path, groups: int = 3, gap_ms: int = 2000) -> Path:
    """Each group's prefix is prefilled by one instance, then asked for by the other two (round-robin), each
    `gap_ms` of trace time later: a peer holds every shared block long before it is wanted, however slow the machine,
    so a peer hit does not depend on the speed of prefill. 9 requests, 81 block references, 48 of them peer-held."""
    lines = []
    for g in range(groups):
        prefix = list(range(100 * g, 100 * g + 8))
        for k in range(3):
            ids = [*prefix, 100 * g + 50 + k]
            lines.append(json.dumps({"timestamp": (3 * g + k) * gap_ms, "input_length": 512 * len(ids),
                                     "output_length": 2, "hash_ids": ids}))
    path.write_text("\n".join(lines) + "\n")
    return path


def children(pid: int) -> set[int]:
    """The pids of `pid`'s child processes, over all its threads."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found |= {int(p) for p in text.split()}
    return found


def record_meshes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the names of every namespace a cluster replay in this process creates (before it creates it)."""
    names: list[str] = []

    class Recorded(replay.Mesh):
        def create(self) -> None:
            names.extend(self.namespaces)
            super().create()

    monkeypatch.setattr(replay, "Mesh", Recorded)
    return names


def live_namespaces() -> set[str]:
    """tieremu's network namespaces that exist now (anyone's)."""
    return {ns for ns in netns.list_namespaces() if ns.startswith(netns.PREFIX)}
