"""num_draft=auto and drafting ahead, by one goodput rule (docs/architecture.md, "Choosing k").

Each step the planner takes the k in [0, cap] with the most expected tokens per unit of time,
E(k) / T(k), from the request's acceptance a and its replica pair's learned costs (``estimates.py``):

    E(k) = 1 + a + a^2 + ... + a^k
    T(k) = t(k) + (1 - h + h (s + (1 - s) / B)) u(k)
    t(k) = A / B_k + b (k + 1) + o / B    B_k = B / (1 + c k);  where B rounds to 1: f(k + 1) + o
    u(k) = [k > 0] (p / B + d k)          u = 0 for a block already drafted ahead (no Propose)

t is the step's share of the target's pass and of the waits around it (f(r): the pass of r rows as
measured, one above the line yielding to it as it ages, the line where r was not measured); u is its
Propose. B sessions share the target: at k = 0 they join one pass, but a drafting session's Verify
waits for its own Propose, so drafting splits them into cohorts of B_k (c learned; ~0.5 on the
T5-shaped pair under load). While the target serves the others (h, the measured share of a Propose
during which the target ran a pass; 0 at B = 1), a session whose draft has a processor of its own
(s = 0) pays 1/B of that part of u; where they share one (s = 1), all of it; the rest of u, all of it.

While the target verifies a block of k, the draft drafts 1 + n tokens ahead (its guess of the
target's next token, then n drafts), n in [1, k'] with k' the k the planner would choose after a
full acceptance (a seeded request: n = k' only), the n with the most

    V(n) = a^(k+1) (T(n) - T_ready(n)) - s u(n + 1) - max(0, u(n + 1) - t(k)) / B

if that is > 0 (T_ready: T with u = 0): the Propose it saves times its hit chance (every draft kept
and the guess right, taken as likely as one more draft), less the draft's time taken from the
target and the wait for a draft ahead that outlasts the Verify (the step waits for both). Where s
decides it (it would pay at s = 0, not at s = 1), every PROBE_GAP_MAX-th such step on the pair does
the other: s is learned from passes with and without drafting beside them, and one that stopped
drafting ahead would otherwise never be measured again.

A seeded request with a random output must not follow timing: its k comes from its own acceptance
and SEEDED_COSTS alone (it ignores blocks drafted ahead and load); whether it drafts ahead, which
never changes its tokens, is decided like anyone's. At k = 0 nothing is learned about acceptance,
so after PROBE_GAP_MIN x B steps (a probe's Verify runs a pass of its own, which B steps would have
shared) the planner drafts once; each probe doubles the gap, up to PROBE_GAP_MAX (x B), but one
accepted while a was below a fresh request's belief (PRIOR_KEPT) probes again at the next step that
would be at k = 0, so a draft that starts to agree is soon back. No MLX, no I/O.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from .estimates import PRIOR_KEPT, SEEDED_COSTS, Acceptance, Costs, Learned, PairCosts, StepRecord

PROBE_GAP_MIN = 4  # steps at k = 0 before a probe: a good draft unlucky 2-3 times is back soon
PROBE_GAP_MAX = 64  # a draft that is always wrong costs one probe in 64 steps (<1%)


def target_time(costs: Costs, k: int) -> float:
    if k < len(costs.passes):
        return costs.passes[k] + costs.wait
    return (costs.fixed * (1 + costs.split * k) + costs.wait) / costs.batch + costs.per_row * (k + 1)


def draft_time(costs: Costs, k: int) -> float:
    return costs.propose / costs.batch + costs.per_draft * k if k > 0 else 0.0


def step_time(costs: Costs, k: int, drafting: bool = True) -> float:
    """T(k); ``drafting`` False: T_ready(k), the block was drafted ahead."""
    u = draft_time(costs, k) if drafting else 0.0
    beside = costs.share + (1 - costs.share) / costs.batch  # of a Propose while the target serves others
    return target_time(costs, k) + (1 - costs.hidden + costs.hidden * beside) * u


def best_k(rate: float, costs: Costs, low: int, high: int, drafting: bool = True) -> int:
    """The k in [low, high] with the largest E(k) / T(k); the smallest such k on a tie."""
    best, best_value, tokens, reach = low, -1.0, 1.0, 1.0
    for k in range(high + 1):
        if k > 0:
            reach *= rate
            tokens += reach
        if k >= low and (value := tokens / step_time(costs, k, drafting)) > best_value * (1 + 1e-12):
            best, best_value = k, value
    return best


class Planner:
    """One request's planner. ``pair``: its replica pair's costs (every planner feeds them; only a
    timed one chooses k by them). Each step: ``choose``, maybe ``ahead``, then ``observe``."""

    def __init__(self, timed: bool, pair: PairCosts | None = None, learned: Learned | None = None):
        self.timed = timed
        self.pair = pair if pair is not None else PairCosts()
        start = learned if timed else None  # a seeded request knows itself only
        self.acceptance = copy.copy(start.acceptance) if start else Acceptance()
        self.gap = start.gap if start else PROBE_GAP_MIN  # steps at k = 0 before the next probe
        self.idle = start.idle if start else 0  # steps at k = 0 since the last drafting step
        self.probing = False  # the step just chosen is a probe
        self.surprised = False  # a probe was accepted against the odds: probe again at the next k = 0
        self.probe_odds = 0.0  # the acceptance estimate when it was chosen
        self.unsettled: StepRecord | None = None  # the last step, its pass not yet fitted

    def costs(self, sharing: int = 1) -> Costs:
        """What the choice of k weighs: the pair's costs, or a seeded request's fixed ones."""
        return self.pair.costs(sharing) if self.timed else SEEDED_COSTS

    def choose(self, cap: int, ready: int = 0, sharing: int = 1) -> int:
        """This step's k in [0, cap]; ``ready``: tokens of its block already drafted ahead (a timed
        planner then stays within them, at no Propose cost); ``sharing``: sessions on the target
        replica that could share a pass. A seeded request's planner ignores both."""
        self.probing = False
        if cap <= 0:
            return 0
        costs, high, rate = self.costs(sharing), cap, self.acceptance.rate
        drafting = not (self.timed and ready > 0)
        if not drafting:
            high = min(ready, cap)
        if (k := best_k(rate, costs, 0, high, drafting)) > 0:
            self.idle, self.gap = 0, PROBE_GAP_MIN
            return k
        self.idle += 1
        if self.idle <= self.gap * round(costs.batch) and not self.surprised:
            return 0
        self.idle, self.probing, self.probe_odds, self.surprised = 0, True, rate, False
        return best_k(rate, costs, 1, high, drafting)

    def next_k(self, k: int, cap: int, sharing: int = 1) -> int:
        """The k the next step would choose if this step's k drafts were all kept (for a seeded
        request exactly the k it will choose then, since nothing else moves it)."""
        told = copy.copy(self)
        told.acceptance, told.unsettled = copy.copy(self.acceptance), None
        told.observe(StepRecord(requested=k, accepted=k, drafted=k, timed=False))
        return told.choose(cap, sharing=sharing)

    def ahead(self, k: int, k_next: int, sharing: int = 1) -> int:
        """How many drafts, at most k_next, to draft ahead after the guess while the target verifies a
        block of k (0: none); a seeded request's all of k_next or none (its next step takes k_next)."""
        costs, hit = self.pair.costs(sharing), self.acceptance.rate ** (k + 1)
        sizes = range(1, k_next + 1) if self.timed else [k_next]

        def best(costs: Costs) -> int:
            def worth(n: int) -> float:
                saved, drafting = step_time(costs, n) - step_time(costs, n, drafting=False), draft_time(costs, n + 1)
                return hit * saved - costs.share * drafting - max(0.0, drafting - target_time(costs, k)) / costs.batch

            n = max(sizes, key=worth, default=0)
            return n if n > 0 and worth(n) > 0 else 0

        n, apart = best(costs), best(replace(costs, share=0.0))
        if bool(apart) == bool(best(replace(costs, share=1.0))):
            return n
        # s decides, and s is learned only from passes with and without drafting beside them: every
        # PROBE_GAP_MAX such steps on the pair one does the other, or an s learned in a burst would stand.
        self.pair.s_decided = (self.pair.s_decided + 1) % PROBE_GAP_MAX
        return n if self.pair.s_decided else (0 if n else apart)

    def observe(self, step: StepRecord) -> None:
        if step.requested > 0:
            self.acceptance.observe(step.requested, step.accepted)
            if self.probing and step.accepted > 0 and self.probe_odds < PRIOR_KEPT:
                self.surprised = True  # probe again next step, at any B (the gap stays)
            elif self.probing:
                self.gap = min(PROBE_GAP_MAX, 2 * self.gap)
        self.settle()
        self.pair.observe(step)
        self.unsettled = step if step.timed else None

    def settle(self) -> None:
        """Fit the last step's pass: a step later, the draft passes that ran beside it have reported."""
        if self.unsettled is not None:
            self.pair.observe_pass(self.unsettled)
            self.unsettled = None

    def observe_loop(self, seconds: float) -> None:
        """The loop's own time for a step, outside the Propose and Verify calls."""
        self.pair.loop.add(max(0.0, seconds))

    def learned(self) -> Learned:
        self.settle()
        return Learned(copy.copy(self.acceptance), self.gap, self.idle)
