"""Pipelined drafting: what the speculative loop does to let the draft draft the next block while
the target verifies this one (docs/architecture.md, "Pipelined drafting"). ``SpeculativeGeneration``
mixes it in; the serial step and failover stay in ``speculative.py``."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from specdec_core.steps import Proposal

from .acceptance import StepOutcome
from .k_policy import StepRecord

if TYPE_CHECKING:
    from .k_policy import KPolicy
    from .lanes import Lane
    from .params import GenerationParams, Stats

# Draft ahead only when the block drafted ahead has at least this chance of being used: else
# the draft's work (on a shared CPU or GPU, taken from the target) is mostly wasted.
MIN_HIT_CHANCE = 0.25


class DraftingAhead:
    """The block drafted ahead (``_ready``): whether to draft one, whether it was a hit, and
    taking it as the next step's block."""

    draft: Lane
    params: GenerationParams
    stats: Stats
    k_policy: KPolicy | None
    eos_id: int
    _ready: Proposal | None

    # the loop's own (SpeculativeGeneration): a call with failover, and auto k's cap
    _call: Callable[..., Awaitable[Any]]
    _auto_cap: Callable[[], int]

    def _predraft_size(self, k: int, drafted: list[int], remaining: int) -> int:
        """How many tokens to draft ahead while the target verifies ``drafted``: the guess of
        the target's token after a fully accepted block, then the k the next step would choose
        after it (0: do not draft ahead).

        That k comes from the same policy, told that this block was fully accepted (the only
        outcome in which the drafted-ahead block is used). For a seeded sampled request the
        policy is untimed, so this is exactly the k the next step chooses: the positions that
        are drafts, hence the tokens, do not depend on pipelining."""
        lane = self.draft
        if (not self.params.pipeline or lane.backend is None or k == 0 or len(drafted) < k
                or self.eos_id in drafted):
            return 0
        left = remaining - len(drafted) - 1  # tokens still to generate after a full acceptance
        if left <= 1 or self._hit_chance(k) < MIN_HIT_CHANCE:
            return 0
        if not self.params.timed_k and getattr(lane.backend, "draft_method", "model") not in ("", "model"):
            # An n-gram lookup (alone or in a hybrid) depends on where its Propose starts: the
            # tokens after the guess need not be what a Propose after the committed guess gives,
            # and a seeded request's tokens must not depend on pipelining.
            return 0
        if self.params.num_draft_auto and self.k_policy is not None:
            policy = self.k_policy.fork()  # told a full acceptance (untimed: its costs stay as they are)
            policy.observe(StepRecord(requested=k, accepted=k, drafted=k, timed=False))
            k_next = policy.choose(self._auto_cap())
        else:
            k_next = self.params.num_draft
        k_next = min(k_next, left - 1)
        # The Propose asks for the guess and k_next drafts, within the draft replica's --max-draft.
        # An untimed request must not take a block cut shorter than k_next: its Verify would
        # score fewer drafts than unpipelined, so its tokens would differ. A timed one may (its
        # k policy then stays within the block).
        if 0 < lane.max_draft < 1 + k_next:
            if not self.params.timed_k:
                return 0
            k_next = lane.max_draft - 1
        return 1 + k_next if k_next > 0 else 0

    def _hit_chance(self, k: int) -> float:
        """The chance that a block drafted ahead is used: every one of the k drafts accepted and
        the draft's guess of the target's next token right (taken as likely as one more draft)."""
        if self.k_policy is not None:
            rates = self.k_policy.acceptance.rates(k + 1)
        else:
            rate = self.stats.acceptance_rate if self.stats.proposed else 1.0
            rates = [rate] * (k + 1)
        return math.prod(rates)  # (numpy's prod of a short list costs 3 us; this, 0.08 us)

    async def _predraft(self, drafted: list[int], n: int, seed: int) -> Proposal | None:
        """Draft n tokens after the committed ones and ``drafted``, on the draft's session, while
        the target verifies (a replica failure fails over as any call does; the guess is lost)."""
        result = await self._call(self.draft, drafted, n, seed, ahead=True)
        if result is not None:
            self.stats.predrafts += 1
        return result

    def _keep_predraft(self, predrafted: Proposal | None, drafted: list[int], outcome: StepOutcome) -> None:
        """A block drafted ahead is the next block when every draft was accepted and the
        target's token after them is the one the draft guessed; otherwise it is wasted (the
        next call rolls the draft session back, like any rejected draft)."""
        if predrafted is None:
            return
        tokens = predrafted.tokens
        hit = (outcome.accepted == len(drafted) and bool(tokens) and tokens[0] == outcome.token
               and outcome.token != self.eos_id)
        if not hit:
            self.stats.wasted_draft_tokens += len(tokens)
            return
        self.stats.predraft_hits += 1
        self._ready = Proposal(tokens=tokens[1:], token_probs=list(predrafted.token_probs[1:]),
                               distributions=list(predrafted.distributions)[1:])

    def _ready_held(self) -> bool:
        """Is there a block drafted ahead, still held by the draft session after the committed tokens?"""
        ready = self._ready
        return ready is not None and self.draft.backend is not None and self.draft.holds(ready.tokens)

    def _ready_size(self) -> int:
        """Tokens of this step's block drafted ahead and still held by the draft session (0: none)."""
        return len(self._ready.tokens) if self._ready is not None and self._ready_held() else 0

    def _take_ready(self, k: int) -> Proposal | None:
        """This step's block if it was drafted ahead (at most k of it; what is cut is wasted)."""
        held = self._ready_held()
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        # (An untimed request's k is the k its block was drafted ahead for, never more:
        # ``_predraft_size`` drafts nothing ahead that it could not use whole.)
        if k == 0 or not held:
            self.stats.wasted_draft_tokens += len(ready.tokens)
            return None
        self.stats.wasted_draft_tokens += max(0, len(ready.tokens) - k)
        return Proposal(tokens=ready.tokens[:k], token_probs=ready.token_probs[:k],
                        distributions=list(ready.distributions)[:k])
