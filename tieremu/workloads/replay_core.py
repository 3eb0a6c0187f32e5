"""The compiled replay core's driver (placeholder until the C core lands)."""

from __future__ import annotations

NATIVE = ("lru", "lfu", "belady")


def supports(policy: object) -> bool:
    return False
