"""Request traces in the Mooncake JSONL format: one request per line, arrivals in milliseconds, prefix-block hashes.

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, 2353]}

Equal hash ids in two requests mean the same prefix KV block (one per `block_tokens` prompt tokens, 512 in the
Mooncake release), so the later request can reuse it. Lines must arrive in non-decreasing timestamp order.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tieremu.errors import TraceError
from tieremu.numbers import Range, number_problem
from tieremu.safefile import atomic_write

MOONCAKE_BLOCK_TOKENS = 512
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
FIELD_RANGE = Range(0, 2**53, integer=True)  # exact as a float too: arrivals become seconds
HASH_RANGE = Range(-(2**63), 2**63 - 1, integer=True)


@dataclass(frozen=True, slots=True)
class Request:
    timestamp_ms: int  # arrival, relative to the start of the trace
    input_length: int  # prompt tokens
    output_length: int  # generated tokens
    hash_ids: tuple[int, ...]  # prefix-block hashes, one per block of prompt tokens

    @property
    def arrival_s(self) -> float:
        return self.timestamp_ms / 1000.0

    def block_tokens(self, block_size: int = MOONCAKE_BLOCK_TOKENS) -> list[int]:
        """Prompt tokens in each block: full blocks, then what is left in the last (all full if the lengths
        disagree, as a trace's lengths are advisory and its hashes are not)."""
        n = len(self.hash_ids)
        if n == 0:
            return []
        last = self.input_length - (n - 1) * block_size
        if not 0 < last <= block_size:
            last = block_size
        return [block_size] * (n - 1) + [last]

    def to_json(self) -> str:
        return json.dumps({"timestamp": self.timestamp_ms, "input_length": self.input_length,
                           "output_length": self.output_length, "hash_ids": list(self.hash_ids)})


def read_trace(path: str | Path) -> list[Request]:
    """A trace file: a regular file (a device or FIFO may never end), UTF-8, one JSON request per line."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    except FileNotFoundError:
        raise TraceError(f"{path}: trace file not found") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc.strerror})") from None
    except ValueError:
        raise TraceError(f"{path!r}: not a valid path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TraceError(f"{path}: not a regular file; give a trace file")
    try:
        with os.fdopen(fd, "rb") as f:
            return parse_lines(_text_lines(f, str(path)), source=str(path))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc.strerror})") from None


def _text_lines(f: BinaryIO, source: str) -> Iterator[str]:
    for number, raw in enumerate(f, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(f"{source}:{number}: not UTF-8 text (byte {exc.start} of the line is "
                             f"{raw[exc.start]:#04x})") from None


def parse_lines(lines: Iterable[str], *, source: str = "<trace>") -> list[Request]:
    requests: list[Request] = []
    previous = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        request = _parse(line, f"{source}:{number}")
        if request.timestamp_ms < previous:
            raise TraceError(f"{source}:{number}: timestamp {request.timestamp_ms} is earlier than the previous "
                             f"line's {previous}; requests must be in arrival order")
        previous = request.timestamp_ms
        requests.append(request)
    if not requests:
        raise TraceError(f"{source}: the trace holds no requests")
    return requests


def _parse(line: str, where: str) -> Request:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"{where}: not a JSON object ({str(exc)[:100]})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object with keys {', '.join(FIELDS)}, got {line.strip()[:60]}")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise TraceError(f"{where}: missing field {missing[0]!r}; a request needs {', '.join(FIELDS)}")
    for key in FIELDS[:3]:
        value = obj[key]
        if number_problem(value, FIELD_RANGE) is not None:
            raise TraceError(f"{where}: {key}={str(value)[:40]} must be an integer 0 or more (at most 2**53)")
    ids = obj["hash_ids"]
    if not isinstance(ids, list) or not all(number_problem(h, HASH_RANGE) is None for h in ids):
        raise TraceError(f"{where}: hash_ids must be a list of integers ({HASH_RANGE.describe()}), got "
                         f"{str(ids)[:60]}")
    return Request(obj["timestamp"], obj["input_length"], obj["output_length"], tuple(ids))


def write_trace(path: str | Path, requests: Sequence[Request]) -> None:
    """Write atomically (a reader never sees half a trace) and safely: a symlink, device node or FIFO at path is
    refused, not replaced."""
    atomic_write(path, "".join(request.to_json() + "\n" for request in requests))


def reference_count(requests: Sequence[Request]) -> int:
    return sum(len(r.hash_ids) for r in requests)


def ceiling_hit_ratio(requests: Sequence[Request]) -> float:
    """Share of block references whose block was referenced before: the hit ratio of an unlimited cache."""
    seen: set[int] = set()
    hits = 0
    for request in requests:
        for block in request.hash_ids:
            if block in seen:
                hits += 1
            else:
                seen.add(block)
    total = reference_count(requests)
    return hits / total if total else 0.0
