"""``num_draft=auto``: each step drafts the k that maximises expected tokens per unit of batch time.

With one acceptance rate a (the chance that a draft is kept, given every one before it was),
a step with k drafts emits on average E(k) = 1 + a + ... + a^k tokens (the target's correction
or bonus is always one), and costs its share of the passes it joins (``StepCosts``):

    T(k) = (A + o + [k > 0] p) / B  +  b (k + 1)  +  [k > 0] d k

- A + b rows: a target pass over that many rows (positions scored, summed over its batch),
  fitted by decayed least squares to each Verify's worker model time and its batch's rows
  (``PassLine``). The step's k + 1 rows cost b each; the pass's fixed part A is shared by the
  B steps in the batch (B: a decayed mean of the Verifies' batch sizes).
- o: a step's time outside the target's model time (wire, waiting, the loop's own work); p:
  a Propose call's (paid when k > 0 and the block was not drafted ahead). Shared like A.
- d: the draft's model time per drafted token, divided by its Propose batch's size.

At one client (B = 1) T(k) is the request's own time per step; under load the fixed parts
spread over the batch and a row's cost does not, so k falls as the batch grows (the goodput
choice of SmartSpec). Costs are learned per (draft replica, target replica) and shared by every
request there (``KMemory.costs``); acceptance is per request, started from the last request's.

**Seeded requests.** A sampled (or delta > 0) request with a caller's seed must get the same
tokens whatever the timing, and k decides which positions are drafts. Its policy is untimed:
k follows only its own acceptance history, with the fixed ``SEEDED_COSTS`` and no memory; it
also ignores a block drafted ahead, so pipelining can ask ``fork()`` for the next step's k.

**Probing.** At k = 0 nothing is learned about acceptance, so after ``gap`` steps at 0 the
policy drafts once (a probe). A probe doubles the gap (up to PROBE_GAP_MAX), except one that
was accepted against the odds (``SURPRISE``): then it probes again next step, so a draft that
starts to agree is soon back.

``choose`` once per step, then ``observe``. No MLX, no I/O.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TypeVar

Entry = TypeVar("Entry")

# Acceptance: each tried draft's count decays by this (about the last 30 count: fewer made the
# estimate noisy enough to dip below what drafting needs and stop it, on the toy pairs).
ACCEPT_DECAY = 0.97
PRIOR_ACCEPTANCE = 0.5  # a fresh request's belief, worth PRIOR_WEIGHT tried drafts: a coin,
PRIOR_WEIGHT = 1.0  # held lightly (one rejection takes it to 0.25, where drafting rarely pays)
# An earlier request's acceptance counts as at most this many drafts in a new one (its prompt
# differs; its first steps should still trust it).
MEMORY_WEIGHT = 20.0
# Costs: each sample decays by this (the last ~50 steps on the replica pair: ~50 steps of one
# request, ~3 batches at 16 clients).
COST_DECAY = 0.98
# A row's cost, until the rows vary enough to measure it: this share of a one-row pass (issue
# 24's T5-large shape measured ~0.06, this repository's CPU toy pairs ~0.2), as a prior worth
# SLOPE_PRIOR_WEIGHT samples per unit of row variance (rows varying by one outweigh it 20:1).
SLOPE_PRIOR = 0.1
SLOPE_PRIOR_WEIGHT = 0.05
PROBE_GAP_MIN = 4  # steps at k = 0 before the first probe: 2-3 rejections of a good draft cost little
PROBE_GAP_MAX = 64  # a draft that is always wrong costs one probe in 64 steps (~0.5% at d = 0.15)
# A probe accepted against these odds is a surprise (the text may have turned to something the
# draft knows): probe again at once. An expected one (a good draft that does not pay, as in a big
# batch) waits twice as long, like a rejected one: else half of such steps would be probes.
SURPRISE = 0.5


@dataclass(frozen=True)
class StepCosts:
    """A step's cost as a function of k, in any one unit (see the module docstring)."""

    fixed: float  # (A + o) / B: paid by every step
    per_row: float  # b: per position of the verified block (k + 1 of them)
    propose: float  # p / B: a Propose call's fixed part, paid when k > 0
    per_draft: float  # d: per drafted token

    def time(self, k: int) -> float:
        return self.fixed + self.per_row * (k + 1) + (self.propose + self.per_draft * k if k > 0 else 0.0)

    def drafted_ahead(self) -> StepCosts:
        """A step whose block is already drafted: no Propose to pay."""
        return dataclasses.replace(self, propose=0.0, per_draft=0.0)


