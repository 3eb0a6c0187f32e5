"""The index designs' names and numbers, and the consistent-hash ring of the hash design (no sockets here, so the
orchestrator and the CLI need not import ZeroMQ)."""

from __future__ import annotations

import bisect
import hashlib

INDEXES = ("broadcast", "hash")
LEASE_S = 1.5  # an entry outlives its sender's last word by this much
VNODES = 32


def ring_homes(key: int, instances: int, replicas: int = 2) -> tuple[int, ...]:
    """The home instances of a hash id: the first `replicas` distinct owners clockwise on a ring of virtual
    nodes (consistent hashing: adding an instance moves only the keys its virtual nodes take)."""
    ring = _ring(instances)
    point = _point(f"k{key}")
    homes: list[int] = []
    i = bisect.bisect_left(ring, (point, -1))
    for step in range(len(ring)):
        owner = ring[(i + step) % len(ring)][1]
        if owner not in homes:
            homes.append(owner)
            if len(homes) == min(replicas, instances):
                break
    return tuple(homes)


_RINGS: dict[int, list[tuple[int, int]]] = {}


def _ring(instances: int) -> list[tuple[int, int]]:
    if instances not in _RINGS:
        _RINGS[instances] = sorted((_point(f"i{i}v{v}"), i) for i in range(instances) for v in range(VNODES))
    return _RINGS[instances]


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
