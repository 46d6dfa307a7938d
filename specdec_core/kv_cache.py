"""Per-session decoder caches: self-attention K/V with a length pointer, cross-attention K/V once.

Self-attention K/V live in buffers preallocated in chunks of ``CHUNK`` positions;
``length`` says how many positions are valid. Rolling back a rejected draft is
``rollback_to(n)``: a pointer move, never a tensor copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .decoder_state import CHUNK
from .errors import InvalidArgument


class LayerKVCache:
    """Self-attention keys/values of one decoder layer, shaped (1, heads, capacity, d_kv)."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append n new positions (1, heads, n, d_kv); return all valid keys and values."""
        n = keys.shape[2]
        start, end = self.length, self.length + n
        if end > self.capacity:
            # Keep the valid prefix and grow to the next multiple of CHUNK that holds ``end``
            # (growing by ``end - capacity`` is too little when positions past ``length``
            # were rolled back: the old buffer is cut to ``length`` before concatenating).
            grow = ((end + CHUNK - 1) // CHUNK) * CHUNK - self.length
            shape = (1, keys.shape[1], grow, keys.shape[3])
            new_k = mx.zeros(shape, keys.dtype)
            new_v = mx.zeros(shape, values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[:, :, : self.length], new_k], axis=2)
                self.values = mx.concatenate([self.values[:, :, : self.length], new_v], axis=2)
        self.keys[:, :, start:end, :] = keys
        self.values[:, :, start:end, :] = values
        self.length = end
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]


@dataclass
class DecoderCache:
    """Everything one session's decoder needs between steps."""

    layers: list[LayerKVCache]
    # Per decoder layer (keys, values) projected from the encoder output once per session.
    cross: list[tuple[mx.array, mx.array]] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Decoder positions whose K/V are valid."""
        return self.layers[0].length if self.layers else 0

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity if self.layers else 0

    @property
    def encoder_length(self) -> int:
        return self.cross[0][0].shape[2] if self.cross else 0

    def rollback_to(self, length: int) -> None:
        """Forget every position at or after ``length`` (O(1), no copy)."""
        if not 0 <= length <= self.length:
            raise InvalidArgument(
                f"cannot roll the cache back to {length}: it holds {self.length} positions"
            )
        for layer in self.layers:
            layer.length = length

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions (mlx-lm's cache protocol); returns how many were dropped."""
        n = min(max(n, 0), self.length)
        self.rollback_to(self.length - n)
        return n

    def is_trimmable(self) -> bool:
        return True
