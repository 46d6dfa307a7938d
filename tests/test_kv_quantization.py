"""The quantized K/V cache (``--kv-bits``, specdec_core/kv_cache.py ``KVQuantization``).

- Its attention (``mx.quantized_matmul`` over the packed cache) against the float attention over
  the same cache dequantized (``mx.dequantize``): the same numbers to float32 rounding, alone and
  in a ragged batch, at head sizes that fill one group, several, or less than one (padded).
- Rollback stays a pointer move: a rejected block rolled back and another appended leaves the
  cache and the logits exactly as if the rejected block had never been fed.
- Bytes: nbytes of a session's arrays against the formula (specdec_core/cache_bytes.py): 8 bits
  hold ~half of bfloat16's bytes, 4 bits ~a quarter (the rest is a scale and a bias per group).
- Speculative greedy output with a quantized target cache equals that target's own greedy output
  with the same cache, alone and batched, on the demo pair (the in-process loop over
  ``LocalBackend``s), and draft and target may use different settings; also after the target lost
  the session and the loop reopened and resynced it (more tokens than one decoder slice at once).
- The flag: parsed, reported in Info, refused by the n-gram draft.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import mlx.core as mx  # conftest imported specdec_core (OpenBLAS) before this
import numpy as np
import pytest

from orchestrator.backend_protocol import ReplicaError, ReplicaFailure
from orchestrator.params import GenerationParams
from orchestrator.speculative import SpeculativeGeneration
from specdec_core.cache_bytes import KV_GROUP_SIZE, CacheShape
from specdec_core.checkpoint import load_model
from specdec_core.decoder_state import CHUNK
from specdec_core.engine import DECODE_SLICE, ModelEngine
from specdec_core.errors import CheckpointError
from specdec_core.kv_cache import DecoderCache, KVQuantization, LayerKVCache
from specdec_core.session_host import HostLimits, SessionHost
from specdec_core.steps import SamplingParams, StepRequest
from specdec_core.t5 import T5, ModelArgs, attend
from specdec_core.tokenizer import load_tokenizer
from specdec_tools.local_backends import LocalBackend, LocalSource

MODELS = Path(__file__).resolve().parents[1] / "models"
ATOL = 1e-5


def _model(d_kv: int, heads: int = 2, dtype: mx.Dtype = mx.float32, seed: int = 0) -> T5:
    """A random T5 (MLX's initialisation) whose heads are ``d_kv`` wide."""
    mx.random.seed(seed)
    model = T5(ModelArgs(vocab_size=50, d_model=48, d_kv=d_kv, d_ff=64, num_layers=1, num_decoder_layers=2,
                         num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         feed_forward_proj="gated-gelu", scale_decoder_outputs=False, untied_lm_head=True))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _encoded(model: T5, length: int, seed: int) -> mx.array:
    ids = np.random.default_rng(seed).integers(2, model.args.vocab_size, size=(1, length))
    return model.encode(mx.array(ids))


def _tokens(model: T5, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, model.args.vocab_size, size=n).tolist()


class DequantizedLayer(LayerKVCache):
    """The reference: a float cache holding exactly what the quantized cache holds, dequantized."""

    def __init__(self, quantization: KVQuantization):
        super().__init__()
        self.spec = quantization

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return super().update_and_fetch(self.spec.quantize(keys).dequantize(), self.spec.quantize(values).dequantize())


def _dequantized_twin(model: T5, quantized: DecoderCache) -> DecoderCache:
    spec = quantized.layers[0].quantization
    return DecoderCache([DequantizedLayer(spec) for _ in model.decoder_layers],
                        [(k.dequantize(), v.dequantize()) for k, v in quantized.cross])


@pytest.mark.parametrize("d_kv", [16, 64, 96])  # padded to one group of 32; one group of 64; three of 32
@pytest.mark.parametrize("bits", [8, 4])
def test_attention_over_the_quantized_cache_equals_float_attention_over_it_dequantized(d_kv: int, bits: int) -> None:
    spec = KVQuantization.for_heads(bits, d_kv)
    assert spec.stored_dim % spec.group_size == 0 and spec.stored_dim >= d_kv
    rng = np.random.default_rng(d_kv + bits)
    queries = mx.array(rng.standard_normal((1, 3, 5, d_kv)).astype(np.float32))
    keys = spec.quantize(mx.array(rng.standard_normal((1, 3, 11, d_kv)).astype(np.float32)))
    values = spec.quantize(mx.array(rng.standard_normal((1, 3, 11, d_kv)).astype(np.float32)))
    bias = mx.array(rng.standard_normal((1, 3, 5, 11)).astype(np.float32))
    got = attend(queries, keys, values, bias)
    assert got.shape == (1, 3, 5, d_kv)
    np.testing.assert_allclose(np.array(got), np.array(attend(queries, keys.dequantize(), values.dequantize(), bias)),
                               atol=ATOL, rtol=ATOL)

    # The whole decoder (relative position bias, causal mask, cross attention), one session and a
    # ragged batch of three: blocks of several positions, then single tokens.
    model = _model(d_kv, seed=d_kv)
    caches = [model.make_cache(_encoded(model, length, seed), spec) for seed, length in enumerate((7, 12, 4))]
    twins = [_dequantized_twin(model, cache) for cache in caches]
    blocks = [[0, *_tokens(model, 4, seed)] for seed in range(3)]
    passes = [([0, 1, 2], blocks), ([0, 1, 2], [[9], [17], [4]]),  # blocks, then single tokens, batched
              ([1], [_tokens(model, 3, 10)]), ([0, 2], [_tokens(model, 2, 11), [5]])]  # alone; ragged
    for sessions, tokens in passes:
        wanted = [len(t) for t in tokens]
        got = model.decode_sessions(tokens, [caches[i] for i in sessions], wanted)
        expected = model.decode_sessions(tokens, [twins[i] for i in sessions], wanted)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("accepted", [12, CHUNK - 4])  # the rejected block within a chunk, or growing one
@pytest.mark.parametrize("bits", [8, 4])
def test_rollback_then_reappend_equals_a_cache_that_never_saw_the_rejected_block(accepted: int, bits: int) -> None:
    model = _model(64)
    spec = KVQuantization.for_heads(bits, 64)
    encoded = _encoded(model, 9, 1)
    prefix, rejected, kept = [0, *_tokens(model, accepted - 1, 2)], _tokens(model, 8, 3), _tokens(model, 10, 4)
    rolled, fresh = model.make_cache(encoded, spec), model.make_cache(encoded, spec)
    for cache in (rolled, fresh):
        model.decode_sessions([prefix], [cache], [0])
    model.decode_sessions([rejected], [rolled], [len(rejected)])
    rolled.rollback_to(accepted)
    assert rolled.length == accepted
    got = model.decode_sessions([kept], [rolled], [len(kept)])[0]
    expected = model.decode_sessions([kept], [fresh], [len(kept)])[0]
    assert np.array_equal(np.array(got), np.array(expected))
    end = accepted + len(kept)
    for a, b in zip(rolled.layers, fresh.layers, strict=True):
        assert a.length == b.length == end
        for x, y in zip(a.buffers, b.buffers, strict=True):
            assert x.dtype == y.dtype and np.array_equal(np.array(x[:, :, :end]), np.array(y[:, :, :end]))


def _session_array_bytes(cache: DecoderCache) -> int:
    """nbytes of every array a session's cache holds, counted here, not by the cache."""
    arrays = [buffer for layer in cache.layers for buffer in layer.buffers]
    for keys, values in cache.cross:
        for kv in (keys, values):
            arrays.extend(kv.arrays if hasattr(kv, "arrays") else [kv])
    return sum(a.nbytes for a in arrays)


@pytest.mark.parametrize("d_kv", [64, 128])
def test_eight_bits_halve_a_bfloat16_sessions_bytes_and_four_bits_quarter_them(d_kv: int) -> None:
    model = _model(d_kv, dtype=mx.bfloat16)
    encoded = _encoded(model, 30, 5)
    tokens = [0, *_tokens(model, 40, 6)]
    sizes = {}
    for bits in (None, 8, 4):
        cache = model.make_cache(encoded, None if bits is None else KVQuantization.for_heads(bits, d_kv))
        model.decode_sessions([tokens], [cache], [1])
        assert cache.capacity == CHUNK
        sizes[bits] = _session_array_bytes(cache)
        assert cache.nbytes == sizes[bits]
    positions = 30 + CHUNK  # the prompt's cross K/V and one chunk of self-attention slots
    per_head = 2 * model.args.num_decoder_layers * model.args.num_heads * positions  # K and V of each
    groups = d_kv // 64  # a scale and a bias (bfloat16) per group of 64
    assert sizes[None] == per_head * d_kv * 2
    assert sizes[8] == per_head * (d_kv + groups * 2 * 2)
    assert sizes[4] == per_head * (d_kv // 2 + groups * 2 * 2)
    assert sizes[8] / sizes[None] == pytest.approx(0.53125)  # 8 bits and 4 bytes of scales per 64 values
    assert sizes[4] / sizes[None] == pytest.approx(0.28125)


@pytest.mark.parametrize(("d_kv", "dtype"), [(16, mx.float32), (64, mx.bfloat16), (96, mx.float32)])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_the_budgets_formula_counts_a_quantized_sessions_bytes(d_kv: int, dtype: mx.Dtype, bits: int | None) -> None:
    """cache_bytes.CacheShape (what --cache-memory counts) with this cache's bits and group size equals
    the nbytes of a session's arrays, padding of narrow heads included, after growing a chunk."""
    model = _model(d_kv, dtype=dtype)
    spec = None if bits is None else KVQuantization.for_heads(bits, d_kv)
    cache = model.make_cache(_encoded(model, 23, 7), spec)
    model.decode_sessions([[0, *_tokens(model, CHUNK + 9, 8)]], [cache], [1])
    assert cache.capacity == 2 * CHUNK
    shape = CacheShape.of_model(model.args, "float32" if dtype == mx.float32 else "bfloat16", bits,
                                spec.group_size if spec else KV_GROUP_SIZE)
    assert shape.session_bytes(23, cache.capacity) == _session_array_bytes(cache)


def test_bits_other_than_8_and_4_are_refused() -> None:
    with pytest.raises(CheckpointError, match="--kv-bits must be one of 4, 8"):
        KVQuantization.for_heads(3, 64)


# -- speculation through the in-process loop ----------------------------------------------------------


DEMO_PROMPTS = ["spell 777777", "spell 4512", "spell 90017", "spell 373737", "spell 208040", "spell 66"]
# The tiny random pair (tests/conftest.py): long outputs, a draft often rejected (rollbacks).
TINY_PROMPTS = [[37, 12, 99, 250, 8, 41, 1], [5, 77, 301, 6, 1], [120, 3, 3, 64, 200, 9, 18, 44, 1],
                [260, 14, 1], [90, 91, 92, 93, 1], [11, 222, 33, 1]]
MAX_TOKENS = 40


def _generate(draft: ModelEngine, target: ModelEngine, prompts: list[list[int]], speculative: bool,
              num_draft: int) -> list[list[int]]:
    """Greedy requests all at once (their steps batched on the hosts)."""
    limits = HostLimits(watchdog_s=0, batch_wait_ms=2)
    hosts = SessionHost(draft, limits, "draft", "fp"), SessionHost(target, limits, "target", "fp")
    source = LocalSource(*hosts)

    async def one(prompt: list[int]) -> list[int]:
        params = GenerationParams(max_tokens=MAX_TOKENS, num_draft=num_draft, sampling=SamplingParams(),
                                  speculative=speculative)
        run = SpeculativeGeneration(source, prompt, params, 0, 1)
        return [t async for event in run.run() for t in event.tokens]

    async def main() -> list[list[int]]:
        for host in hosts:
            host.start()
        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            for host in hosts:
                await host.stop()

    return asyncio.run(main())


@pytest.fixture(scope="module", params=["demo", "tiny"])
def pair(request: pytest.FixtureRequest, near_draft_dir: Path, target_dir: Path
         ) -> tuple[Path, Path, list[list[int]]]:
    """(draft, target, prompts): the committed demo pair, or the tiny random pair."""
    if request.param == "tiny":
        return near_draft_dir, target_dir, TINY_PROMPTS
    tokenizer = load_tokenizer(MODELS / "demo-target")
    return MODELS / "demo-draft", MODELS / "demo-target", [tokenizer(p).input_ids for p in DEMO_PROMPTS]


@pytest.mark.parametrize(("target_bits", "draft_bits"), [(8, None), (4, None), (8, 4)])
def test_speculative_greedy_equals_the_target_alone_with_the_same_cache(
        target_bits: int, draft_bits: int | None, pair: tuple[Path, Path, list[list[int]]]) -> None:
    draft_dir, target_dir, prompts = pair
    draft = ModelEngine(load_model(draft_dir), max_draft=8, kv_bits=draft_bits)
    target = ModelEngine(load_model(target_dir), max_draft=8, kv_bits=target_bits)
    alone = [_generate(draft, target, [p], speculative=False, num_draft=0)[0] for p in prompts]
    for num_draft in (2, 5):
        assert _generate(draft, target, prompts[:1], True, num_draft) == alone[:1]  # one session
        assert _generate(draft, target, prompts, True, num_draft) == alone  # a batch of six


def test_a_four_bit_cache_changes_the_output_so_the_guarantee_is_per_setting(near_draft_dir: Path,
                                                                              target_dir: Path) -> None:
    draft = ModelEngine(load_model(near_draft_dir), max_draft=8)
    outputs = {bits: _generate(draft, ModelEngine(load_model(target_dir), kv_bits=bits), TINY_PROMPTS, False, 0)
               for bits in (None, 4)}
    assert outputs[None] != outputs[4]


# -- the flag ------------------------------------------------------------------------------------------


def test_the_flag_reaches_the_engine_and_info_and_the_ngram_draft_refuses_it() -> None:
    from specdec_grpc.worker import WorkerConfig, build_host, build_parser, info_response

    assert build_parser("target").parse_args([]).kv_bits is None
    with pytest.raises(SystemExit):
        build_parser("draft").parse_args(["--kv-bits", "3"])
    for role, bits, group in (("target", None, 0), ("target", 8, 32), ("draft", 4, 32)):
        args = build_parser(role).parse_args(["--model", str(MODELS / f"demo-{role}")]
                                             + ([] if bits is None else ["--kv-bits", str(bits)]))
        info = info_response(build_host(WorkerConfig.from_args(role, args)))
        assert (info.kv_bits, info.kv_group_size) == (bits or 0, group)
    with pytest.raises(CheckpointError, match="the ngram draft has none"):
        build_host(WorkerConfig(role="draft", model=str(MODELS / "demo-draft"), method="ngram", kv_bits=8))


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_the_engine_budgets_its_sessions_quantized_bytes(bits: int | None) -> None:
    """What the worker's --cache-memory counts for a session (``ModelEngine.cache_cost``) is what the
    session's arrays hold, with the engine's --kv-bits."""
    engine = ModelEngine(load_model(MODELS / "demo-target"), kv_bits=bits)
    prompt = list(range(5, 40))
    state = engine.start(prompt)
    state.tokens += [7, 8, 9]
    engine.forward(state, 1)
    assert engine.cache_cost.session_bytes(len(prompt), state.cache.capacity) == _session_array_bytes(state.cache)


class ForgetfulTarget(LocalBackend):
    """A target that loses the request's session once (as a TTL expiry or a restart would) when the
    session has grown past ``forget_after`` tokens: the loop reopens it there and resyncs it, the
    prompt and every committed token appended at once."""

    def __init__(self, host: SessionHost, forget_after: int):
        super().__init__(host, "target-0")
        self.forget_after, self.forgot = forget_after, False

    async def step(self, request: StepRequest) -> Any:
        if not self.forgot and request.expected_length > self.forget_after:
            self.forgot = True
            await self.host.close(request.session_id)
            raise ReplicaError(self.address, ReplicaFailure.SESSION_LOST, "NOT_FOUND: session expired")
        return await super().step(request)


def test_a_reopened_quantized_session_resyncs_to_the_same_output(near_draft_dir: Path, target_dir: Path) -> None:
    """The resync appends more tokens than one decoder slice (``engine.DECODE_SLICE``), so the quantized
    cache is refilled in slices; the output is still the 4-bit target alone's."""
    draft = ModelEngine(load_model(near_draft_dir), max_draft=8)
    target = ModelEngine(load_model(target_dir), max_draft=8, kv_bits=4)
    prompt, max_tokens = TINY_PROMPTS[1], DECODE_SLICE + 40
    limits = HostLimits(watchdog_s=0)

    async def generate(speculative: bool, forget_after: int | None) -> tuple[list[int], bool]:
        hosts = SessionHost(draft, limits, "draft", "fp"), SessionHost(target, limits, "target", "fp")
        for host in hosts:
            host.start()
        source = LocalSource(*hosts)
        if forget_after is not None:
            source.backends["target"] = ForgetfulTarget(hosts[1], forget_after)
        try:
            params = GenerationParams(max_tokens=max_tokens, num_draft=3, sampling=SamplingParams(),
                                      speculative=speculative)
            run = SpeculativeGeneration(source, prompt, params, 0, 1)
            tokens = [t async for event in run.run() for t in event.tokens]
            return tokens, getattr(source.backends["target"], "forgot", False)
        finally:
            for host in hosts:
                await host.stop()

    alone, _ = asyncio.run(generate(False, None))
    assert len(alone) == max_tokens  # no EOS before the loss below
    resynced, forgot = asyncio.run(generate(True, DECODE_SLICE + 10))
    assert forgot and resynced == alone
