"""A tier's capacity as a trace replay takes it: a number of blocks, or a share of the trace's distinct blocks
(`10%`), resolved once the trace is read. Checked twice: the form before anything is read, the block count after."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tieremu.errors import ConfigError


@dataclass(frozen=True)
class Capacity:
    blocks: int | None = None
    share: float | None = None  # of the trace's distinct blocks, in (0, 1]

    @classmethod
    def parse(cls, raw: object, where: str) -> Capacity:
        """`N` blocks (1 or more) or `P%` (above 0, at most 100); `where` names the setting in errors."""
        if isinstance(raw, str) and raw.strip().endswith("%"):
            text = raw.strip()[:-1]
            try:
                percent = float(text)
            except ValueError:
                raise ConfigError(f"{where}={raw!r}: expected a number of blocks or a share such as 10%") from None
            if not 0 < percent <= 100 or not math.isfinite(percent):
                raise ConfigError(f"{where}={raw}: a share must be above 0% and at most 100% of the trace's "
                                  "distinct blocks")
            return cls(share=percent / 100)
        if isinstance(raw, str):
            try:
                raw = int(raw.strip())
            except ValueError:
                raise ConfigError(f"{where}={raw!r}: expected a number of blocks or a share such as 10%") from None
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ConfigError(f"{where}={raw!r}: expected a number of blocks or a share such as 10%")
        if raw < 1:
            raise ConfigError(f"{where}={raw}: give 1 block or more (leave it out for unlimited)")
        return cls(blocks=raw)

    def resolve(self, distinct_blocks: int, where: str) -> int:
        """Blocks: floor(share x the trace's distinct blocks) for a share; at least one, or an error."""
        if self.blocks is not None:
            return self.blocks
        assert self.share is not None
        blocks = math.floor(self.share * distinct_blocks)
        if blocks < 1:
            raise ConfigError(f"{where}={self.share * 100:g}% of the trace's {distinct_blocks:,} distinct blocks is "
                              "less than one block: give a larger share or a number of blocks")
        return blocks

    def __str__(self) -> str:
        return f"{self.blocks}" if self.blocks is not None else f"{(self.share or 0) * 100:g}%"


def distinct_blocks(hash_ids: object) -> int:
    """Distinct block keys of a trace's requests (anything with `hash_ids`)."""
    return len({block for request in hash_ids for block in request.hash_ids})  # type: ignore[attr-defined]
