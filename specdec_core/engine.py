"""What draft and target do to one session, synchronously, on MLX.

A session's decoder state is the token list it has been given or has proposed
(``tokens[0]`` is the decoder start id) and a cache holding K/V for a prefix of it.
Every forward pass feeds the tokens past ``cache.length``; rolling back shortens both.
The engine trusts what it is given: ``SessionHost`` checks each request once, before it
changes a session (``worker_engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .cache_bytes import KV_GROUP_SIZE, CacheShape
from .checkpoint import LoadedModel
from .decoder_state import CHUNK, DecoderState
from .kv_cache import DecoderCache, KVQuantization
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
from .worker_engine import DraftJob, VerifyJob

DECODE_SLICE = CHUNK  # most new decoder positions fed in one call (see ModelEngine.forward)


class ModelEngine(RequestChecks):
    """One loaded model and the operations the services run on its sessions."""

    method = "model"  # how a draft built on it proposes (Info.draft_method)
    tensor_parallel = 1  # ranks sharing its passes (``rank_mirror.MirroredEngine``: more)

    def __init__(self, loaded: LoadedModel, max_draft: int = 64, kv_bits: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.args = loaded.args
        self.max_draft = max_draft
        # Every session's K/V in kv_bits (None: the model's dtype); the output is then this
        # model's with this cache, not the unquantized model's.
        self.kv_quantization = None if kv_bits is None else KVQuantization.for_heads(kv_bits, self.args.d_kv)
        self.forward_passes = 0

    @property
    def cache_cost(self) -> CacheShape:
        """What a session's cached positions cost (``cache_bytes``): the model's decoder shape, the
        dtype it computes in (its K/V's: float32 on a CPU whatever the weights) and the K/V bits."""
        kv = self.kv_quantization
        return CacheShape.of_model(self.args, self.loaded.activation_dtype, kv.bits if kv else None,
                                   kv.group_size if kv else KV_GROUP_SIZE)

    def start(self, prompt_ids: list[int]) -> DecoderState:
        """Encode the prompt once and build the session's cache (cross K/V included)."""
        return self._start_many([prompt_ids])[0]

    def start_batch(self, prompts: Sequence[list[int]]) -> list[DecoderState]:
        """Open many sessions: prompts of similar length share one padded encoder pass."""
        return self._start_many(prompts)

    def _start_many(self, prompts: Sequence[list[int]]) -> list[DecoderState]:
        states: dict[int, DecoderState] = {}
        for group in encode_groups([len(p) for p in prompts]):
            longest = max(len(prompts[i]) for i in group)
            ids = [prompts[i] + [self.args.pad_token_id] * (longest - len(prompts[i])) for i in group]
            mask = None
            if len(group) > 1:  # padded keys get no attention: each row is its prompt's own encoding
                mask = mx.array([[1] * len(prompts[i]) + [0] * (longest - len(prompts[i])) for i in group])
            encoded = self.model.encode(mx.array(ids, dtype=mx.int32), mask)
            for row, i in enumerate(group):
                cache = self.model.make_cache(encoded[row : row + 1, : len(prompts[i])], self.kv_quantization)
                states[i] = self._new_state(prompts[i], cache)
        return [states[i] for i in range(len(prompts))]

    def _new_state(self, prompt_ids: list[int], cache: DecoderCache) -> DecoderState:
        return DecoderState(tokens=[self.args.decoder_start_token_id], cache=cache)

    def forward(self, state: DecoderState, num_logits: int) -> np.ndarray:
        """One session's forward pass (``forward_batch`` of one)."""
        return self.forward_batch([state], [num_logits])[0]

    def forward_batch(self, states: Sequence[DecoderState], num_logits: Sequence[int]) -> list[np.ndarray]:
        """Feed every session's tokens past its cache in ONE decoder pass; return each session's
        float32 logits of its last ``num_logits`` positions."""
        feeds = [self._pending(state, wanted) for state, wanted in zip(states, num_logits, strict=True)]
        logits = self.model.decode_sessions(feeds, [state.cache for state in states], num_logits)
        mx.eval(logits)
        self.forward_passes += 1
        return [np.array(rows) for rows in logits]

    def _pending(self, state: DecoderState, num_logits: int) -> list[int]:
        """The session's tokens the next pass feeds (at least ``num_logits`` of them).

        If fewer tokens are pending than logits wanted, the cache is rolled back so the
        positions are recomputed (a caller may roll back to a length that is all cached).
        A long run of pending tokens (a failover resync appends a whole generation) is fed
        ``DECODE_SLICE`` at a time first, alone, so no decoder call builds attention scores
        and position biases bigger than DECODE_SLICE x length per head.
        """
        pending_needed = min(num_logits, len(state.tokens))
        if len(state.tokens) - state.cache.length < pending_needed:
            state.cache.rollback_to(len(state.tokens) - pending_needed)
        pending = state.tokens[state.cache.length :]
        while len(pending) > DECODE_SLICE and len(pending) - DECODE_SLICE >= num_logits:
            head, pending = pending[:DECODE_SLICE], pending[DECODE_SLICE:]
            self.model.decode_sessions([head], [state.cache], [0])
            mx.eval([layer.buffers for layer in state.cache.layers])
        return pending

    def propose(self, state: DecoderState, k: int, params: SamplingParams, seed: int) -> Proposal:
        """Draft up to k tokens after the state's tokens (fewer if EOS comes first)."""
        return self.propose_batch([(state, k, params, seed)])[0]

    def propose_batch(self, jobs: Sequence[DraftJob]) -> list[Proposal]:
        """Many sessions' Propose: each round, one batched single-token pass over the sessions
        still drafting; a session leaves the batch at its k or its EOS."""
        drafts = [self._drafting(*job) for job in jobs]
        while True:
            waiting = [d for d in drafts if not d.done and self._fill(d) and not d.done]
            if not waiting:
                return [d.proposal for d in drafts]
            rows = self.forward_batch([d.state for d in waiting], [1] * len(waiting))
            for draft, logits in zip(waiting, rows, strict=True):
                self._draw(draft, logits[0])

    def _drafting(self, state: DecoderState, k: int, params: SamplingParams, seed: int) -> Drafting:
        # The token at decoder index i is drawn with the uniform keyed by position i.
        draws = None if params.greedy else position_uniforms(seed, DRAFT_STREAM, len(state.tokens), k)
        return Drafting(state, k, params, draws, len(state.tokens), self.args.eos_token_id)

    def _fill(self, draft: Drafting) -> bool:
        """Add any tokens that need no model pass; True if the session still needs one."""
        return True

    def _draw(self, draft: Drafting, logits: np.ndarray) -> None:
        """The model's token for the draft's next position, from its logits."""
        if draft.params.greedy:
            draft.add(int(np.argmax(logits)), 1.0, None)
            return
        token, prob, q = draw_draft(probabilities(logits[None], draft.params)[0], draft.next_uniform())
        draft.add(token, prob, Distribution.from_dense(q))

    def verify(
        self,
        state: DecoderState,
        num_draft: int,
        params: SamplingParams,
        seed: int,
        draft_distributions: list[Distribution],
    ) -> Verdict:
        """Score the last ``num_draft`` tokens of the state in one decoder pass."""
        return self.verify_batch([(state, num_draft, params, seed, draft_distributions)])[0]

    def verify_batch(self, jobs: Sequence[VerifyJob]) -> list[Verdict]:
        """Many sessions' Verify in one decoder pass: each scores its own block of k+1."""
        rows = self.forward_batch([job[0] for job in jobs], [job[1] + 1 for job in jobs])
        return [self._verdict(*job, logits) for job, logits in zip(jobs, rows, strict=True)]

    def _verdict(self, state: DecoderState, num_draft: int, params: SamplingParams, seed: int,
                 draft_distributions: Sequence[Distribution], logits: np.ndarray) -> Verdict:
        """Acceptance inputs from one session's (k+1, V) logits."""
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


def encode_groups(lengths: Sequence[int], slack: float = 1.25, extra: int = 32) -> list[list[int]]:
    """Indices of prompts to encode together, similar lengths in one group: a group's padded
    size (members x longest) stays within ``slack`` x its real tokens + ``extra``."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups:
            group = groups[-1]
            real = sum(lengths[j] for j in group) + lengths[i]
            if (len(group) + 1) * lengths[i] <= slack * real + extra:
                group.append(i)
                continue
        groups.append([i])
    return groups



@dataclass
class Drafting:
    """One session's Propose while its batch drafts."""

    state: DecoderState
    k: int
    params: SamplingParams
    draws: np.ndarray | None  # the uniforms of positions first .. first + k - 1 (sampling)
    first: int  # the session's length when drafting began
    eos: int
    proposal: Proposal = field(default_factory=lambda: Proposal(tokens=[], token_probs=[]))

    @property
    def done(self) -> bool:
        tokens = self.proposal.tokens
        return len(tokens) >= self.k or (bool(tokens) and tokens[-1] == self.eos)

    def next_uniform(self) -> float:
        assert self.draws is not None
        return float(self.draws[len(self.state.tokens) - self.first])

    def add(self, token: int, prob: float, q: Distribution | None) -> None:
        self.proposal.tokens.append(token)
        self.proposal.token_probs.append(prob)
        if q is not None:
            self.proposal.distributions.append(q)
        self.state.append(token)
