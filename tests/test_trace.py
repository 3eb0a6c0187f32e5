"""Mooncake-format traces: reading, writing, errors that name the line; seeded generators of the same format."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_paths import MOONCAKE_TRACE

from tieremu.cli.replay import generate_trace
from tieremu.errors import ConfigError, TraceError, WorkloadError
from tieremu.workloads.generators import KINDS, BlockHasher, generate, mix
from tieremu.workloads.trace import Request, ceiling_hit_ratio, parse_lines, read_trace, reference_count, write_trace

REPO = Path(__file__).resolve().parents[1]
SMALL_TRACE = REPO / "configs" / "traces" / "small.jsonl"
# How configs/traces/small.jsonl was made (tieremu generate-trace --out configs/traces --name small.jsonl --requests 300
# --seed 7): the shipped file must stay reproducible from it.
SMALL_REQUESTS, SMALL_SEED = 300, 7


@pytest.fixture(scope="module")
def shared_trace() -> list[Request]:
    return read_trace(MOONCAKE_TRACE)


def test_shared_trace_reads_with_its_documented_counts(shared_trace: list[Request]) -> None:
    raw = [json.loads(line) for line in MOONCAKE_TRACE.read_text().splitlines()]
    assert len(shared_trace) == len(raw) == 3993
    assert reference_count(shared_trace) == sum(len(r["hash_ids"]) for r in raw) == 121_877
    distinct = len({h for r in raw for h in r["hash_ids"]})
    assert ceiling_hit_ratio(shared_trace) == pytest.approx(1 - distinct / 121_877)
    assert round(ceiling_hit_ratio(shared_trace), 3) == 0.640
    first = shared_trace[0]
    assert (first.timestamp_ms, first.input_length, first.output_length) == (raw[0]["timestamp"],
                                                                             raw[0]["input_length"],
                                                                             raw[0]["output_length"])
    assert first.hash_ids == tuple(raw[0]["hash_ids"])


def test_write_then_read_is_identical(tmp_path: Path) -> None:
    requests = [Request(0, 700, 5, (1, 2)), Request(40, 512, 1, (1,)), Request(40, 0, 3, ())]
    path = tmp_path / "t.jsonl"
    write_trace(path, requests)
    assert read_trace(path) == requests
    assert json.loads(path.read_text().splitlines()[0]) == {"timestamp": 0, "input_length": 700,
                                                            "output_length": 5, "hash_ids": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]  # no temporary file left behind


def test_block_tokens_fill_all_but_the_last_block() -> None:
    assert Request(0, 1100, 1, (1, 2, 3)).block_tokens() == [512, 512, 76]
    assert Request(0, 1024, 1, (1, 2)).block_tokens() == [512, 512]
    assert Request(0, 100, 1, (1, 2, 3)).block_tokens() == [512, 512, 512]  # lengths disagree: hashes win
    assert Request(0, 100, 1, ()).block_tokens() == []


@pytest.mark.parametrize(("lines", "message"), [
    (['{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}', "{oops"],
     "t.jsonl:2: not a JSON object"),
    (['{"timestamp": 0, "input_length": 1, "hash_ids": [1]}'],
     "t.jsonl:1: missing field 'output_length'; a request needs timestamp, input_length, output_length, hash_ids"),
    (['{"timestamp": -5, "input_length": 1, "output_length": 1, "hash_ids": [1]}'],
     "t.jsonl:1: timestamp=-5 must be an integer 0 or more"),
    (['{"timestamp": 0, "input_length": 1.5, "output_length": 1, "hash_ids": [1]}'],
     "t.jsonl:1: input_length=1.5 must be an integer 0 or more"),
    (['{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": ["a"]}'],
     "t.jsonl:1: hash_ids must be a list of integers"),
    (['[1, 2]'], "t.jsonl:1: expected a JSON object"),
    (['{"timestamp": 9, "input_length": 1, "output_length": 1, "hash_ids": [1]}', "",
      '{"timestamp": 3, "input_length": 1, "output_length": 1, "hash_ids": [1]}'],
     "t.jsonl:3: timestamp 3 is earlier than the previous line's 9; requests must be in arrival order"),
    ([], "t.jsonl: the trace holds no requests"),
])
def test_bad_traces_name_the_line_and_the_problem(lines: list[str], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_lines(lines, source="t.jsonl")


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.jsonl: trace file not found"):
        read_trace(tmp_path / "nope.jsonl")


# -- generators -----------------------------------------------------------------------------------------------------

def prefix_consistent(requests: list[Request]) -> bool:
    """Mooncake semantics: an id at position k always follows the same id at position k-1."""
    parent: dict[int, int] = {}
    for r in requests:
        for k, block in enumerate(r.hash_ids):
            before = r.hash_ids[k - 1] if k else -1
            if parent.setdefault(block, before) != before:
                return False
    return True


def test_block_hasher_shares_exactly_the_common_prefix() -> None:
    hasher = BlockHasher(block_tokens=4)
    a, b, c = hasher.content(), hasher.content(), hasher.content()
    first = hasher.ids([(a, 6), (b, 3)])  # blocks: a0-3 | a4-5 b0-1 | b2
    longer = hasher.ids([(a, 6), (b, 3), (c, 2)])  # same two full blocks, then b2 c0-1: a new id
    other = hasher.ids([(a, 6), (c, 3)])
    assert len(first) == 3 and first[:2] == longer[:2] and first[2] != longer[2]
    assert other[0] == first[0] and other[1] != first[1]
    assert hasher.ids([(a, 6), (b, 3)]) == first


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_is_seeded_consistent_and_reuses_blocks(kind: str) -> None:
    requests = generate(kind, 200, seed=3)
    assert generate(kind, 200, seed=3) == requests
    assert generate(kind, 200, seed=4) != requests
    assert len(requests) == 200
    assert all(b.timestamp_ms >= a.timestamp_ms for a, b in itertools.pairwise(requests))
    assert all(len(r.hash_ids) == math.ceil(r.input_length / 512) for r in requests)
    assert prefix_consistent(requests)
    assert ceiling_hit_ratio(requests) > 0.2


def test_agents_share_the_system_prompt_and_chats_extend_their_history() -> None:
    agents = generate("agent", 100, seed=1, system_tokens=2048)
    assert len({r.hash_ids[:4] for r in agents}) == 1  # 2048 tokens = 4 shared blocks in every request
    chats = generate("chat", 100, seed=1)
    extended = sum(1 for a in chats for b in chats
                   if len(b.hash_ids) > len(a.hash_ids) >= 2 and b.hash_ids[: len(a.hash_ids) - 1] ==
                   a.hash_ids[:-1] and b.timestamp_ms > a.timestamp_ms)
    assert extended >= 50  # later turns reuse every full block of earlier ones
    docs = generate("long", 50, seed=1)
    assert min(r.input_length for r in docs) >= 16_000


def test_mix_runs_at_the_requested_rate() -> None:
    requests = mix(2000, seed=5, rate=8.0)
    span = requests[-1].arrival_s - requests[0].arrival_s
    assert len(requests) / span == pytest.approx(8.0, rel=0.2)
    assert prefix_consistent(requests)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: mix(10, {"chats": 1.0}), "unknown trace kind 'chats'; valid: chat, agent, rag, long"),
    (lambda: mix(0), "n_requests=0 must be 1 or more"),
    (lambda: mix(10, {"chat": 0.0}), "add up to nothing"),
    (lambda: generate("rag", 10, top_n=3), "trace kind rag: unknown parameter 'top_n'; valid: corpus_chunks"),
    (lambda: mix(10, rate=0), "rate=0 must be positive"),
])
def test_generator_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        call()


def test_shipped_small_trace_is_reproducible_from_its_seed() -> None:
    shipped = read_trace(SMALL_TRACE)
    assert shipped == mix(SMALL_REQUESTS, seed=SMALL_SEED), (
        "configs/traces/small.jsonl no longer matches its generator; if the generator changed on purpose, "
        "regenerate it: tieremu generate-trace --out configs/traces --name small.jsonl "
        f"--requests {SMALL_REQUESTS} --seed {SMALL_SEED}")
    assert len(shipped) == SMALL_REQUESTS and prefix_consistent(shipped)


def test_generate_trace_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(generate_trace, ["--out", str(tmp_path / "new"), "--kind", "rag", "--requests", "50",
                                                 "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert read_trace(tmp_path / "new" / "rag-50-seed2.jsonl") == generate("rag", 50, seed=2)
    assert "50 requests" in result.output
    named = CliRunner().invoke(generate_trace, ["--out", str(tmp_path), "--name", "g.jsonl", "--requests", "3",
                                                "--json"])
    assert named.exit_code == 0, named.output
    data = json.loads(named.output)
    assert data["path"] == str(tmp_path / "g.jsonl") and data["requests"] == 3
    assert read_trace(tmp_path / "g.jsonl") == mix(3, seed=0)
    bad = CliRunner().invoke(generate_trace, ["--out", str(tmp_path), "--name", "a/b.jsonl", "--requests", "3"])
    assert isinstance(bad.exception, ConfigError) and "a file name, not a path" in str(bad.exception)
    old_style = CliRunner().invoke(generate_trace, [str(tmp_path / "t.jsonl"), "--requests", "3"])
    assert old_style.exit_code == 2 and f"--out {tmp_path} --name t.jsonl" in old_style.output
    assert not (tmp_path / "t.jsonl").exists()
