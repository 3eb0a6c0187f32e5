"""The engine's own KV tensor on a tier's node: placed through the engine's allocation hook, verified by move_pages.

While the engine allocates its KV cache (vLLM's `get_mem_pool_context()`), the allocating thread's memory policy
binds new pages to the tier's node, so they are faulted there. Pages the engine touches after the hook (an
allocator that returns untouched memory) are covered too: once the tensors are known, their ranges are bound with
mbind and any page already elsewhere is moved (MPOL_MF_MOVE). The kernel is then asked where every page is, and
the result says requested vs achieved. A tier that is emulated (its node missing here) is placed on its host node,
and the result says so: the tier map's nodes (`tier_nodes`), the node really asked for (`requested_node`, the host),
`origin: emulated`. Its memory there runs at host speed; the connector charges the engine's attention reads of it
the tier's timing model (a model, labelled as one: tieremu.engines.vllm, `attention_reads`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from tieremu.errors import PlacementError
from tieremu.numa import syscalls
from tieremu.numa.pages import PAGE_SIZE, placement
from tieremu.numa.syscalls import Policy


@dataclass(frozen=True)
class KVPlacement:
    """Where the engine's KV tensor is, as the kernel reports it."""

    tier: str | None  # None: not placed (the engine's default policy)
    backing: str  # the tier's backing (real, emulated, shaped, vm) or "default"
    requested_node: int | None  # the node the tensor was bound to: the tier's own, or its host when emulated
    bytes: int
    pages: int
    by_node: dict[int, int]
    absent_pages: int  # never touched (ENOENT) or zero page (EFAULT)
    achieved_fraction: float  # of all pages, on the requested node (1.0 when none was requested and all present)
    note: str = ""
    tier_nodes: tuple[int, ...] = ()  # the nodes the tier map names for the tier (missing here when emulated)

    @property
    def origin(self) -> str:
        """`emulated` when the tier's speed is not the memory's own (emulated or shaped), else `measured`."""
        return "emulated" if self.backing in ("emulated", "shaped") else "measured"

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"origin": self.origin}


@contextmanager
def bound_to(node: int) -> Iterator[None]:
    """The calling thread's new pages on `node` inside the block, its old policy back after it."""
    old_policy, old_nodes = syscalls.get_mempolicy()
    syscalls.set_mempolicy(Policy.BIND, [node])
    try:
        yield
    finally:
        syscalls.set_mempolicy(old_policy, old_nodes if old_policy.takes_nodes else ())


def _ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Page-aligned [start, end) of each distinct storage (layers' views may share one), merged."""
    spans = set()
    for t in tensors:
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size:
            spans.add((start - start % PAGE_SIZE, -(-(start + size) // PAGE_SIZE) * PAGE_SIZE))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def bind_tensors(tensors: Iterable[torch.Tensor], node: int) -> None:
    """Bind the tensors' memory to node and move any page already elsewhere (MPOL_MF_MOVE)."""
    for start, end in _ranges(tensors):
        syscalls.mbind(start, end - start, Policy.BIND, [node], move=True)


def verify(tensors: Iterable[torch.Tensor], *, tier: str | None, backing: str, node: int | None,
           note: str = "", tier_nodes: Iterable[int] = ()) -> KVPlacement:
    """Ask the kernel where each page of the tensors is (touching none)."""
    by_node: dict[int, int] = {}
    pages = absent = total = 0
    for start, end in _ranges(tensors):
        found = placement(start, end - start)
        pages += found.pages
        total += end - start
        absent += sum(found.absent.values())
        for n, c in found.by_node.items():
            by_node[n] = by_node.get(n, 0) + c
    if node is None:
        fraction = (pages - absent) / pages if pages else 0.0
    else:
        fraction = by_node.get(node, 0) / pages if pages else 0.0
    return KVPlacement(tier, backing, node, total, pages, by_node, absent, fraction, note, tuple(tier_nodes))


def require_placed(result: KVPlacement) -> None:
    """PlacementError unless every page is on the requested node."""
    if result.requested_node is not None and result.achieved_fraction < 1.0:
        raise PlacementError(f"--kv-tier {result.tier}: {result.achieved_fraction:.1%} of the engine's KV tensor "
                             f"({result.pages} pages) is on node {result.requested_node}; by node: {result.by_node}, "
                             f"not present: {result.absent_pages}")
