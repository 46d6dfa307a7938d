"""The MLX T5 against transformers' PyTorch T5 loaded from the same tiny checkpoints.

Both families (v1.0: relu, tied and scaled head; v1.1: gated-gelu, untied head) run every
check through ``family_dir``. Everything is float32; encoder outputs and logits must agree
to 1e-4 absolute (logits reach ~30 in magnitude for these models).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import mlx.core as mx  # conftest imported specdec_core (OpenBLAS) before this
import numpy as np
import pytest
import torch
from doc_prompts import PROMPTS as DOC_PROMPTS
from transformers import T5ForConditionalGeneration

from specdec_core import fast_tanh
from specdec_core.checkpoint import LoadedModel, load_model
from specdec_core.errors import InvalidArgument
from specdec_core.kv_cache import CHUNK
from specdec_core.t5 import T5, Attention
from specdec_core.tokenizer import load_tokenizer

ATOL = 1e-4
PROMPTS = DOC_PROMPTS



@lru_cache(maxsize=4)
def _models(path: Path) -> tuple[T5ForConditionalGeneration, LoadedModel]:
    reference = T5ForConditionalGeneration.from_pretrained(path).eval()
    return reference, load_model(path)


@pytest.fixture
def models(family_dir: Path) -> tuple[T5ForConditionalGeneration, LoadedModel]:
    return _models(family_dir)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The reference models are tiny: extra torch threads only fight for the shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(seed: int, length: int, vocab: int, start: int | None = None) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(3, vocab, size=(1, length))
    if start is not None:
        ids[0, 0] = start
    return ids


def _ref_logits(reference, prompt: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(
            input_ids=torch.tensor(prompt), decoder_input_ids=torch.tensor(decoder)
        ).logits.numpy()


def _close(ours: mx.array, theirs: np.ndarray, atol: float = ATOL) -> None:
    ours_np = np.array(ours)
    assert ours_np.shape == theirs.shape
    err = float(np.abs(ours_np - theirs).max())
    assert err <= atol, f"max abs error {err:.3g} > {atol} (max |reference| {np.abs(theirs).max():.3g})"


def _setup(models, prompt_len: int = 17, decoder_len: int = 16, seed: int = 0):
    reference, loaded = models
    vocab = loaded.args.vocab_size
    prompt = _ids(seed, prompt_len, vocab)
    decoder = _ids(seed + 1, decoder_len, vocab, start=loaded.args.decoder_start_token_id)
    return reference, loaded.model, prompt, decoder


# -- encoder and uncached decoder ---------------------------------------------------------------


def test_encoder_output_matches_reference(models) -> None:
    reference, model, prompt, _ = _setup(models)
    with torch.no_grad():
        expected = reference.encoder(input_ids=torch.tensor(prompt)).last_hidden_state.numpy()
    _close(model.encode(mx.array(prompt)), expected)


def test_padded_batch_matches_reference(models) -> None:
    """A right-padded batch: masked encoder positions and masked cross-attention."""
    reference, model, prompt, decoder = _setup(models)
    batch = np.repeat(prompt, 2, axis=0)
    mask = np.ones_like(batch)
    batch[1, 9:], mask[1, 9:] = 0, 0
    dec = np.repeat(decoder[:, :6], 2, axis=0)
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(batch), attention_mask=torch.tensor(mask),
                        decoder_input_ids=torch.tensor(dec))
    encoded = model.encode(mx.array(batch), mx.array(mask))
    ours = np.array(encoded)
    theirs = out.encoder_last_hidden_state.numpy()
    assert np.abs(ours[0] - theirs[0]).max() <= ATOL
    assert np.abs(ours[1, :9] - theirs[1, :9]).max() <= ATOL  # padded positions are don't-care
    _close(model.decode(mx.array(dec), encoder_output=encoded, encoder_mask=mx.array(mask)),
           out.logits.numpy())


def test_uncached_decoder_logits_match_reference(models) -> None:
    reference, model, prompt, decoder = _setup(models)
    logits = model.decode(mx.array(decoder), encoder_output=model.encode(mx.array(prompt)))
    assert logits.dtype == mx.float32
    _close(logits, _ref_logits(reference, prompt, decoder))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rational_tanh_is_tanh_to_float32_rounding(dtype) -> None:
    """The CPU's fast tanh for big arrays, against float64 tanh: within 4e-7 in float32 (whose
    own tanh is within 6e-8), and equal to MLX's tanh after rounding to bfloat16."""
    u = np.concatenate([np.linspace(-30, 30, 600_001), [0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0]]).astype(np.float32)
    assert u.size >= fast_tanh.RATIONAL_TANH_MIN_ELEMENTS  # the rational path, on this (CPU) device
    ours = fast_tanh.tanh(mx.array(u).astype(dtype))
    assert ours.dtype == dtype
    if dtype == mx.float32:
        assert np.abs(np.array(ours).astype(np.float64) - np.tanh(u.astype(np.float64))).max() <= 4e-7
    else:
        assert mx.array_equal(ours, mx.tanh(mx.array(u).astype(dtype)))


