"""Per-session decoder caches: self-attention K/V with a length pointer, cross-attention K/V once.

Self-attention K/V live in buffers preallocated in chunks of ``CHUNK`` positions;
``length`` says how many positions are valid. Rolling back a rejected draft is
``rollback_to(n)``: a pointer move, never a tensor copy.

With a ``KVQuantization`` (``--kv-bits``) both caches hold K and V as ``mx.quantize`` stores
them (``QuantizedKV``): each position's d_kv values in groups, packed into uint32 with a scale
and a bias per group. A position's bytes depend on that position alone, so appending and
rolling back work exactly as for the float cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .decoder_state import CHUNK
from .errors import CheckpointError

KV_BITS = (4, 8)
# mx.quantize's group sizes are 32, 64 and 128: a whole head per group where d_kv allows (T5's
# 64 and 128), else 32; a head narrower than a group (the tiny test models) is zero-padded.
KV_GROUP_SIZES = (64, 32)


@dataclass(frozen=True)
class KVQuantization:
    """How a model's cached K and V are quantized: ``bits`` per value, groups of ``group_size``
    along each head's ``head_dim`` values, stored ``stored_dim`` wide (head_dim padded with zeros
    to whole groups)."""

    bits: int
    group_size: int
    head_dim: int

    @classmethod
    def for_heads(cls, bits: int, head_dim: int) -> KVQuantization:
        if bits not in KV_BITS:
            raise CheckpointError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}, got {bits}")
        group = next((g for g in KV_GROUP_SIZES if head_dim % g == 0), KV_GROUP_SIZES[-1])
        return cls(bits, group, head_dim)

    @property
    def stored_dim(self) -> int:
        return -(-self.head_dim // self.group_size) * self.group_size

    def quantize(self, x: mx.array) -> QuantizedKV:
        """(1, heads, n, head_dim) keys or values -> their quantized form."""
        if self.stored_dim != self.head_dim:
            x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (0, self.stored_dim - self.head_dim)])
        packed, scales, biases = mx.quantize(x, group_size=self.group_size, bits=self.bits)
        return QuantizedKV(packed, scales, biases, self)


@dataclass(frozen=True)
class QuantizedKV:
    """Keys or values as ``mx.quantize`` stores them, each (1, heads, positions, ·): packed uint32,
    and one scale and one bias per group in the model's dtype."""

    packed: mx.array
    scales: mx.array
    biases: mx.array
    quantization: KVQuantization

    @property
    def arrays(self) -> tuple[mx.array, mx.array, mx.array]:
        return self.packed, self.scales, self.biases

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float keys or values it stands for."""
        return (*self.packed.shape[:-1], self.quantization.head_dim)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def dequantize(self) -> mx.array:
        """The float keys or values the attention sees (a reference for tests)."""
        q = self.quantization
        out = mx.dequantize(*self.arrays, group_size=q.group_size, bits=q.bits)
        return out[..., : q.head_dim]


KV = mx.array | QuantizedKV  # keys or values, float or quantized


class LayerKVCache:
    """Self-attention keys/values of one decoder layer, shaped (1, heads, capacity, d_kv), or with
    ``quantization`` the three parts of each that ``mx.quantize`` makes, (1, heads, capacity, ·)."""

    def __init__(self, quantization: KVQuantization | None = None) -> None:
        self.quantization = quantization
        self.buffers: list[mx.array] = []  # the keys' part(s), then the values'
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2] if self.buffers else 0

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers)

    @property
    def keys(self) -> KV | None:
        """All keys held (the whole capacity), as stored."""
        return self._stored(self.buffers[: len(self.buffers) // 2]) if self.buffers else None

    @property
    def values(self) -> KV | None:
        return self._stored(self.buffers[len(self.buffers) // 2 :]) if self.buffers else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[KV, KV]:
        """Append n new positions (1, heads, n, d_kv); return all valid keys and values."""
        if self.quantization is None:
            parts = [keys, values]
        else:
            parts = [*self.quantization.quantize(keys).arrays, *self.quantization.quantize(values).arrays]
        n = keys.shape[2]
        start, end = self.length, self.length + n
        if end > self.capacity:
            # Keep the valid prefix and grow to the next multiple of CHUNK that holds ``end``
            # (growing by ``end - capacity`` is too little when positions past ``length``
            # were rolled back: the old buffer is cut to ``length`` before concatenating).
            grow = ((end + CHUNK - 1) // CHUNK) * CHUNK - self.length
            fresh = [mx.zeros((1, part.shape[1], grow, part.shape[3]), part.dtype) for part in parts]
            if not self.buffers:
                self.buffers = fresh
            else:
                self.buffers = [mx.concatenate([buffer[:, :, : self.length], new], axis=2)
                                for buffer, new in zip(self.buffers, fresh, strict=True)]
        for buffer, part in zip(self.buffers, parts, strict=True):
            buffer[:, :, start:end, :] = part
        self.length = end
        valid = [buffer[:, :, :end, :] for buffer in self.buffers]
        half = len(valid) // 2
        return self._stored(valid[:half]), self._stored(valid[half:])

    def _stored(self, parts: list[mx.array]) -> KV:
        return parts[0] if self.quantization is None else QuantizedKV(*parts, self.quantization)


@dataclass
class DecoderCache:
    """Everything one session's decoder needs between steps."""

    layers: list[LayerKVCache]
    # Per decoder layer (keys, values) projected from the encoder output once per session.
    cross: list[tuple[KV, KV]] = field(default_factory=list)

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

    @property
    def nbytes(self) -> int:
        """Bytes of every array the session holds: self-attention buffers and cross K/V."""
        return sum(layer.nbytes for layer in self.layers) + sum(kv.nbytes for pair in self.cross for kv in pair)

    def rollback_to(self, length: int) -> None:
        """Forget every position at or after ``length``, 0 <= length <= ``self.length`` (O(1), no
        copy). Its callers derive ``length`` from a session's tokens, which ``SessionHost`` validates."""
        for layer in self.layers:
            layer.length = length

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions (mlx-lm's cache protocol); returns how many were dropped."""
        n = min(max(n, 0), self.length)
        self.rollback_to(self.length - n)
        return n

    def is_trimmable(self) -> bool:
        return True
