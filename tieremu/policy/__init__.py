"""KV-block placement policies behind one small interface (base.py), chosen by name (registry.py)."""

from tieremu.policy.base import (
    AccessCounts,
    AccessEvent,
    BlockView,
    Move,
    Plan,
    Policy,
    PolicyContext,
    TierState,
    UpcomingRequest,
)
from tieremu.policy.registry import get_policy, names

__all__ = [
    "AccessCounts",
    "AccessEvent",
    "BlockView",
    "Move",
    "Plan",
    "Policy",
    "PolicyContext",
    "TierState",
    "UpcomingRequest",
    "get_policy",
    "names",
]
