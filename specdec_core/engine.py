"""What draft and target do to one session, synchronously, on MLX.

A session's decoder state is the token list it has been given or has proposed
(``tokens[0]`` is the decoder start id) and a cache holding K/V for a prefix of it.
Every forward pass feeds the tokens past ``cache.length``; rolling back shortens both.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .checkpoint import LoadedModel
from .decoder_state import CHUNK, DecoderState
from .errors import InvalidArgument
from .request_checks import RequestChecks
from .sampling import (
    DRAFT_STREAM,
    TARGET_STREAM,
    draw_draft,
    draw_residual,
    position_uniforms,
    probabilities,
    sample,
)
from .steps import Distribution, Proposal, SamplingParams, Verdict

DECODE_SLICE = CHUNK  # most new decoder positions fed in one call (see ModelEngine.forward)


class ModelEngine(RequestChecks):
    """One loaded model and the operations the services run on its sessions."""

    method = "model"  # how a draft built on it proposes (Info.draft_method)

    def __init__(self, loaded: LoadedModel, max_draft: int = 64):
        self.loaded = loaded
        self.model = loaded.model
        self.args = loaded.args
        self.max_draft = max_draft
        self.forward_passes = 0

    def start(self, prompt_ids: list[int]) -> DecoderState:
        """Encode the prompt once and build the session's cache (cross K/V included)."""
        self.check_prompt(prompt_ids)
        encoder_output = self.model.encode(mx.array([prompt_ids], dtype=mx.int32))
        cache = self.model.make_cache(encoder_output)
        return DecoderState(tokens=[self.args.decoder_start_token_id], cache=cache)

    def forward(self, state: DecoderState, num_logits: int) -> np.ndarray:
        """Feed every token past the cache; return float32 logits of the last ``num_logits``.

        If fewer tokens are pending than logits wanted, the cache is rolled back so the
        positions are recomputed (a caller may roll back to a length that is all cached).
        A long run of pending tokens (a failover resync appends a whole generation) is fed
        ``DECODE_SLICE`` at a time, so no decoder call builds attention scores and position
        biases bigger than DECODE_SLICE x length per head.
        """
        pending_needed = min(num_logits, len(state.tokens))
        if len(state.tokens) - state.cache.length < pending_needed:
            state.cache.rollback_to(len(state.tokens) - pending_needed)
        pending = state.tokens[state.cache.length :]
        while len(pending) > DECODE_SLICE and len(pending) - DECODE_SLICE >= num_logits:
            head, pending = pending[:DECODE_SLICE], pending[DECODE_SLICE:]
            self.model.decode(mx.array([head], dtype=mx.int32), cache=state.cache, num_logits=0)
            mx.eval([array for layer in state.cache.layers for array in (layer.keys, layer.values)])
        logits = self.model.decode(
            mx.array([pending], dtype=mx.int32), cache=state.cache, num_logits=num_logits
        )
        mx.eval(logits)
        self.forward_passes += 1
        return np.array(logits[0])

    def propose(
        self, state: DecoderState, k: int, params: SamplingParams, seed: int
    ) -> Proposal:
        """Draft up to k tokens after the state's tokens (fewer if EOS comes first)."""
        self.check_k(k)
        # The token at decoder index i is drawn with the uniform keyed by position i.
        draws = None if params.greedy else position_uniforms(seed, DRAFT_STREAM, len(state.tokens), k)
        proposal = Proposal(tokens=[], token_probs=[])
        for i in range(k):
            logits = self.forward(state, 1)[0]
            if params.greedy:
                token, prob = int(np.argmax(logits)), 1.0
            else:
                token, prob, q = draw_draft(probabilities(logits[None], params)[0], float(draws[i]))
                proposal.distributions.append(Distribution.from_dense(q))
            proposal.tokens.append(token)
            proposal.token_probs.append(prob)
            state.tokens.append(token)
            if token == self.args.eos_token_id:
                break
        return proposal

    def verify(
        self,
        state: DecoderState,
        num_draft: int,
        params: SamplingParams,
        seed: int,
        draft_distributions: list[Distribution],
    ) -> Verdict:
        """Score the last ``num_draft`` tokens of the state in one decoder pass."""
        if not 0 <= num_draft < len(state.tokens):
            raise InvalidArgument(
                f"num_draft must be in [0, {len(state.tokens) - 1}] for this session, got {num_draft}"
            )
        if num_draft > self.max_draft:
            raise InvalidArgument(f"num_draft {num_draft} exceeds this service's limit {self.max_draft}")
        if not params.greedy and len(draft_distributions) != num_draft:  # checked before the pass
            raise InvalidArgument(
                f"sampling needs the draft's distribution for each of the {num_draft} draft "
                f"tokens, got {len(draft_distributions)}"
            )
        logits = self.forward(state, num_draft + 1)  # (k+1, V)
        draft = state.tokens[len(state.tokens) - num_draft :] if num_draft else []
        verdict = Verdict(argmax=[int(i) for i in np.argmax(logits, axis=-1)], draft_probs=[], resampled=[])
        if params.greedy:
            return verdict
        p = probabilities(logits, params)
        # Draws keyed by the decoder index of the token each one samples (the drafts' and the bonus's).
        draws = position_uniforms(seed, TARGET_STREAM, len(state.tokens) - num_draft, num_draft + 1)
        for j, token in enumerate(draft):
            q = draft_distributions[j].to_dense(self.vocab_size)
            verdict.draft_probs.append(float(p[j, token]))
            verdict.resampled.append(draw_residual(p[j], q, float(draws[j])))
        verdict.resampled.append(sample(p[num_draft], float(draws[num_draft])))
        return verdict
