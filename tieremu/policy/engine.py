"""The one placement engine (DESIGN.md layer 5) that simulate mode, execute mode, the migration daemon and the
engine connector's store all drive: a policy is written once and means the same in all of them.

What lives here, and nowhere else:
- making room (`make_room`): a block that is in no tier is shown in a tier; if that overfills it, the policy's
  victim is pushed one tier down (recursively), or out of the last tier. The newcomer is shown pinned before the
  policy is asked, so the policy never sees a block in no tier and never picks the newcomer itself;
- admission (`admit`): a new block goes where the policy admits it, or, if that tier is full of pinned blocks,
  the first tier below that can take it; the policy is told where it went;
- plan checking (`check_move`): a move's reason and direction, and the tiers it names;
- the move ledger (`MoveLedger`): moves by reason, bytes, and ping-pongs (a block moved back where it came from
  within a window of its last move);
- budgets: `MigrationChannel` (one channel carrying one block at a time at the tier pair's bandwidth, capped by
  the budget: simulate's clock) and `TokenBucket` (bytes allowed per wall-clock interval: the daemon's).

The engine only decides. Whoever drives it owns a `Board` (the occupancy it decides on) and carries the decisions
out: simulate on its own counters at once, execute mode and the store with real page moves (tieremu.daemon.room),
the daemon's executor per plan move (tieremu.daemon.executor). Nothing here imports torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from tieremu.errors import PolicyError
from tieremu.policy.base import MOVE_REASONS, Policy

# Why room could not be made (the executor counts these as skip reasons).
FULL = "full"  # the tier is full of pinned blocks (or no policy was given to pick a victim)
VICTIM_IN_USE = "victim_in_use"  # the victim would leave the last tier, but a running sequence reads it

# One step of a chain that makes room: (block, from rank, to rank or None = out of the last tier). Deepest first:
# carried out in this order, each step has room.
Step = tuple[int, int, int | None]


class Board(Protocol):
    """The occupancy the engine decides on, tiers by rank (0 = fastest). It is also the BlockView policies read."""

    names: Sequence[str]

    def used_in(self, rank: int) -> int: ...  # blocks shown in the tier, staging included
    def capacity_of(self, rank: int) -> int | None: ...  # None: unlimited
    def pinned_count(self, rank: int) -> int: ...  # pinned blocks shown in the tier

    def show(self, block: int, rank: int) -> None:
        """Show a block that is in no tier in this tier, pinned at least until the engine has asked for the tier's
        victim."""
        ...

    def hide(self, block: int) -> None:
        """Show a victim in no tier (it is on its way down or out)."""
        ...

    def pick_victim(self, policy: Policy, rank: int, newcomer: int) -> int:
        """The policy's victim of the tier, checked (see checked_victim), with `newcomer` pinned meanwhile."""
        ...

    def droppable(self, block: int) -> bool: ...  # may leave the last tier (no running sequence reads it)

    def trial(self) -> AbstractContextManager[None]:
        """A scope for one attempt at making room: what it showed is shown as it really is after."""
        ...


def make_room(board: Board, policy: Policy | None, block: int, rank: int, chain: list[Step]) -> str | None:
    """Show `block` (in no tier) in tier `rank`, pushing victims down as needed; each push is appended to `chain`,
    deepest first. None when done; else why not (FULL, VICTIM_IN_USE). FULL is answered before anything is shown."""
    capacity = board.capacity_of(rank)
    used = board.used_in(rank)
    if capacity is not None and used >= capacity and (policy is None or used <= board.pinned_count(rank)):
        return FULL  # nothing in it may leave
    board.show(block, rank)
    if capacity is None or used < capacity:
        return None
    assert policy is not None
    victim = board.pick_victim(policy, rank, block)
    board.hide(victim)
    below = rank + 1
    if below < len(board.names) and make_room(board, policy, victim, below, chain) is None:
        chain.append((victim, rank, below))
        return None
    if not board.droppable(victim):
        return VICTIM_IN_USE
    chain.append((victim, rank, None))
    return None


@dataclass
class Admission:
    """Where a new block goes: `rank` (None: no tier could take it), the chain that makes room there, and the rank
    the policy admitted it to."""

    rank: int | None
    chain: list[Step]
    wanted: int


def admit(board: Board, policy: Policy, block: int, wanted: int) -> Admission:
    """Decide where a new block goes (tier `wanted`, the rank of the tier the policy's `admit` named, else the first
    below it that can take it) and how room is made there. The driver asks the policy itself (under its own lock
    and clock). A driver whose board changes in show/hide (simulate) has the outcome applied already; others see it
    only within each trial, and carry the chain out (deepest first) before they place the block."""
    for rank in range(wanted, len(board.names)):
        chain: list[Step] = []
        with board.trial():
            if make_room(board, policy, block, rank, chain) is None:
                return Admission(rank, chain, wanted)
    return Admission(None, [], wanted)


