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

from dataclasses import dataclass

import numpy as np

from .checkpoint import LoadedModel
from .engine import DecoderState, ModelEngine
from .errors import InvalidArgument
from .ngram import NgramIndex, check_ngram_sizes, point_mass
from .sampling import DRAFT_STREAM, draw_draft, position_uniforms, probabilities
from .steps import Distribution, Proposal, SamplingParams


@dataclass
class HybridState(DecoderState):
    """A model session's decoder state plus the n-gram index of its prompt and output."""

    index: NgramIndex


class HybridEngine(ModelEngine):
    method = "hybrid"

    def __init__(self, loaded: LoadedModel, max_draft: int = 64, min_match: int = 3, ngram_max: int = 4):
        super().__init__(loaded, max_draft)
        if min_match > ngram_max:
            raise InvalidArgument(
                f"the hybrid draft's minimum match ({min_match}) must not exceed the longest n-gram "
                f"it indexes ({ngram_max}): raise --ngram-max or lower --hybrid-min-match"
            )
        check_ngram_sizes(min_match, ngram_max)
        self.min_match = min_match
        self.ngram_max = ngram_max

    def start(self, prompt_ids: list[int]) -> HybridState:
        state = super().start(prompt_ids)
        # Only matches of min_match or more are used, so shorter n-grams are not indexed.
        return HybridState(state.tokens, state.cache, NgramIndex(prompt_ids, self.min_match, self.ngram_max))

    def propose(self, state: HybridState, k: int, params: SamplingParams, seed: int) -> Proposal:
        self.check_k(k)
        state.index.sync(state.tokens[1:])
        # As ModelEngine: the model's draw for decoder index i uses the uniform keyed by i.
        draws = None if params.greedy else position_uniforms(seed, DRAFT_STREAM, len(state.tokens), k)
        first = len(state.tokens)
        proposal = Proposal(tokens=[], token_probs=[])
        eos = self.args.eos_token_id

        def add(token: int, prob: float, q: Distribution | None) -> None:
            proposal.tokens.append(token)
            proposal.token_probs.append(prob)
            if q is not None:
                proposal.distributions.append(q)
            state.tokens.append(token)
            state.index.extend([token])

        while len(proposal.tokens) < k and eos not in proposal.tokens:
            match = state.index.lookup(k - len(proposal.tokens))
            if match is not None:
                for token in match.tokens:
                    add(token, 1.0, None if params.greedy else point_mass(token))
                    if token == eos:
                        break
                continue
            logits = self.forward(state, 1)[0]  # feeds the n-gram tokens appended since its last pass
            if params.greedy:
                add(int(np.argmax(logits)), 1.0, None)
            else:
                token, prob, q = draw_draft(probabilities(logits[None], params)[0],
                                            float(draws[len(state.tokens) - first]))
                add(token, prob, Distribution.from_dense(q))
        return proposal
