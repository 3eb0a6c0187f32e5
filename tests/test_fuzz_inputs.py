"""Seeded fuzzing of everything a user hands tieremu: tier maps, experiment specs and traces, mutated in their
types, numbers, keys and bytes. Every outcome must be success or a TieremuError whose message names the file and
a key (or a trace's line): never another exception (a traceback for the user), never a hang, and never a file
written outside the case's own folder (which plays --out).

The generator is seeded: a failure prints its seed and case number, and rerunning reproduces it exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from fixture_paths import fixture_root
from write_audit import listening, outside

from tieremu.errors import TieremuError
from tieremu.numa.topology import discover
from tieremu.runner.spec import load_experiment
from tieremu.runner.sweep import expand
from tieremu.tiers.config import load_tier_map
from tieremu.tiers.resolve import resolve
from tieremu.tiers.timing import Calibration
from tieremu.workloads.trace import Request, ceiling_hit_ratio, read_trace, write_trace

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("TIEREMU_FUZZ_SEED", "16"))
CASES = {"tier_map": 2500, "spec": 1500, "trace": 2000}
CASE_SECONDS = 5  # one case running longer is a hang

# Values that have broken parsers before: wrong types, non-finite and absurd numbers, odd strings.
WILD: list[Any] = [None, True, False, 0, -1, 1, 2, 3, 7, 255, 256, 1023, 1024, -(2**63), 2**63, 10**21, 10**400,
                   0.0, -0.0, 0.5, -2.5, 1e-300, 1e300, math.inf, -math.inf, math.nan, "", "x", "0", "nan", ".inf",
                   "1e21", "../../etc", "/dev/zero", "a" * 300, "é", "\x00", [], [0], [0, 0], [1, 2, 3], ["a"], {},
                   {"k": 1}, [[0]], {"nested": {"deeper": [1]}}]


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail (not wait forever) when the block runs past `seconds`: SIGALRM interrupts a hang in Python code."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"hang: {what} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- mutations ----------------------------------------------------------------------------------------------------

def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into nested dicts and lists."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


def _at(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def _number_near(rng: random.Random, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return rng.choice(WILD)
    return rng.choice([value * -1, value * 10**rng.randint(3, 30), value + 0.5, float(value) * 1e300, 0,
                       math.nan, math.inf, -value - 1, int(value) + 2**64])


def mutate_data(rng: random.Random, data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """One structural mutation; returns the document and the key it touched (None: no key to name)."""
    data = copy.deepcopy(data)
    paths = _paths(data)
    path = rng.choice(paths)
    parent, last = _at(data, path[:-1]), path[-1]
    key = next((p for p in reversed(path) if isinstance(p, str)), None)
    op = rng.randrange(6)
    if op == 0:  # a value of another type
        parent[last] = rng.choice(WILD)
    elif op == 1:  # a number pushed out of range
        parent[last] = _number_near(rng, parent[last])
    elif op == 2 and isinstance(parent, dict):  # a required key dropped
        del parent[last]
    elif op == 3 and isinstance(parent, dict):  # an unknown key beside it
        key = rng.choice(["colour", "nodez", "tiers ", "1", "jobs_"])
        parent[key] = rng.choice(WILD)
    elif op == 4 and isinstance(parent, dict):  # a key renamed
        new = str(last) + rng.choice(["_", "s", "X"])
        parent[new] = parent.pop(last)
        key = new
    else:  # a list emptied or grown
        if isinstance(parent[last], list):
            parent[last] = [] if rng.random() < 0.5 else parent[last] * rng.randint(2, 4)
        else:
            parent[last] = [parent[last]] * rng.randint(0, 3)
    return data, key


def mutate_bytes(rng: random.Random, text: bytes) -> bytes:
    """Bytes flipped, inserted, cut, a key written twice, or an alias bomb spliced in."""
    data = bytearray(text)
    op = rng.randrange(6)
    if op == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 1:
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.choice([b"\xff\xfe", b"\x00", b"&a [*a, *a]", b": :", b"- - -", b"{", b"]",
                                        b"!!python/object:os.system", b"<<: *x", b"\t", b"'", b'"', b"\\x"]))
    elif op == 2 and data:
        del data[rng.randrange(len(data)):]
    elif op == 3:
        lines = bytes(data).splitlines(keepends=True)
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])  # a duplicated line: usually a duplicate key
        data = bytearray(b"".join(lines))
    elif op == 4:
        bomb = b"b0: &b0 [x]\n" + b"".join(b"b%d: &b%d [%s]\n" % (i, i, b",".join([b"*b%d" % (i - 1)] * 10))
                                          for i in range(1, 7))
        data = bytearray(bomb + bytes(data))
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    return bytes(data)


def dump(data: Any) -> bytes:
    """YAML for a mutated document; values YAML cannot write (10**400 is fine, NaN is) come out as YAML does."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def _keys(data: Any) -> set[str]:
    return {str(p) for path in _paths(data) for p in path if isinstance(p, str)}


