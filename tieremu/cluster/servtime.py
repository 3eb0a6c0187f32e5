"""The serving-time model: how long one continuous-batching iteration of an instance takes.

    iteration_s = base_s + prefill_token_s * prefill tokens + decode_seq_s * decode sequences
                  + kv_byte_s * KV bytes the decode batch reads from the fastest tier
                  + sum over slower tiers of (bytes read there) / (that tier's read bandwidth)

The first four coefficients are fitted by least squares (non-negative: a coefficient the fit drives below zero is
fixed at 0 and the rest refitted) from timed iterations of tieremu's own decode model (tieremu.workloads.llama over
the contiguous reference store, so the times are the model's compute and KV reads, nothing else): prefill of
several prompt lengths and decode steps at several batch sizes and context lengths. The fit's error on its samples
(mean and max relative error) is saved with it.

With a tier map (`measure_tiered`), the decode steps run over tieremu's paged tiered cache instead, blocks placed
all in the fastest tier, split, and all in the next (FlexGen-style vectors), emulated tiers paying their injected
delay; the fit then has one seconds-per-byte coefficient per slower tier (`tier_byte_s`) and is labelled `emulated`
when a tier was. The cluster simulator charges reads from a slower tier at the fitted coefficient of the tier of that
name, else at the read bandwidth its cluster spec gives.

`reference()` is an assumed, not measured, A100-class model of an 8B model (prefill 10,000 tokens/s as simulate's
default; ~15 ms decode steps): the scale at which the Mooncake trace loads 8-256 instances the way its paper's did.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tieremu.errors import ConfigError
from tieremu.safefile import atomic_write

FEATURES = ("base_s", "prefill_token_s", "decode_seq_s", "kv_byte_s")


@dataclass(frozen=True)
class Sample:
    """One timed iteration."""

    prefill_tokens: int
    decode_seqs: int
    kv_bytes: int  # KV bytes the decode batch read from the fastest tier
    seconds: float
    tier_bytes: tuple[tuple[str, int], ...] = ()  # KV bytes it read from slower tiers, by tier name

    def features(self, slow: Sequence[str] = ()) -> tuple[float, ...]:
        by_tier = dict(self.tier_bytes)
        return (1.0, float(self.prefill_tokens), float(self.decode_seqs), float(self.kv_bytes),
                *(float(by_tier.get(name, 0)) for name in slow))


@dataclass(frozen=True)
class FitError:
    samples: int
    mean_rel: float  # mean |predicted - measured| / measured over the samples
    max_rel: float
    rms_s: float


@dataclass(frozen=True)
class ServingTimeModel:
    name: str
    origin: str  # "measured" (a fit of timed iterations) or "assumed"
    base_s: float
    prefill_token_s: float
    decode_seq_s: float
    kv_byte_s: float
    kv_bytes_per_token: int  # of the model whose times these are
    fit: FitError | None = None
    source: str = ""
    tier_byte_s: dict[str, float] = field(default_factory=dict)  # fitted seconds per KV byte read from a slower tier

    def __post_init__(self) -> None:
        for key in FEATURES:
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"serving-time model {self.name}: {key}={value!r} must be a number >= 0")
        for name, value in self.tier_byte_s.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"serving-time model {self.name}: tier_byte_s[{name}]={value!r} must be >= 0")
        if self.base_s + self.prefill_token_s <= 0 or self.kv_bytes_per_token < 1:
            raise ConfigError(f"serving-time model {self.name}: base_s + prefill_token_s must be positive and "
                              "kv_bytes_per_token at least 1")

    def iteration_s(self, prefill_tokens: int, decode_seqs: int, kv_bytes: float, slow_read_s: float = 0.0) -> float:
        return (self.base_s + self.prefill_token_s * prefill_tokens + self.decode_seq_s * decode_seqs
                + self.kv_byte_s * kv_bytes + slow_read_s)

    def predict(self, sample: Sample) -> float:
        slow = math.fsum(self.tier_byte_s.get(name, 0.0) * b for name, b in sample.tier_bytes)
        return self.iteration_s(sample.prefill_tokens, sample.decode_seqs, sample.kv_bytes, slow)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ServingTimeModel:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: serving-time model file not found") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a serving-time model JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, where: str) -> ServingTimeModel:
        """A model from its JSON object (`to_dict`); ConfigError naming `where` for anything else."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a serving-time model is a JSON object with keys {', '.join(FEATURES)}")
        data = dict(data)
        fit = data.pop("fit", None)
        try:
            return cls(**data, fit=FitError(**fit) if isinstance(fit, dict) else None)
        except TypeError as exc:
            raise ConfigError(f"{where}: not a serving-time model ({exc})") from None


