"""T5's relative position bias: the bucketing of key - query offsets, the cached bucket tables
and the per-head bias looked up from them (one per stack, shared by its layers)."""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

if TYPE_CHECKING:
    from .t5 import ModelArgs


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucketing of (key - query) offsets, computed in float32 exactly as the reference."""
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    scaled = np.log(np.maximum(relative_position, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    if_large = np.minimum(max_exact + scaled.astype(relative_position.dtype), num_buckets - 1)
    return buckets + np.where(is_small, relative_position, if_large)


# One 1-D table per bucketing (bidirectional, num_buckets, max_distance): the bucket of every
# relative position -half..half-1. A (queries x keys) table depends only on key - query, so it
# is gathered from this one; the 1-D table grows (doubling) to the longest span seen, so the
# memory held is linear in the longest sequence, not one queries x keys table per shape.
_DISTANCE_BUCKETS: dict[tuple[bool, int, int], tuple[int, mx.array]] = {}
_DISTANCE_BUCKETS_LOCK = threading.Lock()


def _distance_buckets(span: int, bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[int, mx.array]:
    """(half, table) with half >= span: table[r + half] is the bucket of relative position r."""
    key = (bidirectional, num_buckets, max_distance)
    with _DISTANCE_BUCKETS_LOCK:
        cached = _DISTANCE_BUCKETS.get(key)
        if cached is not None and cached[0] >= span:
            return cached
        half = max(64, 1 << (max(span, 1) - 1).bit_length())
        relative = np.arange(-half, half, dtype=np.int64)
        table = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
        cached = _DISTANCE_BUCKETS[key] = (half, mx.array(table.astype(np.int32)))
        return cached


def bucket_cache_nbytes() -> int:
    """Bytes held by the cached bucket tables."""
    with _DISTANCE_BUCKETS_LOCK:
        return sum(table.nbytes for _, table in _DISTANCE_BUCKETS.values())


def _bucket_table(
    offset: int, queries: int, keys: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> mx.array:
    """Buckets (queries, keys) of key - query for queries at offset.. and keys 0..keys-1."""
    # key - query lies in [-(offset + queries - 1), keys - 1]
    half, table = _distance_buckets(max(offset + queries, keys), bidirectional, num_buckets, max_distance)
    context = mx.arange(offset, offset + queries, dtype=mx.int32)[:, None]
    memory = mx.arange(keys, dtype=mx.int32)[None, :]
    return table[memory - context + half]


class RelativePositionBias(nn.Module):
    def __init__(self, args: ModelArgs, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = args.relative_attention_num_buckets
        self.max_distance = args.relative_attention_max_distance
        self.embeddings = nn.Embedding(self.num_buckets, args.num_heads)

    def __call__(self, offset: int, queries: int, keys: int) -> mx.array:
        """Bias (1, heads, queries, keys) for queries at positions offset.. over keys 0..keys-1."""
        table = _bucket_table(
            offset, queries, keys, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embeddings(table).transpose(2, 0, 1)[None]