def check_outcome(call: Callable[[], object], source: Path, key: str | None, keys: set[str], case: str) -> str:
    """Run call: success, or a TieremuError naming the file and (when the mutation touched one) a key."""
    try:
        with deadline(CASE_SECONDS, case):
            call()
    except TieremuError as exc:
        message = str(exc)
        # Reading errors name the file; resolution errors (the map against this machine) name the tier.
        assert source.name in message or "tier '" in message, f"{case}: error names neither file nor tier: {message}"
        assert len(message) < 2000, f"{case}: a {len(message)}-character message"
        if key is not None:
            assert any(k in message for k in keys | {key}) or "YAML" in message, \
                f"{case}: error names no key: {message}"
        return "error"
    except Exception as exc:  # anything else would reach the user as a traceback
        raise AssertionError(f"{case}: {type(exc).__name__} instead of a TieremuError: {exc}") from exc
    return "ok"


# ---- the cases ----------------------------------------------------------------------------------------------------

CALIBRATION = Calibration(machine="fuzz", created_utc="now", node=0, latency_ns=100.0,
                          bandwidth_gbps={"read": 20.0, "write": 10.0, "copy": 10.0},
                          latency_by_node={0: 100.0}, read_gbps_by_node={0: 20.0})


def _tier_map_bases() -> list[dict[str, Any]]:
    bases = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs" / "tiers").glob("*.yaml"))]
    bases.append({"name": "files", "tiers": [{"name": "dram", "nodes": [0]},
                                             {"name": "ssd", "kind": "file", "path": "blocks", "capacity_mib": 64}]})
    bases.append({"name": "weighted", "tiers": [{"name": "mix", "nodes": [0, 1], "policy": "weighted_interleave",
                                                 "weights": [3, 1], "allow_emulation": True,
                                                 "emulate": {"latency_ratio": 2.0, "bandwidth_gbps": 10}}]})
    return bases


