"""The one placement engine (tieremu.policy.engine) on a board of its own: making room pushes the policy's victim
one tier down and out of the last, a tier full of pinned blocks is refused with nothing shown, admission falls
through to the first tier that can take the block, the ledger counts ping-pongs in its window, the channel and the
token bucket keep a budget. Simulate, execute mode, the daemon and the store drive this code (their tests compare
them with each other and with textbook caches); here its rules are checked by hand."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from tieremu.errors import PolicyError
from tieremu.policy.base import BlockView, Policy
from tieremu.policy.engine import (
    FULL,
    VICTIM_IN_USE,
    MigrationChannel,
    MoveLedger,
    TokenBucket,
    admit,
    check_move,
    make_room,
)


class Board:
    """Tiers as lists, oldest first; the victim is the oldest unpinned block (FIFO), as a hand-checked policy."""

    def __init__(self, caps: list[int | None], pinned: set[int] | None = None, busy: set[int] | None = None) -> None:
        self.names = [f"t{i}" for i in range(len(caps))]
        self.caps = caps
        self.tiers: list[list[int]] = [[] for _ in caps]
        self.pins = set(pinned or ())
        self.busy = set(busy or ())

    def used_in(self, rank: int) -> int:
        return len(self.tiers[rank])

    def capacity_of(self, rank: int) -> int | None:
        return self.caps[rank]

    def pinned_count(self, rank: int) -> int:
        return sum(b in self.pins for b in self.tiers[rank])

    def show(self, block: int, rank: int) -> None:
        self.tiers[rank].append(block)

    def hide(self, block: int) -> None:
        for tier in self.tiers:
            if block in tier:
                tier.remove(block)

    def pick_victim(self, policy: Policy, rank: int, newcomer: int) -> int:
        return next(b for b in self.tiers[rank] if b not in self.pins and b != newcomer)

    def droppable(self, block: int) -> bool:
        return block not in self.busy

    def trial(self) -> nullcontext[None]:
        return nullcontext()


class Fifo(Policy):
    name = "fifo"

    def admit(self, block: int, view: BlockView) -> str:
        return "t0"

    def victim(self, tier: str, view: BlockView) -> int:
        raise AssertionError("the board picks")


def test_a_full_tier_pushes_its_victim_one_tier_down_and_the_last_one_out() -> None:
    board = Board([2, 2])
    board.tiers = [[1, 2], [3, 4]]
    chain: list[tuple[int, int, int | None]] = []
    assert make_room(board, Fifo(), 5, 0, chain) is None
    assert board.tiers == [[2, 5], [4, 1]]
    assert chain == [(3, 1, None), (1, 0, 1)]  # deepest first: each step has room when carried out


def test_a_tier_full_of_pinned_blocks_is_refused_with_nothing_shown() -> None:
    board = Board([2, None], pinned={1, 2})
    board.tiers = [[1, 2], []]
    chain: list[tuple[int, int, int | None]] = []
    assert make_room(board, Fifo(), 5, 0, chain) == FULL and board.tiers == [[1, 2], []] and chain == []
    admission = admit(board, Fifo(), 5, 0)  # falls through to the next tier
    assert (admission.rank, admission.wanted, admission.chain) == (1, 0, []) and board.tiers == [[1, 2], [5]]


def test_a_victim_a_running_sequence_reads_is_not_dropped() -> None:
    board = Board([1], busy={1})
    board.tiers = [[1]]
    assert make_room(board, Fifo(), 2, 0, []) == VICTIM_IN_USE
    assert make_room(Board([1]), None, 2, 0, []) is None  # room left: no policy needed
    full = Board([1])
    full.tiers = [[1]]
    assert make_room(full, None, 2, 0, []) == FULL  # no policy to pick a victim


def test_plans_are_checked_for_reason_direction_and_tiers() -> None:
    ranks = {"dram": 0, "cxl": 1}
    check_move(1, "cxl", "dram", "promote", ranks, "policy p")
    check_move(1, "dram", "cxl", "demote", ranks, "policy p")
    for source, target, reason, match in (("dram", "cxl", "promote", "faster tier"),
                                          ("cxl", "dram", "demote", "slower one"),
                                          ("cxl", "dram", "teleport", "reason"),
                                          ("cxl", "nowhere", "promote", "named tier 'nowhere'")):
        with pytest.raises(PolicyError, match=match):
            check_move(1, source, target, reason, ranks, "policy p")


def test_the_ledger_counts_a_move_back_within_its_window_as_a_ping_pong() -> None:
    ledger = MoveLedger(window=2)
    ledger.record(7, 1, 0, "promote", at=0, nbytes=10)
    ledger.record(7, 0, 1, "demote", at=2, nbytes=10)  # back where it came from, within 2
    ledger.record(7, 1, 0, "promote", at=5, nbytes=10)  # back again, but 3 later
    ledger.record(8, 1, 0, "prefetch", at=5)
    assert ledger.ping_pongs == 1 and ledger.bytes == 30 and ledger.count == 4
    assert ledger.moved == {"promote": 2, "demote": 1, "prefetch": 1}


def test_the_channel_carries_one_block_at_a_time() -> None:
    channel = MigrationChannel(start=10.0)
    assert channel.carry(10.0, 2.0) == 12.0 and channel.carry(11.0, 2.0) == 14.0  # queued behind the first
    assert channel.busy_past(13.0, now=11.0) and not channel.busy_past(15.0, now=11.0)
    assert channel.carry(20.0, 1.0) == 21.0  # idle meanwhile: starts at once


def test_the_token_bucket_keeps_the_rate_and_saves_up_at_most_its_burst() -> None:
    bucket = TokenBucket(1.0, burst_s=0.5)  # 1 GB/s, half a second saved up at most
    assert bucket.allowance(0.0) == 500_000_000
    bucket.spend(700_000_000)  # a whole block overshoots: paid back by what accrues next
    assert bucket.allowance(0.0) == 0 and bucket.wait_s(0.0) == pytest.approx(0.2, rel=1e-6)
    assert bucket.allowance(10.0) == 500_000_000  # ten seconds idle still save up only the burst
    assert TokenBucket(None, 0.5).allowance(0.0) is None and TokenBucket(None, 0.5).wait_s(0.0) == 0.0


def test_a_trials_staging_shows_blocks_where_they_are_headed_and_forgets_them_after() -> None:
    from tieremu.policy.staging import Staging

    real = {1: "dram", 2: "dram", 3: "cxl"}
    staging = Staging()
    staging.stage(1, real[1], "cxl")  # pushed down
    staging.stage(4, None, "dram", pinned=True)  # the newcomer, shown in the room made for it
    staging.stage(3, staging.tier_of(3, real.get), None)  # dropped from the last tier
    assert [staging.tier_of(b, real.get) for b in (1, 2, 3, 4)] == ["cxl", "dram", None, "dram"]
    assert staging.blocks_in("dram", [1, 2]) == [2, 4] and staging.blocks_in("cxl", [3]) == [1]
    assert (staging.change("dram"), staging.change("cxl")) == (0, 0)  # one out, one in, for each tier
    assert staging.pins == {4}
    staging.stage(4, "dram", "cxl")  # restaged unpinned
    assert staging.pins == set() and (staging.change("dram"), staging.change("cxl")) == (-1, 1)
    staging.clear()
    assert staging.tier_of(1, real.get) == "dram" and staging.blocks_in("dram", [1, 2]) == [1, 2]
    assert staging.change("cxl") == 0
