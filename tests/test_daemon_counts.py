"""The daemon's compiled access counting (tieremu/native/counts.c, EventBatch.counts under ident "id") gives
exactly what a plain Python walk over the same access log gives, and what the numpy path gives: every column of
AccessCounts, its dtypes and its row order, for all-layers blocks (first read per step and sequence) and per-layer
ones, on random streams with shared blocks, repeated reads and ids that collide in a small table."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, fields

import numpy as np
import pytest

from tieremu.daemon.daemon import EventBatch
from tieremu.kv.access_log import AccessLog
from tieremu.policy.base import AccessCounts

TIERS = ["dram", "cxl", "far"]


@dataclass
class Layout:
    per_layer: bool


@dataclass
class Cache:
    layout: Layout


@dataclass
class Pool:
    order: list[str]


@dataclass
class View:
    """What EventBatch reads of a PoolView."""

    cache: Cache
    pool: Pool
    ident: str = "id"


def stream(rng: random.Random, steps: int, seqs: int, layers: int, ids: list[int]) -> AccessLog:
    """A decode-shaped log: per step, per layer, per sequence one read of its blocks (some shared between
    sequences, a block now and then read twice in one chunk), each in a tier that may change between steps."""
    log = AccessLog()
    tables = {s: rng.sample(ids, rng.randrange(1, min(12, len(ids)) + 1)) for s in range(seqs)}
    for step in range(steps):
        for seq in range(seqs):
            if rng.random() < 0.3:
                tables[seq].append(rng.choice(ids))
        where = {b: rng.randrange(len(TIERS)) for b in ids}
        for layer in range(layers):
            for seq in rng.sample(range(seqs), rng.randrange(0, seqs + 1)):
                blocks = list(tables[seq])
                if rng.random() < 0.2:
                    blocks.append(rng.choice(blocks))
                tier = [where[b] if rng.random() < 0.9 else rng.randrange(len(TIERS)) for b in blocks]
                log.record(step, layer, seq, np.array(blocks, dtype=np.int64), np.array(tier, dtype=np.int16))
    return log


def textbook(log: AccessLog, start: int, end: int, per_layer: bool) -> dict[str, list[int]]:
    """A plain walk: the epoch's reads in log order (all-layers: only the first read of a block per step and
    sequence), then per block its count, first and last access, tiers of both, request and layer of the last;
    rows in the order of their last access."""
    reads = []
    seen = set()
    chunks = log.chunks(start, end)
    for i, (blocks, tiers) in enumerate(zip(chunks.block, chunks.tier, strict=True)):
        step, layer, seq, _ = chunks.meta[4 * i:4 * i + 4]
        for block, tier in zip(blocks.tolist(), tiers.tolist(), strict=True):
            if not per_layer:
                if (step, seq, block) in seen:
                    continue
                seen.add((step, seq, block))
            reads.append((block, tier, seq, layer))
    rows: dict[int, list[int]] = {}
    for i, (block, tier, seq, layer) in enumerate(reads):
        row = rows.setdefault(block, [block, 0, i, i, tier, tier, seq, layer])
        row[1] += 1
        row[3], row[5], row[6], row[7] = i, tier, seq, layer
    ordered = sorted(rows.values(), key=lambda r: r[3])
    index = {r[0]: n for n, r in enumerate(ordered)}
    out = {name: [r[k] for r in ordered] for k, name in enumerate(
        ("block", "count", "first", "last", "first_tier", "tier", "request", "layer"))}
    out["row"] = [index[b] for b, *_ in reads]
    out["access_tier"] = [t for _, t, _, _ in reads]
    out["access_request"] = [s for _, _, s, _ in reads]
    return out


def batch(log: AccessLog, start: int, end: int, per_layer: bool) -> EventBatch:
    count = sum(len(b) for b in log.chunks(start, end).block)
    return EventBatch(log, start, end, count, View(Cache(Layout(per_layer)), Pool(TIERS)), 7.5)  # type: ignore[arg-type]


def numpy_counts(b: EventBatch) -> AccessCounts:
    acc = b._accesses()
    return AccessCounts.of(TIERS, 7.5, acc.block, acc.tier, acc.seq, acc.layer if b._view.cache.layout.per_layer
                           else None, b)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize(("seed", "ids"), [
    (0, list(range(40))),
    (1, list(range(3))),
    (2, [7 << 20, 1 << 40, 2 ** 63 - 1, -(2 ** 63), -5, 0, 16, 32, 48, 64, 80]),  # spread ids, extremes, negatives
    (3, list(range(0, 4096, 16))),  # ids that share low bits: a weak hash would pile them in a few slots
])
def test_compiled_counts_equal_a_python_walk_and_the_numpy_path(per_layer: bool, seed: int, ids: list[int]) -> None:
    rng = random.Random(seed)
    log = stream(rng, steps=30, seqs=5, layers=3, ids=ids)
    marks = sorted({0, log.mark, *(rng.randrange(log.mark + 1) for _ in range(8))})
    for start, end in itertools.pairwise(marks):
        b = batch(log, start, end, per_layer)
        got = b.counts()
        assert got.events is b and got.tiers == tuple(TIERS) and got.time == 7.5
        want = textbook(log, start, end, per_layer)
        for name, column in want.items():
            if name == "layer" and not per_layer:
                assert got.layer is None
                continue
            assert getattr(got, name).tolist() == column, name
        reference = numpy_counts(b)
        for f in fields(AccessCounts):
            if f.name in ("events", "tiers", "time"):
                continue
            mine, theirs = getattr(got, f.name), getattr(reference, f.name)
            if theirs is None:
                assert mine is None
                continue
            assert mine.dtype == theirs.dtype, f.name
            assert np.array_equal(mine, theirs), f.name


def test_an_empty_epoch_counts_nothing() -> None:
    log = AccessLog()
    got = batch(log, 0, 0, False).counts()
    assert len(got) == 0 and got.accesses == 0
    log.record(0, 0, 1, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int16))
    got = batch(log, 0, 1, True).counts()
    assert len(got) == 0 and got.accesses == 0 and got.layer is not None and len(got.layer) == 0


def test_chunks_read_what_since_reads() -> None:
    log = stream(random.Random(4), steps=6, seqs=3, layers=2, ids=list(range(20)))
    chunks, acc, part = log.chunks(3, log.mark - 2), log.since(3), log.since(3, log.mark - 2)
    n = sum(chunks.meta[3::4])
    assert len(chunks) == log.mark - 5 and len(part) == n and sum(len(b) for b in chunks.block) == n
    assert np.concatenate(chunks.block).tolist() == acc.block[:n].tolist() == part.block.tolist()
    assert np.concatenate(chunks.tier).tolist() == acc.tier[:n].tolist() == part.tier.tolist()
    assert np.repeat(chunks.meta[0::4], chunks.meta[3::4]).tolist() == acc.step[:n].tolist() == part.step.tolist()
    assert part.layer.dtype == np.int32 and part.block.dtype == np.int64 and part.tier.dtype == np.int16
    assert len(log.since(log.mark)) == 0 and len(log) == len(acc) + sum(len(b) for b in log.chunks(0, 3).block)


def test_a_chunk_recorded_half_way_is_not_read() -> None:
    # record() may run outside the cache's lock (its attention kernel): the daemon's thread can come between its
    # lines. A chunk whose tiers are not appended yet is not counted by mark, nor read by chunks() or counts().
    log = AccessLog()
    log.record(0, 0, 3, np.array([4, 5], dtype=np.int64), np.array([0, 1], dtype=np.int16))
    log._meta += (0, 1, 3, 2)
    log._block.append(np.array([4, 5], dtype=np.int64))
    assert log.mark == 1 and len(log.chunks()) == 1 and len(log.chunks(0, 2)) == 1
    got = batch(log, 0, 2, True).counts()
    assert got.block.tolist() == [4, 5] and got.count.tolist() == [1, 1] and got.accesses == 2