def reference() -> ServingTimeModel:
    """Assumed figures for an 8B model on an A100-class GPU (order of magnitude; see the module docstring)."""
    return ServingTimeModel(name="reference-8b-a100", origin="assumed", base_s=0.012, prefill_token_s=1e-4,
                            decode_seq_s=1e-4, kv_byte_s=1.0 / 1.5e12, kv_bytes_per_token=128 << 10,
                            source="assumed: 10,000 prefill tokens/s, 12 ms per step, KV read at 1.5 TB/s")


def fit(samples: Sequence[Sample], *, name: str, kv_bytes_per_token: int, source: str = "",
        relative: bool = True) -> ServingTimeModel:
    """Non-negative least squares over the samples (see the module docstring), with the fit's error. `relative`
    weights each sample by 1 / its time (short and long iterations alike); else seconds count as they are (the long
    samples, which make the queues, dominate: `cluster validate` fits requests so)."""
    import numpy as np

    slow = sorted({name for s in samples for name, _ in s.tier_bytes})
    columns = len(FEATURES) + len(slow)
    if len(samples) < columns:
        raise ConfigError(f"a serving-time fit needs at least {columns} samples, got {len(samples)}")
    x = np.array([s.features(slow) for s in samples], dtype=np.float64)
    y = np.array([s.seconds for s in samples], dtype=np.float64)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)  # columns of very different size: solve in scaled units
    active = list(range(columns))
    coef = np.zeros(columns)
    while active:
        # Relative error matters (short and long iterations alike): weight each row by 1 / its time.
        w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
        solution, *_ = np.linalg.lstsq((x[:, active] / scale[active]) * w[:, None], y * w, rcond=None)
        if (solution >= 0).all():
            coef[:] = 0
            coef[active] = solution / scale[active]
            break
        active.pop(int(np.argmin(solution)))
    predicted = x @ coef
    rel = np.abs(predicted - y) / np.maximum(y, 1e-12)
    error = FitError(samples=len(samples), mean_rel=float(rel.mean()), max_rel=float(rel.max()),
                     rms_s=float(np.sqrt(np.mean((predicted - y) ** 2))))
    return ServingTimeModel(name=name, origin="measured", base_s=float(coef[0]), prefill_token_s=float(coef[1]),
                            decode_seq_s=float(coef[2]), kv_byte_s=float(coef[3]),
                            kv_bytes_per_token=kv_bytes_per_token, fit=error, source=source,
                            tier_byte_s={name: float(c) for name, c in zip(slow, coef[4:], strict=True)})


def measure(preset: str = "tiny", *, prompt_lengths: Sequence[int] = (64, 256, 512, 1024),
            batches: Sequence[int] = (1, 4, 8, 16), contexts: Sequence[int] = (128, 1024),
            repeats: int = 5, seed: int = 0) -> list[Sample]:
    """Time prefill and decode iterations of tieremu's Llama-style model on this machine: each configuration once
    to warm up, then `repeats` times, arms interleaved; a sample is the median of an arm's timings (this machine is
    shared: single timings jump by 10x)."""
    import torch

    from tieremu.workloads.contiguous_kv import ContiguousKV
    from tieremu.workloads.llama import LlamaModel
    from tieremu.workloads.llama import preset as model_preset

    config = model_preset(preset)
    model = LlamaModel(config, seed=seed)
    per_token = config.kv_bytes_per_token(torch.float32)
    g = torch.Generator().manual_seed(seed)
    arms: list[tuple[str, int, int]] = [("prefill", n, 0) for n in prompt_lengths]
    arms += [("decode", b, c) for b in batches for c in contexts]
    timings: dict[int, list[Sample]] = {i: [] for i in range(len(arms))}
    for repeat in range(repeats + 1):
        for arm, (kind, a, b) in enumerate(arms):
            if kind == "prefill":
                store = ContiguousKV.for_model(config, max_len=a + 1)
                tokens = torch.randint(0, config.vocab, (a,), generator=g)
                t0 = time.perf_counter()
                model.prefill(store, [0], [tokens])
                seconds = time.perf_counter() - t0
                sample = Sample(a, 0, 0, seconds)
            else:
                store = ContiguousKV.for_model(config, max_len=b + 2)
                seqs = list(range(a))
                model.prefill(store, seqs, [torch.randint(0, config.vocab, (b,), generator=g) for _ in seqs])
                tokens = torch.randint(0, config.vocab, (a,), generator=g)
                t0 = time.perf_counter()
                model.decode_step(store, seqs, tokens, [b] * a)
                seconds = time.perf_counter() - t0
                sample = Sample(0, a, a * (b + 1) * per_token, seconds)
            if repeat:  # the first round warms up
                timings[arm].append(sample)
    return [replace(runs[0], seconds=statistics.median(r.seconds for r in runs)) for runs in timings.values()]


