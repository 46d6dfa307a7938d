"""Pipelined drafting, beside the serial loop: while the target verifies a block, the draft drafts
the next one as if this one were fully accepted (docs/architecture.md, "Pipelined drafting").

``DraftAhead`` is the whole of it: one per request, holding the block drafted ahead and the first
step's k (chosen while the target's session opened). The loop asks it four things: how much to
draft ahead now (``size``; whether and how much pays is the planner's rule), whether what came back is the next block (``keep``), how much of it
the draft session still holds (``held``), and to hand it over as a step's block (``take``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specdec_core.steps import Proposal

from .acceptance import StepOutcome

if TYPE_CHECKING:
    from .lanes import Lane
    from .params import GenerationParams, Stats
    from .planner import Planner


class DraftAhead:
    """One request's pipelining state: ``ready``, the next step's block if it was drafted ahead
    (the draft session holds the committed tokens, then it); ``first_k``, the first step's k."""

    def __init__(self, params: GenerationParams, eos_id: int, stats: Stats):
        self.params = params
        self.eos_id = eos_id
        self.stats = stats
        self.ready: Proposal | None = None
        self.first_k: int | None = None

    def size(self, lane: Lane, planner: Planner | None, cap: int, k: int, drafted: list[int],
             remaining: int, sharing: int = 1) -> int:
        """How many tokens to draft ahead while the target verifies ``drafted`` (a step of k): the
        guess of the target's token after a fully accepted block, then up to the k the next step
        would choose after it; 0: do not draft ahead. Whether and how much pays is the planner's
        call (``Planner.ahead``); what fits and what keeps a seeded request's tokens is decided here.

        For a seeded sampled request the planner is untimed, so the k it would choose after a full
        acceptance is exactly the k the next step chooses: which positions are drafts, hence the
        tokens, do not depend on pipelining."""
        left = remaining - len(drafted) - 1  # tokens still to generate after a full acceptance
        possible = (self.params.pipeline and planner is not None and lane.backend is not None and k > 0
                    and len(drafted) == k and self.eos_id not in drafted and left > 1)
        # An n-gram lookup (alone or in a hybrid) depends on where its Propose starts, and a seeded
        # request's tokens must not depend on pipelining: only a model draft drafts ahead for one.
        reproducible = self.params.timed_k or (lane.backend is not None and lane.backend.draft_method in ("", "model"))
        if not (possible and reproducible) or planner is None:
            return 0
        k_next = planner.next_k(k, cap, sharing) if self.params.num_draft_auto else self.params.num_draft
        k_next = min(k_next, left - 1)
        # The Propose asks for the guess and k_next drafts, within the draft replica's --max-draft.
        # A seeded request must not take a block cut shorter than k_next (its Verify would score
        # fewer drafts than unpipelined, so its tokens would differ); a timed one may.
        if 0 < lane.max_draft < 1 + k_next:
            if not self.params.timed_k:
                return 0
            k_next = lane.max_draft - 1
        n = planner.ahead(k, k_next, sharing) if k_next > 0 else 0
        return 1 + n if n > 0 else 0

    def keep(self, predrafted: Proposal | None, drafted: list[int], outcome: StepOutcome) -> None:
        """A block drafted ahead is the next block when every draft was accepted and the
        target's token after them is the one the draft guessed; otherwise it is wasted (the
        next call rolls the draft session back, like any rejected draft)."""
        if predrafted is None:
            return
        self.stats.predrafts += 1
        tokens = predrafted.tokens
        hit = (outcome.accepted == len(drafted) and bool(tokens) and tokens[0] == outcome.token
               and outcome.token != self.eos_id)
        if not hit:
            self.stats.wasted_draft_tokens += len(tokens)
            return
        self.stats.predraft_hits += 1
        self.ready = Proposal(tokens=tokens[1:], token_probs=list(predrafted.token_probs[1:]),
                              distributions=list(predrafted.distributions)[1:])

    def held(self, lane: Lane) -> int:
        """Tokens of the next block drafted ahead that the draft session still holds (0: none)."""
        return len(self.ready.tokens) if self.ready is not None and self._holds(lane) else 0

    def _holds(self, lane: Lane) -> bool:
        return self.ready is not None and lane.backend is not None and lane.holds(self.ready.tokens)

    def take(self, lane: Lane, k: int) -> Proposal | None:
        """This step's block if it was drafted ahead (at most k of it; what is cut is wasted)."""
        held = self._holds(lane)
        ready, self.ready = self.ready, None
        if ready is None:
            return None
        # (A seeded request's k is the k its block was drafted ahead for, never more: ``size``
        # drafts nothing ahead that it could not use whole.)
        if k == 0 or not held:
            self.stats.wasted_draft_tokens += len(ready.tokens)
            return None
        self.stats.wasted_draft_tokens += max(0, len(ready.tokens) - k)
        return Proposal(tokens=ready.tokens[:k], token_probs=ready.token_probs[:k],
                        distributions=list(ready.distributions)[:k])
