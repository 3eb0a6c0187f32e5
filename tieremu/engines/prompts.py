"""Prompts built from a trace's hash ids: equal hash ids give equal token blocks, so the trace's prefix sharing is
real prefix sharing inside the engine (its block hashes match where the trace's do)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tieremu.errors import ConfigError
from tieremu.workloads.trace import Request


@dataclass(frozen=True)
class EnginePrompt:
    index: int  # request index in the trace
    arrival_s: float
    token_ids: tuple[int, ...]
    output_tokens: int


def block_tokens_of(hash_id: int, block_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The token block of one hash id: drawn from a generator seeded by (seed, hash id), the same on every machine.
    Token 0 is left out (often a special token)."""
    digest = hashlib.blake2b(f"{seed}:{hash_id}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return rng.integers(1, vocab_size, size=block_tokens, dtype=np.int64)


def build_prompts(requests: Sequence[Request], block_tokens: int, vocab_size: int, *,
                  max_tokens: int | None = None, seed: int = 0) -> list[EnginePrompt]:
    """One prompt per request: its hash ids' blocks in order, the last cut to the request's own length (as
    `Request.block_tokens` splits it); at least one output token."""
    if block_tokens < 1:
        raise ConfigError(f"--block-tokens {block_tokens}: give 1 or more tokens per hash id")
    prompts = []
    for index, request in enumerate(requests):
        if not request.hash_ids:
            raise ConfigError(f"trace request {index} has no hash_ids: a prompt is built from them")
        parts = [block_tokens_of(h, block_tokens, vocab_size, seed)[:n]
                 for h, n in zip(request.hash_ids, request.block_tokens(block_tokens), strict=True)]
        tokens = tuple(int(t) for t in np.concatenate(parts))
        if max_tokens is not None and len(tokens) + max(1, request.output_length) > max_tokens:
            raise ConfigError(f"trace request {index}: {len(tokens)} prompt + {request.output_length} output tokens "
                              f"exceed the model's {max_tokens} positions; use a smaller --block-tokens or "
                              "--max-requests")
        prompts.append(EnginePrompt(index, request.arrival_s, tokens, max(1, request.output_length)))
    return prompts
