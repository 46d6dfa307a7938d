"""The plain domain types of one speculative step: what a Propose or Verify asks and answers.

One request type travels from the orchestrator's loop through a backend (gRPC or in-process),
the servicer and ``SessionHost``; one result type per step kind comes back. This module has
no MLX and no import side effects, so the orchestrator process imports it without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidArgument

MAX_TOP_K = 1_000_000


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1 means no nucleus filter

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> SamplingParams:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        return self


@dataclass
class Distribution:
    """A probability distribution over the vocabulary, kept to its support."""

    token_ids: np.ndarray  # (n,) int32; empty when dense
    probs: np.ndarray  # (n,) or (V,) weights; a draft's are float16 (``sampling.wire_q``)

    @classmethod
    def from_dense(cls, probs: np.ndarray) -> Distribution:
        support = np.flatnonzero(probs > 0)
        if len(support) * 3 < len(probs):  # sparse pays off when ids (4B) + probs (2B) < 2B * V
            return cls(support.astype(np.int32), probs[support])
        return cls(np.zeros(0, np.int32), probs)

    def check(self, vocab_size: int) -> None:
        """Refuse what ``to_dense`` or a draw could not use (InvalidArgument): a worker checks every
        distribution of a Verify once, before the step changes its session (``check_verify``)."""
        if len(self.token_ids) == 0:
            if len(self.probs) != vocab_size:
                raise InvalidArgument(
                    f"a dense draft distribution needs {vocab_size} probabilities, got {len(self.probs)}"
                )
        else:
            if len(self.token_ids) != len(self.probs):
                raise InvalidArgument(
                    f"a draft distribution needs one probability per token id, got {len(self.token_ids)} ids "
                    f"and {len(self.probs)} probabilities"
                )
            if len(self.token_ids) > vocab_size:
                raise InvalidArgument(f"a draft distribution has more entries than the vocabulary ({vocab_size})")
            if self.token_ids.min() < 0 or self.token_ids.max() >= vocab_size:
                raise InvalidArgument(
                    f"a draft distribution names a token id outside the vocabulary [0, {vocab_size})"
                )
        probs = np.asarray(self.probs, np.float32)
        if not np.all(np.isfinite(probs)) or np.any(probs < 0):
            raise InvalidArgument("a draft distribution holds negative or non-finite probabilities")
        if not probs.sum() > 0:
            raise InvalidArgument("a draft distribution has no probability mass (all weights are zero)")

    def to_dense(self, vocab_size: int) -> np.ndarray:
        """The weights over the whole vocabulary (of a distribution that passed ``check``)."""
        if len(self.token_ids) == 0:
            return self.probs.astype(np.float32)
        dense = np.zeros(vocab_size, np.float32)
        dense[self.token_ids] = self.probs
        return dense


@dataclass
class StepRequest:
    """One Propose or Verify on one session (the proto's ProposeRequest/VerifyRequest).

    The session first rolls back to ``rollback_to`` (0: no rollback) and appends
    ``append_tokens``; then a draft proposes up to ``num_draft`` tokens, or a target scores
    the last ``num_draft`` appended tokens as drafts.
    """

    session_id: str
    expected_length: int  # the session's length the caller believes in (ABORTED otherwise)
    rollback_to: int
    append_tokens: list[int]
    num_draft: int
    sampling: SamplingParams
    seed: int
    draft_distributions: Sequence[Distribution] = ()  # Verify with sampling: the draft's q per draft token
    deadline: float | None = None  # time.monotonic() clock; None: no deadline


@dataclass
class Proposal:
    """A draft's answer: up to k tokens (fewer if EOS came first) and what acceptance needs."""

    tokens: list[int]
    token_probs: list[float]  # q(d_i) after the sampling transforms; 1.0 when greedy
    distributions: list[Distribution] = field(default_factory=list)  # q per token (sampling only)
    length: int = 0  # the session's length afterwards
    wire_bytes: int = 0  # request + response bytes, when it crossed the wire
    model_ms: float = 0.0  # the worker's model time for this step (its whole batch's)
    batch_size: int = 1  # steps in that batch
    timed: bool = True  # False: the reported timing was impossible and dropped (orchestrator.lanes)

    @property
    def added_tokens(self) -> list[int]:
        """What the call added to the session after the tokens it appended: the drafts."""
        return self.tokens


@dataclass
class Verdict:
    """A target's answer for a block of k draft tokens (k+1 positions)."""

    argmax: list[int]  # the target's greedy choice at each of the k+1 positions
    draft_probs: list[float]  # p(d_j) for each draft token (sampling only)
    # Sampling only: at j < k a draw from norm(max(0, p_j - q_j)), at j = k a draw from p_k.
    resampled: list[int]
    length: int = 0  # the session's length afterwards
    wire_bytes: int = 0
    model_ms: float = 0.0  # the worker's model time for this step (its whole batch's)
    batch_size: int = 1  # steps in that batch
    batch_rows: int = 0  # positions the batch's pass scored (sum of k+1; 0: not reported)
    timed: bool = True  # False: the reported timing was impossible and dropped (orchestrator.lanes)

    @property
    def added_tokens(self) -> list[int]:
        """What the call added to the session after the tokens it appended: nothing (it scores them)."""
        return []