def test_logits_with_the_rational_tanh_match_reference(models, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny models' activations are below the size where the CPU switches to the rational
    tanh: force it everywhere and compare with transformers."""
    monkeypatch.setattr(fast_tanh, "RATIONAL_TANH_MIN_ELEMENTS", 0)
    reference, model, prompt, decoder = _setup(models)
    logits = model.decode(mx.array(decoder), encoder_output=model.encode(mx.array(prompt)))
    _close(logits, _ref_logits(reference, prompt, decoder))


# -- cached decoding ----------------------------------------------------------------------------


def test_cached_one_token_at_a_time(models) -> None:
    reference, model, prompt, decoder = _setup(models)
    cache = model.make_cache(model.encode(mx.array(prompt)))
    steps = [model.decode(mx.array(decoder[:, i : i + 1]), cache=cache) for i in range(decoder.shape[1])]
    assert cache.length == decoder.shape[1]
    _close(mx.concatenate(steps, axis=1), _ref_logits(reference, prompt, decoder))


def test_cached_block_of_k_plus_one_after_single_tokens(models) -> None:
    reference, model, prompt, decoder = _setup(models)
    expected = _ref_logits(reference, prompt, decoder[:, :10])
    cache = model.make_cache(model.encode(mx.array(prompt)))
    for i in range(4):
        _close(model.decode(mx.array(decoder[:, i : i + 1]), cache=cache), expected[:, i : i + 1])
    block = model.decode(mx.array(decoder[:, 4:10]), cache=cache)  # k + 1 = 6 in one pass
    assert block.shape == (1, 6, model.args.vocab_size)
    assert cache.length == 10
    _close(block, expected[:, 4:10])


def test_rollback_then_refeed_different_tokens(models) -> None:
    reference, model, prompt, decoder = _setup(models)
    cache = model.make_cache(model.encode(mx.array(prompt)))
    model.decode(mx.array(decoder[:, :5]), cache=cache)
    model.decode(mx.array(decoder[:, 5:11]), cache=cache)  # a rejected draft block
    cache.rollback_to(7)
    assert cache.length == 7
    other = _ids(99, 6, model.args.vocab_size)
    new_sequence = np.concatenate([decoder[:, :7], other], axis=1)
    expected = _ref_logits(reference, prompt, new_sequence)
    _close(model.decode(mx.array(other[:, :1]), cache=cache), expected[:, 7:8])
    _close(model.decode(mx.array(other[:, 1:]), cache=cache), expected[:, 8:13])
    cache.rollback_to(7)  # and once more, straight to a block
    _close(model.decode(mx.array(other), cache=cache), expected[:, 7:13])


def test_trim_drops_last_positions(models) -> None:
    reference, model, prompt, decoder = _setup(models)
    cache = model.make_cache(model.encode(mx.array(prompt)))
    model.decode(mx.array(decoder[:, :12]), cache=cache)
    assert cache.is_trimmable()
    assert cache.trim(3) == 3 and cache.length == 9
    assert cache.trim(0) == 0 and cache.length == 9
    _close(model.decode(mx.array(decoder[:, 9:12]), cache=cache),
           _ref_logits(reference, prompt, decoder[:, :12])[:, 9:12])
    assert cache.trim(100) == 12 and cache.length == 0  # clamped to what is there


def test_cache_grows_past_chunk_boundary(models) -> None:
    reference, model, prompt, _ = _setup(models)
    total = CHUNK + 44
    decoder = _ids(5, total, model.args.vocab_size, start=model.args.decoder_start_token_id)
    expected = _ref_logits(reference, prompt, decoder)
    cache = model.make_cache(model.encode(mx.array(prompt)))
    model.decode(mx.array(decoder[:, : CHUNK - 3]), cache=cache, num_logits=0)
    assert cache.capacity == CHUNK
    pos = CHUNK - 3
    for _ in range(5):  # single tokens across the boundary
        _close(model.decode(mx.array(decoder[:, pos : pos + 1]), cache=cache), expected[:, pos : pos + 1])
        pos += 1
    assert cache.capacity == 2 * CHUNK
    _close(model.decode(mx.array(decoder[:, pos:]), cache=cache), expected[:, pos:])
    assert cache.length == total


def test_rollback_then_block_longer_than_free_space(models) -> None:
    """After a rollback the buffer is cut to the valid prefix before growing: it must still
    grow enough for a block longer than a chunk."""
    reference, model, prompt, _ = _setup(models)
    total = CHUNK + 44
    decoder = _ids(6, total, model.args.vocab_size, start=model.args.decoder_start_token_id)
    expected = _ref_logits(reference, prompt, decoder)
    cache = model.make_cache(model.encode(mx.array(prompt)))
    model.decode(mx.array(decoder[:, :20]), cache=cache, num_logits=0)
    cache.rollback_to(10)
    _close(model.decode(mx.array(decoder[:, 10:]), cache=cache), expected[:, 10:])
    assert cache.length == total and cache.capacity >= total


# -- greedy generation --------------------------------------------------------------------------


def _greedy(model: T5, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Target-alone greedy decoding with the session cache: one token per decoder pass."""
    cache = model.make_cache(model.encode(mx.array([prompt_ids])))
    tokens = [model.args.decoder_start_token_id]
    for _ in range(max_new_tokens):
        logits = model.decode(mx.array([tokens[-1:]]), cache=cache)
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        if tokens[-1] == model.args.eos_token_id:
            break
    return tokens


def test_greedy_generation_matches_generate(models, tokenizer_dir: Path) -> None:
    reference, loaded = models
    tokenizer = load_tokenizer(tokenizer_dir)
    n = 16
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # one generate call for all
    with torch.no_grad():
        generated = reference.generate(**batch, do_sample=False, max_new_tokens=n).tolist()
    eos, pad = loaded.args.eos_token_id, loaded.args.pad_token_id
    exact = 0
    for text, row in zip(PROMPTS, generated, strict=True):
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert all(t == pad for t in row[len(expected) :])  # finished rows are padded
        ours = _greedy(loaded.model, tokenizer(text).input_ids, n)
        if ours == expected:
            exact += 1
            continue
        # Padding in the batched reference moves logits by ~1e-6: a near tie may flip. Allow
        # only that: where we first differ, the reference's own two choices must be a tie.
        i = next(j for j, (a, b) in enumerate(zip(ours, expected, strict=False)) if a != b)
        with torch.no_grad():
            logits = reference(input_ids=tokenizer(text, return_tensors="pt").input_ids,
                               decoder_input_ids=torch.tensor([expected[:i]])).logits[0, -1]
        gap = abs(float(logits[expected[i]] - logits[ours[i]]))
        assert gap < 1e-3, f"{text!r}: differs at {i} where the reference prefers {expected[i]} by {gap}"
    assert exact >= 10


# -- where the work happens ---------------------------------------------------------------------


def test_lm_head_runs_only_on_requested_positions(models, monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, prompt, decoder = _setup(models)
    encoded = model.encode(mx.array(prompt))
    full = model.decode(mx.array(decoder[:, :6]), encoder_output=encoded)
    head_inputs: list[tuple[int, ...]] = []
    original = T5.logits

    def spy(self, hidden):
        head_inputs.append(tuple(hidden.shape))
        return original(self, hidden)

    monkeypatch.setattr(T5, "logits", spy)
    for num_logits in (1, 3, 6):
        cache = model.make_cache(encoded)
        out = model.decode(mx.array(decoder[:, :6]), cache=cache, num_logits=num_logits)
        assert out.shape == (1, num_logits, model.args.vocab_size)
        assert head_inputs[-1] == (1, num_logits, model.args.d_model)
        _close(out, np.array(full[:, 6 - num_logits :]))
    assert model.decode(mx.array(decoder[:, :6]), encoder_output=encoded, num_logits=0).shape[1] == 0


def test_cross_attention_kv_computed_once(models, monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, prompt, decoder = _setup(models)
    cross = {id(layer.cross_attn) for layer in model.decoder_layers}
    projected: list[int] = []
    original = Attention.project_kv

    def spy(self, x):
        projected.append(id(self))
        return original(self, x)

    monkeypatch.setattr(Attention, "project_kv", spy)
    cache = model.make_cache(model.encode(mx.array(prompt)))
    assert sum(p in cross for p in projected) == len(model.decoder_layers)
    projected.clear()
    for i in range(4):
        model.decode(mx.array(decoder[:, i : i + 1]), cache=cache)
    model.decode(mx.array(decoder[:, 4:10]), cache=cache)
    cache.rollback_to(5)
    model.decode(mx.array(decoder[:, 5:8]), cache=cache)
    assert projected, "the spy saw no self-attention projections"
    assert not any(p in cross for p in projected), "cached decode recomputed cross-attention K/V"


# -- bad inputs ---------------------------------------------------------------------------------


def test_decode_needs_cache_or_encoder_output(models) -> None:
    _, model, _, decoder = _setup(models)
    with pytest.raises(InvalidArgument, match="decode without a cache needs encoder_output"):
        model.decode(mx.array(decoder[:, :3]))


def test_num_logits_out_of_range(models) -> None:
    _, model, prompt, decoder = _setup(models)
    encoded = model.encode(mx.array(prompt))
    with pytest.raises(InvalidArgument, match=r"num_logits must be in \[0, 3\]"):
        model.decode(mx.array(decoder[:, :3]), encoder_output=encoded, num_logits=4)
