"""The relative-position bucket tables: identical to T5's bucketing, and the memory they hold
stays linear in the longest sequence however many distinct lengths are seen."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest

from specdec_core.relative_position import (
    RelativePositionBias,
    _bucket_table,
    bucket_cache_nbytes,
    relative_position_bucket,
)
from specdec_core.t5 import ModelArgs


@pytest.mark.parametrize("bidirectional", [True, False])
def test_tables_equal_direct_bucketing(bidirectional: bool) -> None:
    """Every shape (including ones seen before and after the shared table grew) gives exactly
    the buckets of key - query."""
    for offset, queries, keys in [(0, 5, 5), (0, 300, 300), (7, 3, 10), (0, 1, 1), (250, 6, 256),
                                  (0, 1000, 1000), (3, 2, 5), (999, 1, 1000)]:
        context = np.arange(offset, offset + queries)[:, None]
        memory = np.arange(keys)[None, :]
        expected = relative_position_bucket(memory - context, bidirectional, 32, 128)
        got = np.array(_bucket_table(offset, queries, keys, bidirectional, 32, 128))
        np.testing.assert_array_equal(got, expected)


def test_memory_held_stays_linear_in_the_longest_length() -> None:
    """Encoder biases for 40 distinct lengths up to 440 and decoder biases for 40 distinct
    cache lengths: the MLX memory still held afterwards (the cached tables; every result is
    dropped) is a few bytes per position, not a length x length table per shape."""
    args = ModelArgs(num_heads=2, relative_attention_num_buckets=16, relative_attention_max_distance=60)
    encoder = RelativePositionBias(args, bidirectional=True)
    decoder = RelativePositionBias(args, bidirectional=False)
    mx.eval(encoder.parameters(), decoder.parameters())
    gc.collect()
    before, cache_before = mx.get_active_memory(), bucket_cache_nbytes()
    longest = 0
    for length in range(401, 441):
        mx.eval(encoder(0, length, length))
        mx.eval(decoder(length - 4, 5, length + 1))
        longest = max(longest, length + 1)
    gc.collect()
    held = mx.get_active_memory() - before
    one_table = longest * longest * 4  # what a single cached int32 queries x keys table takes
    assert held <= 64 * longest, f"{held} bytes held after 80 shapes (one full table is {one_table})"
    assert bucket_cache_nbytes() - cache_before <= 64 * longest
