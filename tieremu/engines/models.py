"""Model directories: a tiny Llama built locally from a fixed seed (no hub access here or in CI), and the checks and
KV figures tieremu takes from any Hugging Face model directory a user gives (`--model DIR`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tieremu.errors import ConfigError, WorkloadError

# The tiny model's shape: small enough to serve at >1,000 tokens/s on two busy cores, Llama-shaped so that vLLM
# runs its real Llama code path (GQA: 4 query heads over 2 KV heads).
TINY_CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 16384}
TINY_SEED = 0
TINY_VERSION = "1"  # bump when the recipe changes: the cache folder is named after it
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelInfo:
    """What tieremu needs of a model: its shape (for the KV bytes per token) and its vocabulary (for prompts)."""

    path: Path
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token across every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def model_info(path: str | Path) -> ModelInfo:
    """Read a Hugging Face model directory's config.json; ConfigError naming the directory and what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--model {path}: not a directory; give a local Hugging Face model directory "
                          "(config.json and weights), or leave --model out for the tiny model built here")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--model {path}: no config.json, so it is not a Hugging Face model directory "
                          f"(found: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})") from None
    except ValueError as exc:
        raise ConfigError(f"--model {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--model {path}: config.json holds no JSON object")
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size") if k not in config]
    if missing:
        raise ConfigError(f"--model {path}: config.json lacks {', '.join(missing)}; tieremu takes the KV bytes per "
                          "token from them (a decoder-only transformer's config has them)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"--model {path}: no weights (*.safetensors or *.bin) beside config.json")
    heads = int(config["num_attention_heads"])
    return ModelInfo(path=path, layers=int(config["num_hidden_layers"]),
                     kv_heads=int(config.get("num_key_value_heads", heads)),
                     head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
                     vocab_size=int(config["vocab_size"]),
                     max_positions=int(config.get("max_position_embeddings", 2048)))


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tieremu" / "models"


def tiny_model(cache: Path | None = None) -> Path:
    """The tiny Llama's directory, built on first use (seeded: the same weights on every machine) and cached."""
    target = (cache or default_cache()) / f"tiny-llama-v{TINY_VERSION}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch

    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise WorkloadError(f"the tiny model is built with transformers, which is not importable ({exc}); it comes "
                            "with the vllm extra: run scripts/setup-vllm.sh") from None

    torch.manual_seed(TINY_SEED)
    config = LlamaConfig(**TINY_CONFIG, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Built beside the target and renamed: a half-written model is never found by the check above.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
