"""The hybrid draft: the n-gram lookup where it has a long match, the draft model elsewhere.

At each draft position the session's ``NgramIndex`` is asked first: if the output's last
``min_match`` (or more) tokens occurred before, the tokens that followed are proposed with a
point-mass q; otherwise the model drafts one token (argmax, or a draw from its float16 wire q).
So each position's q is the distribution its token was actually drawn from, and which source
drafts a position depends only on the tokens before it (never on a random draw): exact
sampling stays exact. The model's cache lags behind the n-gram tokens appended to the
session; ``ModelEngine.forward`` feeds every token past the cache at its next pass, so the
cache stays consistent with the session's tokens (rollbacks included).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .cache_bytes import NGRAM_BYTES_PER_POSITION, CacheShape
from .checkpoint import LoadedModel
from .engine import DecoderState, Drafting, ModelEngine
from .errors import InvalidArgument
from .kv_cache import DecoderCache
from .ngram import NgramIndex, check_ngram_sizes, point_mass
from .steps import SamplingParams


@dataclass
class HybridState(DecoderState):
    """A model session's decoder state plus the n-gram index of its prompt and output."""

    index: NgramIndex

    def append(self, token: int) -> None:
        super().append(token)
        self.index.extend([token])


class HybridEngine(ModelEngine):
    method = "hybrid"

    def __init__(self, loaded: LoadedModel, max_draft: int = 64, min_match: int = 3, ngram_max: int = 4,
                 kv_bits: int | None = None):
        super().__init__(loaded, max_draft, kv_bits)
        if min_match > ngram_max:
            raise InvalidArgument(
                f"the hybrid draft's minimum match ({min_match}) must not exceed the longest n-gram "
                f"it indexes ({ngram_max}): raise --ngram-max or lower --hybrid-min-match"
            )
        check_ngram_sizes(min_match, ngram_max)
        self.min_match = min_match
        self.ngram_max = ngram_max

    @property
    def cache_cost(self) -> CacheShape:
        """The model's K/V and, beside them, each session's n-gram index."""
        return replace(super().cache_cost, index_bytes=NGRAM_BYTES_PER_POSITION)

    def _new_state(self, prompt_ids: list[int], cache: DecoderCache) -> HybridState:
        state = super()._new_state(prompt_ids, cache)
        # Only matches of min_match or more are used, so shorter n-grams are not indexed.
        return HybridState(state.tokens, state.cache, NgramIndex(prompt_ids, self.min_match, self.ngram_max))

    def _drafting(self, state: HybridState, k: int, params: SamplingParams, seed: int) -> Drafting:
        state.index.sync(state.tokens[1:])  # the host rolled back and appended since the last step
        return super()._drafting(state, k, params, seed)

    def _fill(self, draft: Drafting) -> bool:
        """Take the n-gram match at the next positions while there is one; True if the model must
        draft the position after them."""
        state = draft.state
        assert isinstance(state, HybridState)
        while not draft.done:
            match = state.index.lookup(draft.k - len(draft.proposal.tokens))
            if match is None:
                return True
            for token in match.tokens:
                draft.add(token, 1.0, None if draft.params.greedy else point_mass(token))
                if draft.done:
                    break
        return False
