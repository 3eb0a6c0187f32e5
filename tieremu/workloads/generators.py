"""Seeded synthetic request traces in the Mooncake format, for the reuse patterns serving systems see.

- `chat`: multi-turn conversations; each turn's prompt is the whole conversation so far plus a new message.
- `agent`: agentic tool loops; every session starts with one large shared system prompt (the tool definitions),
  and each step's prompt is the session so far plus the last tool output.
- `rag`: retrieval-augmented questions; the prompt is a shared instruction, the retrieved document chunks
  (popular chunks are retrieved often, Zipf) and the question.
- `long`: long-context question answering; several questions over the same long document.

Hash ids follow Mooncake's prefix semantics: a block's id stands for its tokens and every token before it, so two
requests share the id of block k only if their first k+1 blocks hold the same tokens; a partly filled last block
that a later prompt extends gets a new id. Sessions arrive as a Poisson process scaled so that the whole trace
runs at `rate` requests per second; gaps inside a session are exponential. Everything is drawn from one seeded
generator, so the same arguments give the same trace, byte for byte.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tieremu.errors import WorkloadError
from tieremu.workloads.trace import MOONCAKE_BLOCK_TOKENS, Request

Segment = tuple[int, int]  # (content id, tokens): a run of tokens that is identical wherever the id recurs


class BlockHasher:
    """Assigns prefix-block hash ids: the same content after the same prefix gets the same id."""

    def __init__(self, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self._ids: dict[tuple[int, tuple[tuple[int, int, int], ...]], int] = {}
        self._contents = 0

    def content(self) -> int:
        """A fresh content id, for tokens that occur nowhere else."""
        self._contents += 1
        return self._contents

    def ids(self, segments: Sequence[Segment]) -> tuple[int, ...]:
        size = self.block_tokens
        out: list[int] = []
        parent = -1
        pieces: list[tuple[int, int, int]] = []
        filled = 0
        for content, length in segments:
            offset = 0
            while offset < length:
                take = min(length - offset, size - filled)
                pieces.append((content, offset, take))
                offset += take
                filled += take
                if filled == size:
                    parent = self._id(parent, pieces)
                    out.append(parent)
                    pieces, filled = [], 0
        if pieces:
            out.append(self._id(parent, pieces))
        return tuple(out)

    def _id(self, parent: int, pieces: list[tuple[int, int, int]]) -> int:
        key = (parent, tuple(pieces))
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self._ids)
        return found


@dataclass(frozen=True)
class _Draft:
    """A request before its arrival time is fixed: when it comes, counted from the start of its session."""

    offset_s: float
    segments: tuple[Segment, ...]
    output_length: int


def _tokens(rng: np.random.Generator, mean: float, low: int = 1) -> int:
    """A lognormal length with this mean (sigma 0.6): prompts and answers have long right tails."""
    sigma = 0.6
    return max(low, int(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma)))


Session = list[_Draft]


@dataclass(frozen=True)
class SessionSource:
    """One kind of traffic: makes sessions on demand; `mean_requests` per session sets the session rate."""

    next_session: Callable[[], Session]
    mean_requests: float


def chat(rng: np.random.Generator, hasher: BlockHasher, *, system_tokens: int = 600, turns_mean: float = 5.0,
         user_tokens_mean: float = 250, answer_tokens_mean: float = 300, think_s_mean: float = 30.0) -> SessionSource:
    system = hasher.content()

    def session() -> Session:
        history: list[Segment] = [(system, system_tokens)]
        drafts, offset = [], 0.0
        for _ in range(1 + rng.poisson(turns_mean - 1)):
            history.append((hasher.content(), _tokens(rng, user_tokens_mean)))
            answer = _tokens(rng, answer_tokens_mean)
            drafts.append(_Draft(offset, tuple(history), answer))
            history.append((hasher.content(), answer))
            offset += rng.exponential(think_s_mean)
        return drafts

    return SessionSource(session, turns_mean)


def agent(rng: np.random.Generator, hasher: BlockHasher, *, system_tokens: int = 6000, task_tokens_mean: float = 400,
          steps_mean: float = 8.0, action_tokens_mean: float = 120, tool_output_tokens_mean: float = 800,
          step_s_mean: float = 3.0) -> SessionSource:
    system = hasher.content()  # tool definitions and instructions, the same for every session

    def session() -> Session:
        context: list[Segment] = [(system, system_tokens), (hasher.content(), _tokens(rng, task_tokens_mean))]
        drafts, offset = [], 0.0
        for _ in range(1 + rng.poisson(steps_mean - 1)):
            action = _tokens(rng, action_tokens_mean)
            drafts.append(_Draft(offset, tuple(context), action))
            context.append((hasher.content(), action))
            context.append((hasher.content(), _tokens(rng, tool_output_tokens_mean)))
            offset += rng.exponential(step_s_mean)
        return drafts

    return SessionSource(session, steps_mean)


def rag(rng: np.random.Generator, hasher: BlockHasher, *, corpus_chunks: int = 400, chunk_tokens: int = 700,
        top_k: int = 4, zipf_a: float = 1.2, topics: int = 150, system_tokens: int = 300,
        question_tokens_mean: float = 60, answer_tokens_mean: float = 200) -> SessionSource:
    system = hasher.content()
    chunks = [hasher.content() for _ in range(corpus_chunks)]
    # A topic is what a retriever returns for a family of questions: popular chunks appear in many topics.
    # Chunks are ordered by id, as prefix-cache-aware RAG servers order them, so topics share leading chunks.
    popularity = 1.0 / np.arange(1, corpus_chunks + 1) ** zipf_a
    popularity /= popularity.sum()
    retrieved = [sorted(rng.choice(corpus_chunks, size=top_k, replace=False, p=popularity).tolist())
                 for _ in range(topics)]
    topic_weight = 1.0 / np.arange(1, topics + 1) ** zipf_a
    topic_weight /= topic_weight.sum()

    def session() -> Session:
        topic = retrieved[int(rng.choice(topics, p=topic_weight))]
        segments = [(system, system_tokens), *((chunks[c], chunk_tokens) for c in topic),
                    (hasher.content(), _tokens(rng, question_tokens_mean))]
        return [_Draft(0.0, tuple(segments), _tokens(rng, answer_tokens_mean))]

    return SessionSource(session, 1.0)


def long_context(rng: np.random.Generator, hasher: BlockHasher, *, document_tokens_mean: float = 60_000,
                 document_tokens_max: int = 128_000, questions_mean: float = 4.0, question_tokens_mean: float = 100,
                 answer_tokens_mean: float = 300, gap_s_mean: float = 60.0) -> SessionSource:
    def session() -> Session:
        document = (hasher.content(), min(document_tokens_max, _tokens(rng, document_tokens_mean, low=16_000)))
        drafts, offset = [], 0.0
        for _ in range(1 + rng.poisson(questions_mean - 1)):
            question = (hasher.content(), _tokens(rng, question_tokens_mean))
            drafts.append(_Draft(offset, (document, question), _tokens(rng, answer_tokens_mean)))
            offset += rng.exponential(gap_s_mean)
        return drafts

    return SessionSource(session, questions_mean)


KINDS: dict[str, Callable[..., SessionSource]] = {"chat": chat, "agent": agent, "rag": rag, "long": long_context}
DEFAULT_MIX: dict[str, float] = {"chat": 0.4, "agent": 0.3, "rag": 0.2, "long": 0.1}


def generate(kind: str, n_requests: int, *, seed: int = 0, rate: float = 4.0,
             block_tokens: int = MOONCAKE_BLOCK_TOKENS, **params: object) -> list[Request]:
    """n_requests of one kind (see KINDS), arriving at about `rate` requests per second."""
    return mix(n_requests, {kind: 1.0}, seed=seed, rate=rate, block_tokens=block_tokens,
               params={kind: params} if params else None)


def mix(n_requests: int, shares: Mapping[str, float] | None = None, *, seed: int = 0, rate: float = 4.0,
        block_tokens: int = MOONCAKE_BLOCK_TOKENS,
        params: Mapping[str, Mapping[str, object]] | None = None) -> list[Request]:
    """The first n_requests of a steady mix of kinds, each arriving at its share of `rate` requests per second
    (DEFAULT_MIX if no shares are given)."""
    shares = dict(DEFAULT_MIX if shares is None else shares)
    params = params or {}
    _check(n_requests, shares, rate, params)
    rng = np.random.default_rng(seed)
    hasher = BlockHasher(block_tokens)
    total = sum(shares.values())
    streams = [_Stream(KINDS[kind](rng, hasher, **dict(params.get(kind, {}))), rate * share / total, rng)
               for kind, share in shares.items() if share > 0]
    # Sessions that started before a horizon are generated in full; the horizon grows until the requests that
    # arrive before it are enough. Cutting there (not after the n-th generated request) keeps the arrival rate
    # steady to the end instead of thinning out as long sessions finish.
    horizon = n_requests / rate
    timed: list[tuple[float, int, _Draft]] = []
    while True:
        for stream in streams:
            stream.extend_to(horizon, timed)
        if sum(1 for at, _, _ in timed if at <= horizon) >= n_requests:
            break
        horizon *= 1.25
    timed.sort(key=lambda item: (item[0], item[1]))
    kept = timed[:n_requests]
    first = kept[0][0]
    return [_request(at - first, draft, hasher, block_tokens) for at, _, draft in kept]


class _Stream:
    """Sessions of one kind arriving as a Poisson process."""

    def __init__(self, source: SessionSource, request_rate: float, rng: np.random.Generator) -> None:
        self.source = source
        self.mean_gap_s = source.mean_requests / request_rate
        self.rng = rng
        self.next_start = rng.exponential(self.mean_gap_s)

    def extend_to(self, horizon: float, timed: list[tuple[float, int, _Draft]]) -> None:
        while self.next_start <= horizon:
            for draft in self.source.next_session():
                timed.append((self.next_start + draft.offset_s, len(timed), draft))
            self.next_start += self.rng.exponential(self.mean_gap_s)


def _request(at_s: float, draft: _Draft, hasher: BlockHasher, block_tokens: int) -> Request:
    input_length = sum(tokens for _, tokens in draft.segments)
    return Request(timestamp_ms=round(at_s * 1000), input_length=input_length,
                   output_length=draft.output_length, hash_ids=hasher.ids(draft.segments))


def _check(n_requests: int, shares: Mapping[str, float], rate: float,
           params: Mapping[str, Mapping[str, object]]) -> None:
    if n_requests < 1:
        raise WorkloadError(f"n_requests={n_requests} must be 1 or more")
    if not rate > 0:
        raise WorkloadError(f"rate={rate} must be positive (requests per second)")
    for kind, share in shares.items():
        if kind not in KINDS:
            raise WorkloadError(f"unknown trace kind {kind!r}; valid: {', '.join(KINDS)}")
        if share < 0:
            raise WorkloadError(f"share of {kind}={share} must be 0 or more")
    if not sum(shares.values()) > 0:
        raise WorkloadError(f"shares {dict(shares)} add up to nothing; give at least one positive share")
    for kind, values in params.items():
        if kind not in KINDS:
            raise WorkloadError(f"parameters for unknown trace kind {kind!r}; valid: {', '.join(KINDS)}")
        accepted = _parameters(KINDS[kind])
        for key in values:
            if key not in accepted:
                raise WorkloadError(f"trace kind {kind}: unknown parameter {key!r}; valid: {', '.join(accepted)}")


def _parameters(fn: Callable[..., object]) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