# A seeded request's costs, in units of a target-alone step (time(0) == 1): a verified row 0.1,
# a Propose call 0.15, a drafted token 0.2. On this repository's CPU pairs a sampled step with one
# draft costs ~1.5 target steps (draft/target 0.13-0.33, plus sampling's work), so drafting pays
# from an acceptance of ~0.45: it never loses there; on an accelerator it drafts a little less
# than a measured policy would.
SEEDED_COSTS = StepCosts(fixed=0.9, per_row=0.1, propose=0.15, per_draft=0.2)


def best_k(rate: float, costs: StepCosts, low: int, high: int) -> int:
    """The k in [low, high] with the largest E(k) / T(k); the smallest such k on a tie."""
    best, best_value, total, reach = low, -1.0, 1.0, 1.0
    for k in range(high + 1):
        if k > 0:
            reach *= rate
            total += reach
        if k >= low and (value := total / costs.time(k)) > best_value * (1 + 1e-12):
            best, best_value = k, value
    return best


class Ewma:
    """An exponentially weighted mean (``weight``: its decayed count of samples)."""

    def __init__(self) -> None:
        self.weight = self.value = 0.0

    def add(self, sample: float) -> None:
        self.weight = COST_DECAY * self.weight + 1.0
        self.value += (sample - self.value) / self.weight