def rank_in(ranks: dict[str, int], tier: str, who: str) -> int:
    """A tier's rank; PolicyError naming the tiers if the policy named another."""
    try:
        return ranks[tier]
    except KeyError:
        raise PolicyError(f"{who} named tier {tier!r}; tiers: {', '.join(ranks)}") from None


def check_move(block: int, source: str, target: str, reason: str, ranks: dict[str, int], who: str) -> None:
    """A planned move is well formed: a known reason, known tiers, promote and prefetch up, demote down."""
    if reason not in MOVE_REASONS:
        raise PolicyError(f"{who} planned a move with reason {reason!r}; valid: {', '.join(MOVE_REASONS)}")
    s, t = rank_in(ranks, source, who), rank_in(ranks, target, who)
    if (t < s) != (reason != "demote") or s == t:
        raise PolicyError(f"{who} planned {reason} of block {block} from {source} to {target}: promote and "
                          "prefetch go to a faster tier, demote to a slower one")


# A block moved back where it came from within this many epochs of its last move is a ping-pong: one window for
# simulate, execute and both daemons, so their counts compare.
DEFAULT_PING_PONG_EPOCHS = 20


@dataclass
class MoveLedger:
    """Moves carried out: counts by reason, bytes, and ping-pongs. `window` is in the unit of the times given
    (simulate: epochs; execute mode: seconds)."""

    window: float
    moved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MOVE_REASONS, 0))
    bytes: int = 0
    ping_pongs: int = 0
    _last: dict[int, tuple[float, object, object]] = field(default_factory=dict, repr=False)

    def record(self, block: int, source: object, target: object, reason: str, at: float, nbytes: int = 0) -> None:
        self.moved[reason] += 1
        self.bytes += nbytes
        last = self._last.get(block)
        if last is not None and last[1] == target and last[2] == source and at - last[0] <= self.window:
            self.ping_pongs += 1
        self._last[block] = (at, source, target)

    def forget(self, block: int) -> None:
        self._last.pop(block, None)

    @property
    def count(self) -> int:
        return sum(self.moved.values())


class MigrationChannel:
    """One migration channel carrying one block at a time: a move starts when the channel is free and lands
    `seconds` later (the block's bytes over the tier pair's bandwidth, capped by the budget), so the bytes it
    carries never exceed the budget over the span it is busy."""

    def __init__(self, start: float = 0.0) -> None:
        self.free = start  # when the channel has carried every move so far

    def carry(self, now: float, seconds: float) -> float:
        """Put a move on the channel at `now`; when it lands."""
        self.free = max(now, self.free) + seconds
        return self.free

    def busy_past(self, deadline: float, now: float) -> bool:
        """A move asked for at `now` could not start before `deadline`."""
        return max(now, self.free) >= deadline


class TokenBucket:
    """Bytes a wall-clock budget allows: `gbps` accrues with elapsed time, at most `burst_s` of it is saved up, and
    an overshoot (a whole block is the unit) is paid back by what accrues next. None: no budget. Thread-safe: the
    daemon's epochs and the request path's moves (promotions, admissions' demotions) draw on one bucket."""

    def __init__(self, gbps: float | None, burst_s: float) -> None:
        self.rate = None if gbps is None else gbps * 1e9
        self.cap = None if self.rate is None else self.rate * burst_s
        self.credit = 0.0 if self.cap is None else self.cap
        self._last: float | None = None
        self._lock = threading.Lock()

    def allowance(self, now: float) -> int | None:
        """Bytes that may move now (None: unlimited)."""
        if self.rate is None or self.cap is None:
            return None
        with self._lock:
            if self._last is not None:
                self.credit = min(self.credit + self.rate * max(0.0, now - self._last), self.cap)
            self._last = max(now, self._last or now)
            return max(0, int(self.credit))

    def spend(self, nbytes: int) -> None:
        if self.rate is not None:
            with self._lock:
                self.credit -= nbytes

    def wait_s(self, now: float) -> float:
        """How long from `now` until some credit is left, so that one more block may move (0: at once, or no
        budget). A block may overshoot what is left: the overshoot is paid back by what accrues next."""
        if self.allowance(now) != 0 or self.rate is None:
            return 0.0
        return (1.0 - self.credit) / self.rate

    def wait(self, clock: Callable[[], float], sleep: Callable[[float], None]) -> float:
        """Sleep until some credit is left; the seconds waited."""
        waited = 0.0
        while (left := self.wait_s(clock())) > 0:
            sleep(left)
            waited += left
        return waited
