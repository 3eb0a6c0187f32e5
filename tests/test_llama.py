"""The Llama-style decode model over the contiguous reference KV store: incremental equals full-sequence."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tieremu.errors import KVError, WorkloadError
from tieremu.workloads.contiguous_kv import ContiguousKV
from tieremu.workloads.llama import LlamaModel, ModelConfig, parse_dtype, preset, with_overrides

# (rtol, atol). bfloat16 keeps 8 significant bits: one ulp at |logit| 4..8 is 0.031, and the store path
# (SDPA, packed rows) and the textbook reference round differently, so its absolute slack is a little over one ulp.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


def _tokens(config: ModelConfig, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.vocab, (length,), generator=torch.Generator().manual_seed(seed))


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_prefill_then_decode_matches_the_full_sequence_forward(dtype: torch.dtype, tied: bool) -> None:
    config = replace(preset("tiny"), tied_embeddings=tied)
    model = LlamaModel(config, seed=3, dtype=dtype)
    prompt_lengths, steps = [5, 17, 40], 6
    seqs = [7, 2, 11]
    full = [_tokens(config, n + steps, seed=i) for i, n in enumerate(prompt_lengths)]
    expected = [model.reference_logits(tokens) for tokens in full]
    store = ContiguousKV.for_model(config, max_len=64, dtype=dtype)

    logits = model.prefill(store, seqs, [tokens[:n] for tokens, n in zip(full, prompt_lengths, strict=True)])
    assert logits.shape == (3, config.vocab)
    for i, n in enumerate(prompt_lengths):
        _close(logits[i], expected[i][n - 1], dtype)

    for step in range(steps - 1):
        positions = [n + step for n in prompt_lengths]
        new = torch.stack([tokens[p] for tokens, p in zip(full, positions, strict=True)])
        logits = model.decode_step(store, seqs, new, positions)
        for i, p in enumerate(positions):
            _close(logits[i], expected[i][p], dtype)
    assert [store.length(seq, layer) for seq in seqs for layer in (0, 1)] == \
        [n + steps - 1 for n in prompt_lengths for _ in (0, 1)]


def test_prefill_over_a_stored_prefix_equals_prefill_from_scratch() -> None:
    config = preset("tiny")
    model = LlamaModel(config, seed=1)
    shared = 24
    prompt_a = _tokens(config, 37, seed=10)
    prompt_b = _tokens(config, 13, seed=11)
    prompt_c = torch.cat([prompt_a[:shared], _tokens(config, 9, seed=12)])  # shares a's first 24 tokens

    scratch = ContiguousKV.for_model(config, max_len=64)
    from_scratch = model.prefill(scratch, [0, 1, 2], [prompt_a, prompt_b, prompt_c])

    reused = ContiguousKV.for_model(config, max_len=64)
    model.prefill(reused, [0], [prompt_a[:shared]])
    reused.copy_prefix(0, 2, shared)
    # A batch mixing two stored prefixes with a sequence computed from its first token.
    logits = model.prefill(reused, [0, 1, 2], [prompt_a, prompt_b, prompt_c], start=[shared, 0, shared])

    torch.testing.assert_close(logits, from_scratch, rtol=1e-4, atol=1e-4)
    for seq, prompt in enumerate([prompt_a, prompt_b, prompt_c]):
        for layer in range(config.layers):
            assert reused.length(seq, layer) == prompt.numel()
            for got, want in zip(reused.read(seq, layer), scratch.read(seq, layer), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_are_the_argmax_of_the_full_sequence_logits() -> None:
    config = preset("tiny")
    model = LlamaModel(config, seed=5)
    prompts = [_tokens(config, 6, seed=20), _tokens(config, 19, seed=21)]
    generated = model.greedy(ContiguousKV.for_model(config, max_len=32), [0, 1], prompts, steps=5)
    assert generated.shape == (2, 5)
    for prompt, tokens in zip(prompts, generated, strict=True):
        expected = model.reference_logits(torch.cat([prompt, tokens[:-1]]))[prompt.numel() - 1:].argmax(dim=-1)
        assert tokens.tolist() == expected.tolist()


class _RecordingKV(ContiguousKV):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.layers, config.kv_heads, config.head_dim, max_len=32)
        self.events: list[tuple[str, int]] = []

    def layer_start(self, layer: int) -> None:
        self.events.append(("start", layer))

    def read(self, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.events.append(("read", layer))
        return super().read(seq, layer)


def test_layer_start_comes_once_per_layer_before_that_layers_reads() -> None:
    config = preset("tiny")
    model = LlamaModel(config)
    store = _RecordingKV(config)
    model.prefill(store, [0, 1], [_tokens(config, 4, 0), _tokens(config, 7, 1)])
    model.decode_step(store, [0, 1], torch.tensor([1, 2]), [4, 7])
    one_pass = [("start", 0), ("read", 0), ("read", 0), ("start", 1), ("read", 1), ("read", 1)]
    assert store.events == one_pass * 2


class _ForgetfulKV(ContiguousKV):
    """Drops every write after the first per layer: a store whose read disagrees with what was written."""

    def write(self, seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if start == 0:
            super().write(seq, layer, start, k, v)


def test_a_store_holding_the_wrong_length_or_a_gap_is_refused() -> None:
    config = preset("tiny")
    model = LlamaModel(config)
    tokens = _tokens(config, 8, 0)
    forgetful = _ForgetfulKV(config.layers, config.kv_heads, config.head_dim, max_len=32)
    model.prefill(forgetful, [0], [tokens])
    with pytest.raises(WorkloadError, match="holds 8 positions after 1 written at position 8"):
        model.decode_step(forgetful, [0], torch.tensor([3]), [8])
    store = ContiguousKV.for_model(config, max_len=32)
    model.prefill(store, [0], [tokens])
    with pytest.raises(KVError, match="gap"):
        model.decode_step(store, [0], torch.tensor([3]), [20])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_stay_finite_in_every_dtype_even_deep(dtype: torch.dtype) -> None:
    config = with_overrides(preset("tiny"), layers=16)
    model = LlamaModel(config, seed=2, dtype=dtype)
    logits = model.reference_logits(_tokens(config, 64, seed=4))
    assert torch.isfinite(logits).all()
    # Unit-scale logits: neither collapsed to zero nor blown up.
    assert 0.1 < logits.std().item() < 10


def test_one_seed_draws_one_model_across_dtypes() -> None:
    config = preset("tiny")
    tokens = _tokens(config, 12, seed=0)
    fp32 = LlamaModel(config, seed=9).reference_logits(tokens)
    bf16 = LlamaModel(config, seed=9, dtype=torch.bfloat16).reference_logits(tokens)
    other_seed = LlamaModel(config, seed=10).reference_logits(tokens)
    assert (fp32 - bf16).abs().max() < 0.2
    assert (fp32 - other_seed).abs().max() > 1.0


def test_unknown_preset_names_the_valid_ones() -> None:
    with pytest.raises(WorkloadError, match=r"'huge'.*tiny, small, 1b"):
        preset("huge")


def test_1b_has_llama_3_2_1b_parameter_count() -> None:
    count = preset("1b").parameter_count()
    assert abs(count - 1.24e9) / 1.24e9 < 0.05
    # Untying the embedding adds exactly one vocab x hidden matrix.
    assert replace(preset("1b"), tied_embeddings=False).parameter_count() - count == 128256 * 2048


@pytest.mark.parametrize("tied", [True, False])
def test_allocated_parameters_match_the_config_arithmetic(tied: bool) -> None:
    config = replace(preset("tiny"), tied_embeddings=tied)
    assert LlamaModel(config).parameter_count() == config.parameter_count()


def test_bad_shapes_dtypes_and_tokens_are_refused_with_what_is_valid() -> None:
    with pytest.raises(WorkloadError, match="multiple of kv_heads=3"):
        replace(preset("tiny"), kv_heads=3)
    with pytest.raises(WorkloadError, match=r"unknown model keys.*valid"):
        with_overrides(preset("tiny"), hiden=3)
    with pytest.raises(WorkloadError, match="valid: float32, bfloat16, float16"):
        parse_dtype("int8")
    assert parse_dtype("bf16") is torch.bfloat16
    model = LlamaModel(preset("tiny"))
    with pytest.raises(WorkloadError, match=r"outside the vocabulary 0\.\.1023"):
        model.reference_logits(torch.tensor([1, 1024]))
    with pytest.raises(WorkloadError, match=r"start=4 must be in 0\.\.3"):
        model.prefill(ContiguousKV.for_model(preset("tiny"), max_len=8), [0], [torch.tensor([1, 2, 3, 4])],
                      start=[4])


def test_contiguous_store_keeps_what_was_written_and_refuses_bad_writes() -> None:
    store = ContiguousKV(2, 2, 4, max_len=6)
    k = torch.arange(24, dtype=torch.float32).view(3, 2, 4)
    store.write(0, 1, 0, k, -k)
    store.write(0, 1, 3, k[:1] + 100, k[:1])
    keys, values = store.read(0, 1)
    assert keys.shape == (4, 2, 4)
    assert torch.equal(keys[:3], k) and torch.equal(values[:3], -k) and torch.equal(keys[3], k[0] + 100)
    assert store.read(0, 0)[0].shape == (0, 2, 4)
    with pytest.raises(KVError, match=r"valid starts are 0\.\.4"):
        store.write(0, 1, 5, k[:1], k[:1])
    with pytest.raises(KVError, match="exceed max_len=6"):
        store.write(0, 1, 4, k, k)
    with pytest.raises(KVError, match=r"float64, the store holds torch\.float32"):
        store.write(0, 1, 4, k[:1].double(), k[:1].double())
    with pytest.raises(KVError, match=r"layer 2 out of range; valid layers are 0\.\.1"):
        store.read(0, 2)
    with pytest.raises(KVError, match="unknown sequence 9; sequences held: 0"):
        store.read(9, 0)
    with pytest.raises(KVError, match="first write must start at position 0"):
        store.write(9, 0, 2, k, k)
    store.free(0)
    assert store.sequences == ()


def test_rotary_positions_follow_the_llama_half_split_layout() -> None:
    config = preset("tiny")
    model = LlamaModel(config)
    d = config.head_dim
    cos, sin = model._rope(torch.tensor([0, 3, 7, 1000]))
    unit = torch.zeros(4, 1, d)
    unit[:, 0, 0] = 1.0
    rotated = model._rotate(unit, cos, sin)[:, 0]
    # The first frequency is 1 rad per position; it pairs dimension 0 with dimension d/2.
    positions = torch.tensor([0.0, 3.0, 7.0, 1000.0])
    torch.testing.assert_close(rotated[:, 0], positions.cos())
    torch.testing.assert_close(rotated[:, d // 2], positions.sin())
    # Scores depend on distance only: q at 7 against k at 3 equals q at 1000 against k at 996.
    q, k = torch.randn(1, 1, d), torch.randn(1, 1, d)
    near = (model._rotate(q, *model._rope(torch.tensor([7]))) * model._rotate(k, *model._rope(torch.tensor([3])))).sum()
    far = (model._rotate(q, *model._rope(torch.tensor([1000]))) *
           model._rotate(k, *model._rope(torch.tensor([996])))).sum()
    torch.testing.assert_close(near, far, rtol=1e-4, atol=1e-4)
    # theta 500000: the slowest pair turns by 500000^(-(d-2)/d) rad per position.
    torch.testing.assert_close(model._rope(torch.tensor([1]))[1][0, 0, d // 2 - 1],
                               torch.tensor(500000.0 ** (-(d - 2) / d)).sin(), rtol=1e-5, atol=1e-7)


def test_the_model_lives_on_its_device_and_refuses_devices_it_cannot_use() -> None:
    config = preset("tiny")
    default, explicit = LlamaModel(config, seed=4), LlamaModel(config, seed=4, device=torch.device("cpu"))
    assert default.device == explicit.device == torch.device("cpu")
    assert {t.device.type for t in (default.embed, default.final_norm, default.layers[0].qkv)} == {"cpu"}
    tokens = _tokens(config, 9, seed=5)
    assert torch.equal(default.reference_logits(tokens), explicit.reference_logits(tokens))
    with pytest.raises(WorkloadError, match="device 'tpu' is not a torch device"):
        LlamaModel(config, device="tpu")
    with pytest.raises(WorkloadError, match="device 'meta': only cpu and cuda devices are supported"):
        LlamaModel(config, device="meta")