def measure_tiered(preset: str, tiers_file: str | Path, *, batches: Sequence[int] = (2, 8),
                   prompt_tokens: int = 512, steps: int = 8, repeats: int = 3,
                   seed: int = 0) -> tuple[list[Sample], bool]:
    """Decode steps of tieremu's model over its paged tiered cache on the tier map's first two memory tiers, blocks
    all in the first, split, and all in the second, arms interleaved; a sample is the median step of an arm's runs
    (median over `repeats`), with the KV bytes a step read from each tier. Returns the samples and whether a tier was
    emulated."""
    import torch

    from tieremu.kv.cache import TieredKVCache
    from tieremu.kv.layout import KVLayout
    from tieremu.kv.placement import Vector
    from tieremu.numa.topology import discover
    from tieremu.probe.calibrate import calibration
    from tieremu.tiers.config import load_tier_map
    from tieremu.tiers.emulation import DelayInjector
    from tieremu.tiers.resolve import resolve
    from tieremu.workloads.decode import DecodeSpec, run_decode
    from tieremu.workloads.llama import LlamaModel
    from tieremu.workloads.llama import preset as model_preset

    config = model_preset(preset)
    topo = discover()
    tier_map = load_tier_map(tiers_file)
    resolved = resolve(tier_map, topo)
    cal = None
    if resolved.any_emulated:
        cal = calibration(topo)
        resolved = resolve(tier_map, topo, calibration=cal)
    memory = [t.name for t in resolved.tiers if t.nodes]
    if len(memory) < 2:
        raise ConfigError(f"{tiers_file}: a per-tier fit needs two memory tiers; this map has {memory}")
    fast, slow = memory[:2]
    model = LlamaModel(config, seed=seed)
    layout = KVLayout(config.layers, config.kv_heads, config.head_dim, 16, torch.float32, "all-layers")
    shapes = {fast: {fast: 1.0}, "split": {fast: 0.5, slow: 0.5}, slow: {slow: 1.0}}
    arms = [(b, shape) for b in batches for shape in shapes]
    timings: dict[tuple[int, str], list[Sample]] = {arm: [] for arm in arms}
    for repeat in range(repeats + 1):
        for b, shape in arms:
            spec = DecodeSpec(batch=b, prompt_tokens=prompt_tokens, shared_prefix_tokens=prompt_tokens // 8,
                              decode_steps=steps, seed=seed)
            blocks = b * layout.blocks_for(prompt_tokens * 5 // 4 + steps + 1) + 8
            capacities = {t.name: (blocks if t.name in memory else 0) for t in resolved.tiers}
            timing = [t.timing for t in resolved.tiers if t.timing is not None]
            injector = DelayInjector(timing, cal) if timing and cal is not None else None
            with TieredKVCache(resolved, layout, capacities=capacities, placement=Vector(shapes[shape]),
                               injector=injector) as cache:
                result = run_decode(model, cache, spec)
            if repeat:  # the first round warms up
                per_step = {t: v // steps for t, v in result.kv_bytes_read.items()}
                timings[(b, shape)].append(Sample(
                    0, b, per_step.get(fast, 0), statistics.median(result.tpot_s),
                    tier_bytes=tuple((t, v) for t, v in sorted(per_step.items()) if t != fast and v)))
    samples = [replace(runs[0], seconds=statistics.median(r.seconds for r in runs)) for runs in timings.values()]
    return samples, resolved.any_emulated


def measure_and_fit(preset: str = "tiny", repeats: int = 5, tiers_file: str | Path | None = None) -> ServingTimeModel:
    """Prefill over the contiguous store; decode there too, or over the tiered cache of `tiers_file` (per-tier fit)."""
    import torch

    from tieremu.workloads.llama import preset as model_preset

    per_token = model_preset(preset).kv_bytes_per_token(torch.float32)
    if tiers_file is None:
        samples = measure(preset, repeats=repeats)
        return fit(samples, name=f"tieremu-{preset}-cpu", kv_bytes_per_token=per_token,
                   source=f"measured: tieremu's {preset} model over the contiguous KV store, medians of {repeats} "
                          f"timings of {len(samples)} iteration shapes on this machine's CPU (shared vCPUs: noisy)")
    samples = measure(preset, repeats=repeats, batches=())
    tiered, emulated = measure_tiered(preset, tiers_file, repeats=repeats)
    samples += tiered
    model = fit(samples, name=f"tieremu-{preset}-tiered", kv_bytes_per_token=per_token,
                source=f"measured: tieremu's {preset} model, prefill over the contiguous KV store, decode over the "
                       f"tiered cache of {Path(tiers_file).name} ({'emulated tiers' if emulated else 'real nodes'}), "
                       f"medians of {repeats} timings of {len(samples)} shapes on this machine (shared vCPUs: noisy)")
    return replace(model, origin="emulated") if emulated else model