def test_fuzz_tier_maps(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    topology = discover(fixture_root("cxl-expander"))
    bases = _tier_map_bases()
    outcomes = {"ok": 0, "error": 0}
    start = time.perf_counter()
    with listening() as events:
        for n in range(CASES["tier_map"]):
            base = rng.choice(bases)
            case = f"tier map case {n} (seed {SEED})"
            path = tmp_path / f"t{n % 50}.yaml"
            if rng.random() < 0.6:
                data, key = mutate_data(rng, base)
                path.write_bytes(dump(data))
                keys = _keys(data) | _keys(base)
            else:
                path.write_bytes(mutate_bytes(rng, dump(base)))
                key, keys = None, set()

            def load_and_resolve(path: Path = path) -> None:
                tier_map = load_tier_map(path)
                resolve(tier_map, topology, calibration=CALIBRATION, cuda_devices=0)

            outcomes[check_outcome(load_and_resolve, path, key, keys, case)] += 1
    assert outside(events, tmp_path) == []
    assert outcomes["ok"] > 50 and outcomes["error"] > 500, outcomes  # the mutations reach both sides
    print(f"tier maps: {outcomes} in {time.perf_counter() - start:.1f} s")


SPEC_BASE = {
    "name": "fuzz", "tiers": "tiers.yaml", "repetitions": 1, "seed": 0, "run_timeout_s": 60,
    "jobs": [
        {"kind": "synthetic", "policies": ["lru", "hotcold"], "tokens": 4, "requests": 2,
         "sweep": {"working_set_mib": [256, 512]}},
        {"kind": "replay", "trace": "trace.jsonl", "policies": ["lru"], "max_requests": 10},
        {"kind": "replay", "generate": {"kind": "agent", "requests": 20, "seed": 1}, "policies": ["lfu"]},
    ],
    "sweep": {"fast_capacity_mib": [128, 256]},
}


def test_fuzz_specs(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    (tmp_path / "tiers.yaml").write_text((REPO / "configs" / "tiers" / "cxl-expander.yaml").read_text())
    write_trace(tmp_path / "trace.jsonl", [Request(i * 10, 600, 4, (i, i + 1)) for i in range(20)])
    load_experiment(_write(tmp_path / "base.yaml", dump(SPEC_BASE)))  # the base itself is valid
    outcomes = {"ok": 0, "error": 0}
    start = time.perf_counter()
    with listening() as events:
        for n in range(CASES["spec"]):
            case = f"spec case {n} (seed {SEED + 1})"
            path = tmp_path / f"s{n % 50}.yaml"
            if rng.random() < 0.7:
                data, key = mutate_data(rng, SPEC_BASE)
                path.write_bytes(dump(data))
                keys = _keys(data) | _keys(SPEC_BASE)
            else:
                path.write_bytes(mutate_bytes(rng, dump(SPEC_BASE)))
                key, keys = None, set()
            outcomes[check_outcome(lambda path=path: expand(load_experiment(path)), path, key, keys, case)] += 1
    assert outside(events, tmp_path) == []
    assert outcomes["ok"] > 20 and outcomes["error"] > 200, outcomes
    print(f"specs: {outcomes} in {time.perf_counter() - start:.1f} s")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


TRACE_BASE = [{"timestamp": i * 7, "input_length": 600 + i, "output_length": 4, "hash_ids": [i, i + 1, 40]}
              for i in range(12)]


def mutate_trace(rng: random.Random) -> bytes:
    lines = copy.deepcopy(TRACE_BASE)
    if rng.random() < 0.6:
        line = rng.choice(lines)
        field = rng.choice([*line, "extra"])
        line[field] = rng.choice([*WILD, _number_near(rng, line.get(field, 1)), [rng.choice(WILD)]])
        text = "".join(json.dumps(obj, allow_nan=True) + "\n" for obj in lines).encode()
        return text
    text = "".join(json.dumps(obj) + "\n" for obj in lines).encode()
    extra = rng.choice([b"[" * 100_000, b"\xff\xfe\n", b"{}\n", b"null\n", b"1e999\n", b'{"timestamp": NaN}\n'])
    return mutate_bytes(rng, text) if rng.random() < 0.7 else text + extra


def test_fuzz_traces(tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    outcomes = {"ok": 0, "error": 0}
    start = time.perf_counter()
    with listening() as events:
        for n in range(CASES["trace"]):
            case = f"trace case {n} (seed {SEED + 2})"
            path = _write(tmp_path / f"r{n % 50}.jsonl", mutate_trace(rng))

            def read(path: Path = path) -> None:
                requests = read_trace(path)
                assert 0 <= ceiling_hit_ratio(requests) <= 1

            try:
                outcomes[check_outcome(read, path, None, set(), case)] += 1
            except AssertionError:
                raise
            # A trace error names the line (file:N) or the whole file.
    assert outside(events, tmp_path) == []
    assert outcomes["ok"] > 100 and outcomes["error"] > 300, outcomes
    print(f"traces: {outcomes} in {time.perf_counter() - start:.1f} s")


# ---- a handful of real command lines ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(4))
def test_fuzz_cli_smoke(tmp_path: Path, n: int) -> None:
    """The installed command on mutated inputs, as a user runs it: exit 0, 1 or 2, and never a traceback."""
    rng = random.Random(SEED + 100 + n)
    tiers = _write(tmp_path / "t.yaml", mutate_bytes(rng, dump(_tier_map_bases()[1])) if n % 2 else
                   dump(mutate_data(rng, _tier_map_bases()[1])[0]))
    trace = _write(tmp_path / "trace.jsonl", mutate_trace(rng))
    commands = [["check", "--tiers", str(tiers), "--size-mib", "1"],
                ["replay", str(trace), "--tiers", str(REPO / "configs/tiers/single-node.yaml"), "--policy", "lru"]]
    for args in commands:
        result = subprocess.run([sys.executable, "-c", "from tieremu.cli import main; main()", *args],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                env=os.environ | {"PYTHONPATH": str(REPO)})
        assert result.returncode in (0, 1, 2), (args, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.yaml", "trace.jsonl"]  # nothing else written
