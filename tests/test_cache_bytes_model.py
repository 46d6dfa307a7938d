"""The cache formula (``specdec_core.cache_bytes``) against the bytes a real session's cache holds:
the nbytes of every self-attention buffer and cross-attention K/V of a tiny model, in each dtype
and K/V cache setting, before the first step and after growing past a chunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec_core.checkpoint import load_model
from specdec_core.decoder_state import CHUNK
from specdec_core.engine import ModelEngine

PROMPT = list(range(3, 40))  # 37 tokens


def held_bytes(cache) -> int:  # type: ignore[no-untyped-def]
    """Every array the session's cache holds, summed by hand (not the cache's own nbytes)."""
    self_attention = sum(buffer.nbytes for layer in cache.layers for buffer in layer.buffers)
    cross = sum(kv.nbytes for pair in cache.cross for kv in pair)
    return self_attention + cross


# The tiny v1.1 model: 2 decoder layers x 4 heads x d_kv 16, K and V; what one head's K (or V) at
# one position costs for E bytes per element (the dtype the model computes in: float32 on a CPU,
# whatever the weights): 16 values, or with --kv-bits d_kv padded to one group of 32, packed,
# plus a scale and a bias.
HEAD_BYTES = {None: lambda e: 16 * e, 8: lambda e: 32 + 2 * e, 4: lambda e: 16 + 2 * e}


@pytest.mark.parametrize("dtype, kv_bits", [(None, None), ("bfloat16", None), (None, 8), ("bfloat16", 4)])
def test_the_formula_is_what_a_session_holds(t5_v11_dir: Path, dtype: str | None, kv_bits: int | None) -> None:
    loaded = load_model(str(t5_v11_dir), dtype=dtype)
    engine = ModelEngine(loaded, kv_bits=kv_bits)
    element = {"float32": 4, "bfloat16": 2}[loaded.activation_dtype]
    cost = engine.cache_cost
    assert cost.bytes_per_position == 2 * 2 * 4 * HEAD_BYTES[kv_bits](element)
    state = engine.start(PROMPT)
    assert held_bytes(state.cache) == cost.session_bytes(len(PROMPT), 0)  # cross K/V only, until a step
    engine.forward(state, 1)  # the first step allocates the first chunk
    assert state.cache.capacity == CHUNK
    assert held_bytes(state.cache) == cost.session_bytes(len(PROMPT), CHUNK)
    state.tokens.extend([5] * (CHUNK + 44))  # past the first chunk: the cache grows by whole chunks
    engine.forward(state, 1)
    assert state.cache.capacity == 2 * CHUNK
    assert held_bytes(state.cache) == cost.session_bytes(len(PROMPT), 2 * CHUNK)