class PassLine:
    """A pass's time ~ A + b rows, by decayed least squares with b pulled toward SLOPE_PRIOR x
    (A + b) at the mean point; A >= 0, b >= 0."""

    def __init__(self) -> None:
        self.n = self.sx = self.sxx = self.sy = self.sxy = 0.0

    def add(self, rows: float, seconds: float) -> None:
        d = COST_DECAY
        self.n, self.sx, self.sxx = d * self.n + 1, d * self.sx + rows, d * self.sxx + rows * rows
        self.sy, self.sxy = d * self.sy + seconds, d * self.sxy + rows * seconds

    def fit(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 0.0
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        ridge = SLOPE_PRIOR_WEIGHT * self.n
        covariance, spread = self.sxy - self.sx * mean_y, self.sxx - self.sx * mean_x
        prior = mean_y / ((1 - SLOPE_PRIOR) / SLOPE_PRIOR + mean_x)  # b = SLOPE_PRIOR (A + b)
        slope = max(0.0, (covariance + ridge * prior) / (spread + ridge))
        if (intercept := mean_y - slope * mean_x) < 0:  # all of it per row
            return 0.0, mean_y / mean_x
        return intercept, slope


@dataclass(frozen=True)
class StepRecord:
    """What the loop knows after one step (times in seconds)."""

    requested: int  # drafts asked for (0: no Propose call)
    accepted: int  # drafts kept
    drafted: int = 0  # drafts proposed (an n-gram draft may propose fewer than asked)
    timed: bool = True  # False: a failover or a reopened session ran inside; times mean nothing
    propose_s: float = 0.0  # the Propose call's wall time
    propose_model_s: float = 0.0  # the draft worker's model time in it (its batch's)
    propose_batch: int = 1  # steps in that Propose batch
    caught_up: int = 0  # committed tokens the draft appended first (1 after a drafting step)
    verify_s: float = 0.0  # the Verify call's wall time
    verify_model_s: float = 0.0  # the target worker's model time in it (its batch's pass)
    verify_batch: int = 1  # steps in that pass
    verify_rows: int = 0  # rows in that pass (0: not reported; this step's drafted + 1)
    drafted_ahead: bool = False  # the block was drafted ahead: no Propose in this step
    ahead_drafted: int = 0  # tokens drafted ahead during this step's Verify (0: none)
    ahead_model_s: float = 0.0  # the draft worker's model time for them
    ahead_batch: int = 1


@dataclass
class ReplicaCosts:
    """What a (draft, target) replica pair's steps cost, from what its workers measure."""

    verify: PassLine = field(default_factory=PassLine)  # target model time vs the batch's rows
    batch: Ewma = field(default_factory=Ewma)  # B: steps per Verify batch
    verify_wait: Ewma = field(default_factory=Ewma)  # Verify wall time less its model time
    loop: Ewma = field(default_factory=Ewma)  # the loop's own time per step, outside both calls
    propose_wait: Ewma = field(default_factory=Ewma)  # Propose wall time less its model time
    draft_token: Ewma = field(default_factory=Ewma)  # d: draft model time per drafted token / batch

    def observe(self, step: StepRecord) -> None:
        if not step.timed:
            return
        self.verify.add(step.verify_rows or step.drafted + 1, step.verify_model_s)
        self.batch.add(step.verify_batch)
        self.verify_wait.add(max(0.0, step.verify_s - step.verify_model_s))
        # A Propose after steps at k = 0 first caught the draft up: its times are not a draft's.
        if step.requested > 0 and step.caught_up <= 1 and not step.drafted_ahead:
            self.propose_wait.add(max(0.0, step.propose_s - step.propose_model_s))
            self.observe_ahead(step.drafted, step.propose_model_s, step.propose_batch)
        self.observe_ahead(step.ahead_drafted, step.ahead_model_s, step.ahead_batch)

    def observe_ahead(self, drafted: int, model_s: float, batch: int = 1) -> None:
        """A Propose's model time (one drafted ahead overlaps a Verify: its wall time is no sample)."""
        if drafted > 0:
            self.draft_token.add(model_s / drafted / max(1, batch))

    def step_costs(self) -> StepCosts | None:
        """None until a Verify was measured."""
        intercept, per_row = self.verify.fit()
        batch = max(1.0, self.batch.value)
        fixed = (intercept + self.verify_wait.value + self.loop.value) / batch
        if self.verify.n == 0 or fixed + per_row <= 0:
            return None
        # Until a Propose was measured: SEEDED_COSTS' shares of a measured target-alone step.
        unit = fixed + per_row
        propose = self.propose_wait.value / batch if self.propose_wait.weight else SEEDED_COSTS.propose * unit
        per_draft = self.draft_token.value if self.draft_token.weight else SEEDED_COSTS.per_draft * unit
        return StepCosts(fixed, per_row, propose, per_draft)


@dataclass
class Acceptance:
    """Decayed counts of tried and kept drafts; the rate is shrunk toward PRIOR_ACCEPTANCE."""

    tried: float = 0.0
    kept: float = 0.0

    @property
    def rate(self) -> float:
        return (self.kept + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (self.tried + PRIOR_WEIGHT)

    def rates(self, n: int) -> list[float]:
        """a_1..a_n (one rate for every position)."""
        return [self.rate] * n

    def observe(self, requested: int, accepted: int) -> None:
        """Drafts 1..accepted were kept; draft accepted+1, if asked for, was not."""
        for i in range(min(requested, accepted + 1)):
            self.tried, self.kept = ACCEPT_DECAY * self.tried + 1, ACCEPT_DECAY * self.kept + (i < accepted)

    def handed_on(self) -> Acceptance:
        """A copy for a new request: the same rate, from at most MEMORY_WEIGHT drafts."""
        factor = min(1.0, MEMORY_WEIGHT / self.tried) if self.tried else 1.0
        return Acceptance(self.tried * factor, self.kept * factor)


@dataclass(frozen=True)
class Learned:
    """What a timed request leaves the next one on the same replicas and sampling."""

    acceptance: Acceptance
    gap: int  # its probing state: a pair that rarely agrees is probed across requests, as in one
    idle: int


class KPolicy:
    """Chooses each step's k; see the module docstring. ``costs``: the replica pair's (timed
    policies read them; every policy feeds them)."""

    def __init__(self, timed: bool, costs: ReplicaCosts | None = None, learned: Learned | None = None):
        self.timed = timed
        self.costs = costs if costs is not None else ReplicaCosts()
        start = learned if timed else None  # a seeded request knows itself only
        self.acceptance = start.acceptance.handed_on() if start else Acceptance()
        self.gap = start.gap if start else PROBE_GAP_MIN  # steps at k = 0 before the next probe
        self.idle = start.idle if start else 0  # steps at k = 0 since the last drafting step
        self.probing = False  # the step just chosen is a probe
        self.probe_odds = 0.0  # the acceptance estimate when it was chosen

    def step_costs(self) -> StepCosts:
        return (self.costs.step_costs() if self.timed else None) or SEEDED_COSTS

    def choose(self, cap: int, ready: int = 0) -> int:
        """This step's k in [0, cap]; ``ready``: tokens of its block already drafted ahead (a
        timed policy then stays within them, at no Propose cost; a seeded one ignores it)."""
        self.probing = False
        if cap <= 0:
            return 0
        costs, high = self.step_costs(), cap
        if self.timed and ready > 0:
            costs, high = costs.drafted_ahead(), min(ready, cap)
        rate = self.acceptance.rate
        if (k := best_k(rate, costs, 0, high)) > 0:
            self.idle, self.gap = 0, PROBE_GAP_MIN
            return k
        self.idle += 1
        if self.idle <= self.gap:
            return 0
        self.idle, self.probing, self.probe_odds = 0, True, rate
        return best_k(rate, costs, 1, high)

    def observe(self, step: StepRecord) -> None:
        if step.requested > 0:
            self.acceptance.observe(step.requested, step.accepted)
            if self.probing:
                surprise = step.accepted > 0 and self.probe_odds < SURPRISE
                self.gap = 0 if surprise else min(PROBE_GAP_MAX, max(PROBE_GAP_MIN, 2 * self.gap))
        self.costs.observe(step)

    def observe_loop(self, seconds: float) -> None:
        """The loop's own time for a step, outside the Propose and Verify calls."""
        self.costs.loop.add(max(0.0, seconds))

    def learned(self) -> Learned:
        return Learned(copy.copy(self.acceptance), self.gap, self.idle)

    def fork(self) -> KPolicy:
        """A copy to ask "what next, if ..." (tell it with an untimed ``StepRecord``): it owns
        its acceptance and probing state and shares the costs."""
        forked = copy.copy(self)
        forked.acceptance = copy.copy(self.acceptance)
        return forked


class KMemory:
    """Per replica pair, the shared ``ReplicaCosts``; per (pair, sampling), what the last timed
    request learned (requests end in any order: the last one wins). Bounded, least recently
    used first out."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._costs: OrderedDict[Hashable, ReplicaCosts] = OrderedDict()
        self._entries: OrderedDict[Hashable, Learned] = OrderedDict()

    def costs(self, pair: Hashable) -> ReplicaCosts:
        return self._touch(self._costs, pair, self._costs.get(pair) or ReplicaCosts())

    def recall(self, key: Hashable) -> Learned | None:
        learned = self._entries.get(key)
        return self._touch(self._entries, key, learned) if learned is not None else None

    def store(self, key: Hashable, learned: Learned) -> None:
        self._touch(self._entries, key, learned)

    def _touch(self, entries: OrderedDict[Hashable, Entry], key: Hashable, value: Entry) -> Entry:
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.capacity:
            entries.popitem(last=False)
        return value
