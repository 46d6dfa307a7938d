"""A session's decoder state, as the session store and host see it: no MLX here, so a worker
without a model (the n-gram draft) shares it.

A session's decoder state is the token list it has been given or has proposed (``tokens[0]``
is the decoder start id) and a cache holding K/V for a prefix of it (``kv_cache.DecoderCache``,
or a stand-in with the same ``length``/``capacity``/``encoder_length``/``rollback_to``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

CHUNK = 256  # cache positions added per growth step, and the budget's unit: big enough that growth is rare


class PositionCache(Protocol):
    """What the session core needs of a session's cache (``kv_cache.DecoderCache``; the n-gram
    draft's ``ngram.IndexPositions``)."""

    @property
    def length(self) -> int: ...  # decoder positions whose K/V are valid
    @property
    def capacity(self) -> int: ...  # decoder positions it holds memory for
    @property
    def encoder_length(self) -> int: ...

    def rollback_to(self, length: int) -> None: ...


@dataclass
class DecoderState:
    tokens: list[int]
    cache: PositionCache

    @property
    def length(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        """A token the session's own draft proposed (an engine extends its bookkeeping here)."""
        self.tokens.append(token)

    def rollback_to(self, length: int) -> None:
        """Keep the first ``length`` tokens, 1 <= length <= ``self.length`` (``SessionHost`` checks a
        request's rollback before it calls this)."""
        del self.tokens[length:]
        if self.cache.length > length:
            self.cache.rollback_to(length)

    @property
    def cached_tokens(self) -> int:
        """Positions this session holds memory for: decoder slots (at least the first chunk, which
        its first step allocates, so opened sessions reserve it) plus the encoder."""
        return max(self.cache.capacity, CHUNK) + self.cache.encoder_length
