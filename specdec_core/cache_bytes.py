"""What a session's cache costs in bytes: the one formula the worker's budget (``--cache-memory``),
its Info and metrics, and the README's sessions table all use. No MLX here.

A model session holds, per decoder layer, cross-attention K and V for every prompt token
(projected once) and self-attention K and V for every decoder position it has room for (grown
in whole chunks of ``CHUNK``)::

    bytes = 2 x layers x heads x d_kv x element size x (prompt tokens + decoder capacity)

With a quantized cache (``--kv-bits``) a value takes bits/8 bytes, and every group of G values
along d_kv (d_kv padded with zeros to whole groups) adds a scale and a bias in the cache's
dtype, as ``mx.quantize`` stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .decoder_state import CHUNK

# A "typical" session, for Info's typical_sessions_free and `specdec status`: a 512-token prompt
# and the first chunk of decoder positions (256 decoded tokens).
TYPICAL_PROMPT_TOKENS = 512
TYPICAL_DECODER_POSITIONS = CHUNK
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_GROUP_SIZE = 64  # mx.quantize's default, one group per head at T5's d_kv of 64 and two at 128
# An n-gram session's memory per position: its index's int32 with the doubling headroom (8), and
# per decoder token the token list's pointer and int object (8 + 32); no K/V.
NGRAM_BYTES_PER_POSITION = 48


def capacity_for(length: int) -> int:
    """Decoder slots the cache allocates to hold ``length`` positions (whole chunks)."""
    return -(-length // CHUNK) * CHUNK


class SessionCost(Protocol):
    """What a worker's sessions cost: a ``CacheShape`` for a model, an ``IndexCost`` without one."""

    @property
    def bytes_per_position(self) -> int: ...

    def session_bytes(self, prompt_tokens: int, decoder_capacity: int) -> int: ...


@dataclass(frozen=True)
class CacheShape:
    """A model's cache, position by position: ``layers`` decoder layers of ``heads`` x ``d_kv``
    keys and values, ``element_bytes`` each (the model's dtype), or ``kv_bits`` with groups of
    ``group_size`` values; ``index_bytes`` per position beside them (a hybrid draft's n-gram
    index)."""

    layers: int
    heads: int
    d_kv: int
    element_bytes: int
    kv_bits: int | None = None
    group_size: int = KV_GROUP_SIZE
    index_bytes: int = 0

    @classmethod
    def of_model(cls, args: Any, dtype: str, kv_bits: int | None = None, group_size: int = KV_GROUP_SIZE,
                 index_bytes: int = 0) -> CacheShape:
        """From a model's ``ModelArgs`` (self and cross attention both live in the decoder's
        layers) and its dtype's name."""
        return cls(args.num_decoder_layers, args.num_heads, args.d_kv, ELEMENT_BYTES[dtype], kv_bits,
                   group_size, index_bytes)

    @property
    def vector_bytes(self) -> int:
        """One head's keys (or values) at one position."""
        if self.kv_bits is None:
            return self.d_kv * self.element_bytes
        groups = -(-self.d_kv // self.group_size)
        return groups * self.group_size * self.kv_bits // 8 + groups * 2 * self.element_bytes

    @property
    def bytes_per_position(self) -> int:
        return 2 * self.layers * self.heads * self.vector_bytes + self.index_bytes

    def session_bytes(self, prompt_tokens: int, decoder_capacity: int) -> int:
        return self.bytes_per_position * (prompt_tokens + decoder_capacity)


@dataclass(frozen=True)
class IndexCost:
    """An n-gram draft's session: no K/V, its index and token lists (``NGRAM_BYTES_PER_POSITION``),
    counted over the same positions as a model session's so the store's checks stay the same."""

    bytes_per_position: int = NGRAM_BYTES_PER_POSITION

    def session_bytes(self, prompt_tokens: int, decoder_capacity: int) -> int:
        return self.bytes_per_position * (prompt_tokens + decoder_capacity)


def typical_session_bytes(cost: SessionCost) -> int:
    """A typical session's bytes: ``TYPICAL_PROMPT_TOKENS`` and ``TYPICAL_DECODER_POSITIONS``."""
    return cost.session_bytes(TYPICAL_PROMPT_TOKENS, TYPICAL_DECODER_POSITIONS)
