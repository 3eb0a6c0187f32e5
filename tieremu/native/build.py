"""The C kernels: compiled on first use, cached by source hash, loaded through ctypes.

A Python loop cannot time a memory access (DESIGN.md: ~100 ns even in L1), so every timed loop is C.
ctypes releases the GIL during each call, so pinned threads run kernels truly in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from tieremu.errors import ProbeError, TieremuError
from tieremu.safefile import check_destination

SOURCE = Path(__file__).with_name("kernels.c")
REPLAY_SOURCE = Path(__file__).with_name("replay.c")
COMPRESS_SOURCE = Path(__file__).with_name("compress.c")
CHECKSUM_SOURCE = Path(__file__).with_name("checksum.c")
COUNTS_SOURCE = Path(__file__).with_name("counts.c")
CFLAGS = ("-O2", "-march=native", "-fno-tree-loop-distribute-patterns", "-shared", "-fPIC")
CACHE_ENV = "TIEREMU_CACHE_DIR"

u64 = ctypes.c_uint64
vp = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[type, tuple[type, ...]]] = {
    "chase_link": (None, (vp, vp, u64, u64)),  # type: ignore[dict-item]
    "chase": (u64, (vp, u64, ctypes.POINTER(vp))),
    "chase_cycle_length": (u64, (vp, u64)),
    "bw_read": (u64, (vp, u64, u64, ctypes.POINTER(u64))),
    "bw_write": (u64, (vp, u64, u64)),
    "bw_copy": (u64, (vp, vp, u64, u64)),
    "bw_triad": (u64, (vp, vp, vp, ctypes.c_double, u64, u64)),
    "spin": (u64, (u64,)),
    "chase_paced": (u64, (vp, u64, u64, u64, u64, ctypes.POINTER(vp), ctypes.POINTER(u64))),
    "chase_gapped": (u64, (vp, u64, u64, ctypes.POINTER(vp), ctypes.POINTER(u64))),
    "wait_ticks": (u64, (u64,)),
    "chase_spun": (u64, (vp, u64, u64, u64, ctypes.POINTER(vp), ctypes.POINTER(u64))),
    "paged_decode_attention": (None, (vp, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # type: ignore[dict-item]
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, vp, ctypes.c_float, vp, vp)),
    "tsc_per_ns": (ctypes.c_double, (u64,)),
    "bw_paced": (u64, (ctypes.c_int, vp, vp, u64, u64, u64, ctypes.c_double, ctypes.c_double,
                       ctypes.POINTER(u64), ctypes.POINTER(u64))),
    "traffic": (None, (vp, u64, ctypes.c_uint32, ctypes.c_uint32, u64, ctypes.POINTER(ctypes.c_int),  # type: ignore[dict-item]
                       ctypes.POINTER(u64), ctypes.POINTER(u64), ctypes.POINTER(u64))),
}


i64 = ctypes.c_int64
_REPLAY_SIGNATURES: dict[str, tuple[type, tuple[type, ...]]] = {
    "replay_demand": (ctypes.c_int, (ctypes.c_int, i64, vp, i64, i64, vp, vp, vp, ctypes.c_int, vp, vp, vp,
                                     ctypes.c_double, i64, ctypes.c_double, i64, ctypes.c_int, vp, vp, vp, vp, vp,
                                     vp, vp, vp)),
}


_COMPRESS_SIGNATURES: dict[str, tuple[type, tuple[type, ...]]] = {
    "compress_blocks": (i64, (vp, ctypes.c_int, i64, i64, ctypes.c_int, vp, vp)),
    "decompress_blocks": (i64, (vp, i64, ctypes.c_int, vp, vp, ctypes.c_int, i64)),
    "e4m3_encode": (None, (vp, i64, vp)),  # type: ignore[dict-item]
}


_CHECKSUM_SIGNATURES: dict[str, tuple[type, tuple[type, ...]]] = {
    "crc32c_update": (ctypes.c_uint32, (ctypes.c_uint32, vp, u64)),
}


_COUNTS_SIGNATURES: dict[str, tuple[type, tuple[type, ...]]] = {
    "count_accesses": (i64, (vp, i64, vp, vp, i64, ctypes.c_int, vp, vp)),
}


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tieremu"
    return Path(root) / "native"


@cache
def kernels() -> ctypes.CDLL:
    """The compiled kernel library (built once per source and compiler, then reused)."""
    return _library(SOURCE, _SIGNATURES)


@cache
def replay_core() -> ctypes.CDLL:
    """The compiled replay core (replay.c): simulate mode's built-in demand caches."""
    return _library(REPLAY_SOURCE, _REPLAY_SIGNATURES)


@cache
def compress_kernels() -> ctypes.CDLL:
    """The compiled KV compression kernels (compress.c): int8, int4 and fp8 with per-group scales."""
    return _library(COMPRESS_SOURCE, _COMPRESS_SIGNATURES)


@cache
def checksum_kernels() -> ctypes.CDLL:
    """The compiled CRC-32C (checksum.c): the cluster block transport's end-to-end checksum."""
    return _library(CHECKSUM_SOURCE, _CHECKSUM_SIGNATURES)


@cache
def count_kernels() -> ctypes.CDLL:
    """The compiled access counter (counts.c): the migration daemon's batched access counting."""
    return _library(COUNTS_SOURCE, _COUNTS_SIGNATURES)


def _library(path: Path, signatures: dict[str, tuple[type, tuple[type, ...]]]) -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise ProbeError(f"no C compiler found (cc): install gcc (scripts/bootstrap.sh does) to build {path.name}")
    source = path.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    # -march=native code is only valid on this CPU model, so the model is part of the key.
    key = hashlib.sha256(source + version.encode() + " ".join(CFLAGS).encode() + _cpu_model().encode()).hexdigest()[:16]
    lib = cache_dir() / f"{path.stem}-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # The compiler writes into a fresh private folder (no planted link can redirect it), then one rename.
        with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as work:
            tmp = Path(work) / lib.name
            result = subprocess.run([compiler, *CFLAGS, "-o", str(tmp), str(path), "-lm"], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                raise ProbeError(f"compiling {path} failed:\n{result.stderr.strip()}")
            try:
                check_destination(lib)
            except TieremuError as exc:
                raise ProbeError(str(exc)) from None
            os.replace(tmp, lib)  # atomic: concurrent builders never load half a library
    dll = ctypes.CDLL(str(lib))
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = restype, argtypes
    return dll


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


@cache
def spin_ns_per_iter() -> float:
    """Calibrated cost of one iteration of the kernels' delay loop (median of a few 1 ms-ish runs)."""
    k = kernels()
    k.spin(1 << 20)
    runs = sorted(k.spin(1 << 22) / (1 << 22) for _ in range(5))
    return runs[len(runs) // 2]


@cache
def tsc_ticks_per_ns() -> float:
    """The TSC's rate against CLOCK_MONOTONIC, measured once per process (20 ms).

    Delays are counted in TSC ticks because the TSC runs at a fixed rate while the core clock moves: a loop
    calibrated in iterations drifted by 1.8x between two calibrations on the same VM.
    """
    k = kernels()
    return statistics.median(k.tsc_per_ns(5_000_000) for _ in range(4))
