"""A trial's overlay over a view of blocks: while the placement engine decides how to make room, blocks are shown
where they are headed, and each tier's count moves with them; when the trial ends everything is shown where it
really is again. One object so that every Board (the cache's PoolView, the attached daemon's ChunkView) stages the
same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Staging:
    """Blocks staged in a tier (None: in no tier), the staged blocks that are pinned, and each tier's staged change
    of its block count."""

    def __init__(self) -> None:
        self.shown: dict[int, str | None] = {}
        self.pins: set[int] = set()
        self.delta: dict[str, int] = {}

    def tier_of(self, block: int, real: Callable[[int], str | None]) -> str | None:
        """Where block is shown: where it is staged, else where `real` says it is."""
        return self.shown[block] if block in self.shown else real(block)

    def stage(self, block: int, shown_now: str | None, tier: str | None, *, pinned: bool = False) -> None:
        """Show block in tier from now on (it was shown in `shown_now`)."""
        if shown_now is not None:
            self.delta[shown_now] = self.delta.get(shown_now, 0) - 1
        if tier is not None:
            self.delta[tier] = self.delta.get(tier, 0) + 1
        self.shown[block] = tier
        if pinned:
            self.pins.add(block)
        else:
            self.pins.discard(block)

    def blocks_in(self, tier: str, real: Iterable[int]) -> list[int]:
        """The blocks shown in tier: those really there and not staged elsewhere, then those staged there."""
        shown = self.shown
        if not shown:
            return list(real)
        return [b for b in real if b not in shown] + [b for b, t in shown.items() if t == tier]

    def change(self, tier: str) -> int:
        """The staged change of tier's block count."""
        return self.delta.get(tier, 0)

    def clear(self) -> None:
        """The trial is over: nothing staged."""
        self.shown.clear()
        self.pins.clear()
        self.delta.clear()
