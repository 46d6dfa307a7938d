"""Acceptance rules (docs/architecture.md): which draft tokens to keep, and the one token the target adds.

- temperature 0, delta 0: keep draft tokens while they equal the target's argmax.
- temperature > 0, delta 0: exact speculative sampling: keep d_j with probability
  min(1, p(d_j)/q(d_j)); on the first rejection emit a draw from norm(max(0, p - q)); if all
  are kept emit a bonus draw from p.
- delta in (0, 1]: the lenient rule: keep with probability min(1, p/q + delta). Lossy.

At temperature 0 p and q are one-hot, so p/q is 1 on a match and 0 otherwise; with delta 0
the uniforms never matter and greedy output equals the target's own. A ratio that is not a
finite number (a NaN p or q from a model that overflowed) is a rejection, never an acceptance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepOutcome:
    accepted: int  # draft tokens kept, a prefix of the block
    token: int  # the target's token after them: a correction, or the bonus if all were kept

    def emitted(self, draft_tokens: Sequence[int]) -> list[int]:
        return [*draft_tokens[: self.accepted], self.token]


def accept_greedy(
    draft_tokens: Sequence[int],
    target_argmax: Sequence[int],
    uniforms: Sequence[float] = (),
    delta: float = 0.0,
) -> StepOutcome:
    """Greedy acceptance; with delta > 0 a mismatch is still kept with probability delta."""
    for j, token in enumerate(draft_tokens):
        if token == target_argmax[j]:
            continue
        if delta > 0 and uniforms[j] < delta:
            continue
        return StepOutcome(j, target_argmax[j])
    return StepOutcome(len(draft_tokens), target_argmax[len(draft_tokens)])


def accept_sampled(
    draft_tokens: Sequence[int],
    draft_probs: Sequence[float],
    target_probs: Sequence[float],
    resampled: Sequence[int],
    uniforms: Sequence[float],
    delta: float = 0.0,
) -> StepOutcome:
    """Speculative sampling. ``resampled[j]`` is the target's residual draw at j (bonus at k)."""
    for j, _token in enumerate(draft_tokens):
        p, q = target_probs[j], draft_probs[j]
        ratio = p / q if q > 0 else 0.0
        if math.isfinite(p) and math.isfinite(q) and uniforms[j] < min(1.0, ratio + delta):
            continue
        return StepOutcome(j, resampled[j])
    return StepOutcome(len(draft_tokens), resampled[len(draft_tokens)])
