"""``num_draft=auto``: each step drafts the k that maximises the expected tokens per second.

A step with k drafts emits on average

    E(k) = 1 + sum_{i=1..k} prod_{j<=i} a_j

tokens (the target's correction or bonus is always one), where a_i is the acceptance of draft
position i given that every position before it was accepted, and takes

    T(k) = overhead + verify_per_token * (k + 1) + [k > 0] * (propose_call + draft_per_token * k)

(``CostModel``). The policy picks the k in [0, cap] with the largest E(k) / T(k); with one a for
every position and no overheads that is Leviathan's (1 - a^(k+1)) / ((1 - a)(k c + 1)).
k = 0 is the target alone: the loop skips the Propose call, and the draft session catches up
on its next call (``Lane.request`` appends every committed token it lacks).

**A block drafted ahead.** When pipelining already drafted n tokens of this step's block (while
the target verified the last one), any k <= n needs no Propose in this step: a timed policy then
picks the k in [0, min(n, cap)] with the Propose terms of T(k) taken as 0, rather than a k that
would cut the ready block short. An untimed policy ignores it (its k must not depend on
pipelining, see below).

Inputs, fed after every step (``StepRecord``):

- **acceptance per position** (``PositionAcceptance``): this request's counts of tried and kept
  drafts at each position, decayed so that the estimate follows the text; each position is
  shrunk toward the one before it, so a position never tried is assumed as good as its
  predecessor (that is how k grows past what was tried).
- **costs** (``MeasuredCosts``): the Verify call's wall time fitted as a + b * (block size), the
  Propose call's wall time split into the worker's model time per drafted token (from every
  Propose, drafted ahead or not) and the rest (wire, queueing; only from Proposes not drafted
  ahead: an ahead one's wall time overlaps a Verify), and the loop's own time per step. Wall
  times, so under load the Verify time includes the target's batching: the same policy then
  weighs the batch's cost.

**Exactness: timed or untimed.** Greedy output never depends on k. A sampled request's tokens
do (k decides which positions are draft positions and which are bonus draws), and a seeded
request's tokens must never depend on timing, batching or failover. So a request whose output
is random (temperature > 0, or delta > 0) and whose caller gave the seed gets an **untimed**
policy: it decides from this request's own acceptance history (a function of the seed, since
every draw is keyed by position) and the fixed ``FIXED_COSTS``, never from a clock or from other
requests. Every other request gets a **timed** policy, which uses the measured costs and starts
from what earlier requests on the same replicas learned (``KMemory``).

**Probing.** At k = 0 nothing about acceptance is learned, so after a gap of steps at 0 the
policy drafts once (a probe: its best k >= 1). The gap is PROBE_GAP_SCALE x z^2 steps (within
[PROBE_GAP_MIN, PROBE_GAP_MAX]), z being how many standard deviations a_1's estimate lies
below the acceptance at which drafting pays (``break_even``): a few unlucky rejections of a
good draft are soon re-checked, while a draft that has been wrong a hundred times costs one
probe in 64 steps. A long-shot probe (a_1's estimate under SURPRISE x break-even) that has a
draft accepted anyway is followed by another at once, so that a draft that starts to agree
(the text turns to copying the prompt, say) is back within a few steps.

``choose`` is called once per step (it counts the steps for probing); ``observe`` after it.
No MLX, no I/O.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

# Acceptance: a draft position's counts decay by this per observation (about the last 30 count:
# with fewer the estimate is noisy enough to dip below what drafting needs, and stop it).
ACCEPT_DECAY = 0.97
# ... and, past position 1, by this per drafting step that did not reach it, so that a position
# written off by a few early rejections drifts back to its predecessor's rate and is tried again.
STALE_DECAY = 0.95
PRIOR_ACCEPTANCE = 0.5  # a fresh request's belief about position 1, worth PRIOR_WEIGHT observations
PRIOR_WEIGHT = 1.0  # light: one rejection (estimate 0.25) stops drafting where it needs more
# An earlier request's acceptance counts as at most this many observations in a new one (its
# prompt differs; a first step should still trust it).
MEMORY_WEIGHT = 20.0
# Costs: measured samples decay by this per sample; a sample past CLIP_FACTOR x the current
# estimate is cut to it (one stall on a busy machine must not switch drafting off for long).
COST_DECAY = 0.9
CLIP_FACTOR = 4.0
RECALLED_COST_WEIGHT = 3.0  # an earlier request's costs count as this many samples in a new one
# The Verify's cost per position of its block, before the block sizes vary enough to measure it:
# this share of a Verify's mean time (an accelerator pays ~0.01, a small model on a CPU ~0.2),
# worth VERIFY_SLOPE_WEIGHT x the samples (in units of block-size variance).
VERIFY_SLOPE_PRIOR = 0.1
VERIFY_SLOPE_WEIGHT = 0.05
# A Propose that first appended more than this many committed tokens (after steps at k = 0) also
# caught the draft up: its time says nothing about a drafted token's cost.
NORMAL_CATCH_UP = 2
PROBE_GAP_SCALE = 8
PROBE_GAP_MIN = 2
PROBE_GAP_MAX = 64
SURPRISE = 0.5  # a probe whose a_1 estimate is under this share of break-even is a long shot
# An untimed request learns from its own steps only (no memory): on a pair that rarely agrees its
# probes are most of what it loses, so it probes a quarter as often (simulated with FIXED_COSTS
# over 48-token requests: at an acceptance of 0.2-0.3, 3.3% -> 2.2% below the target alone; at
# 0.8, 2% fewer tokens per unit of time than probing as often as a timed request).
UNTIMED_PROBE_GAP_SCALE = 32
UNTIMED_PROBE_GAP_MIN = 4


@dataclass(frozen=True)
class CostModel:
    """A step's cost as a function of k, in seconds or in any one unit."""

    overhead: float  # paid by every step: the Verify call's fixed part and the loop's own time
    verify_per_token: float  # per position of the verified block (k + 1 of them)
    propose_call: float  # a Propose call's fixed part (wire, queueing), paid only when k > 0
    draft_per_token: float  # the draft's time per drafted token

    def step_time(self, k: int) -> float:
        time = self.overhead + self.verify_per_token * (k + 1)
        if k > 0:
            time += self.propose_call + self.draft_per_token * k
        return time

    def drafted_ahead(self) -> CostModel:
        """The costs of a step whose block is already drafted: no Propose to pay."""
        return dataclasses.replace(self, propose_call=0.0, draft_per_token=0.0)


# The untimed policy's costs, in units of one target-alone step (step_time(0) == 1): a draft
# token at 0.2 of it, a Propose round trip at 0.15 and each verified position at 0.1. Set to
# never lose rather than to win the most: on this repository's CPU pairs a sampled step with one
# draft costs ~1.5 target steps in one process (draft/target ratio 0.13-0.33, plus sampling's
# work on both sides), so drafting pays from a position-1 acceptance of about 0.45 on (with the
# earlier 0.15/0.1/0.05 it drafted from 0.3 and was 4% slower than the target alone on the
# benchmark's low-acceptance pair). A T5-small draft for T5-XXL on an accelerator is cheaper all
# round, so untimed requests draft a little less there than a measured policy would.
FIXED_COSTS = CostModel(overhead=0.9, verify_per_token=0.1, propose_call=0.15, draft_per_token=0.2)


def best_k(rates: Sequence[float], costs: CostModel, low: int, high: int) -> int:
    """The k in [low, high] with the largest E(k) / T(k) (``rates[i]`` is a_{i+1}, at least
    ``high`` of them); the smallest such k on a tie."""
    best, best_rate = low, -1.0
    total, reach = 1.0, 1.0
    for k in range(high + 1):
        if k > 0:
            reach *= rates[k - 1]
            total += reach
        if k >= low:
            rate = total / costs.step_time(k)
            if rate > best_rate * (1 + 1e-12):
                best, best_rate = k, rate
    return best


def break_even(costs: CostModel, cap: int) -> float:
    """The acceptance (the same at every position) from which some k in [1, cap] beats k = 0."""
    low, high = 0.0, 1.0
    for _ in range(14):  # to within 1e-4
        middle = (low + high) / 2
        if best_k([middle] * cap, costs, 0, cap) > 0:
            high = middle
        else:
            low = middle
    return high


class PositionAcceptance:
    """Estimates of a_1, a_2, ...: decayed counts of tried and kept drafts per position, each
    shrunk toward a prior worth PRIOR_WEIGHT observations: PRIOR_ACCEPTANCE for position 1,
    the estimate of the position before it for the others."""

    def __init__(self, decay: float = ACCEPT_DECAY):
        self.decay = decay
        self.tried: list[float] = []
        self.kept: list[float] = []

    @property
    def evidence(self) -> float:
        """Decayed observations of position 1."""
        return self.tried[0] if self.tried else 0.0

    def deviation(self) -> float:
        """The standard deviation of a_1's estimate (its Beta posterior's)."""
        rate = self.rates(1)[0]
        return math.sqrt(rate * (1 - rate) / (self.evidence + PRIOR_WEIGHT + 1))

    def observe(self, requested: int, accepted: int) -> None:
        """One block: positions 1..accepted were kept; position accepted+1, if it was asked for,
        was not (the target rejected it, or the draft had nothing to propose there)."""
        seen = min(requested, accepted + 1)
        while len(self.tried) < seen:
            self.tried.append(0.0)
            self.kept.append(0.0)
        for i in range(seen):
            self.tried[i] = self.decay * self.tried[i] + 1.0
            self.kept[i] = self.decay * self.kept[i] + float(i < accepted)
        for i in range(max(seen, 1), len(self.tried)):
            self.tried[i] *= STALE_DECAY
            self.kept[i] *= STALE_DECAY

    def rates(self, n: int) -> list[float]:
        rates: list[float] = []
        for i in range(n):
            prior = rates[-1] if rates else PRIOR_ACCEPTANCE
            tried, kept = (self.tried[i], self.kept[i]) if i < len(self.tried) else (0.0, 0.0)
            rates.append((kept + PRIOR_WEIGHT * prior) / (tried + PRIOR_WEIGHT))
        return rates

    def handed_on(self, weight: float) -> PositionAcceptance:
        """A copy for a new request: the same rates, from at most ``weight`` observations of
        position 1 (the others scaled alike)."""
        acceptance = copy.deepcopy(self)
        factor = min(1.0, weight / self.evidence) if self.evidence else 1.0
        acceptance.tried = [t * factor for t in acceptance.tried]
        acceptance.kept = [k * factor for k in acceptance.kept]
        return acceptance


class Ewma:
    """An exponentially weighted mean whose samples are clipped to CLIP_FACTOR x the current
    value once it rests on a couple of samples."""

    def __init__(self, decay: float = COST_DECAY):
        self.decay = decay
        self.weight = 0.0
        self.value = 0.0

    def add(self, sample: float) -> None:
        if self.weight >= 1.5 and self.value > 0:  # (clipping to 4 x 0 would pin it at 0 for good)
            sample = min(sample, CLIP_FACTOR * self.value)
        self.weight = self.decay * self.weight + 1.0
        self.value += (sample - self.value) / self.weight

    def scaled(self, weight: float) -> None:
        """Keep the value, but let it count as at most ``weight`` samples."""
        self.weight = min(self.weight, weight)


class DecayedLine:
    """y ~ a + b x by least squares over decayed samples, the slope pulled toward
    VERIFY_SLOPE_PRIOR x mean(y) (what a single x gives); a >= 0, b >= 0. Samples past
    CLIP_FACTOR x the current prediction are clipped to it."""

    def __init__(self, decay: float = COST_DECAY):
        self.decay = decay
        self.n = self.sx = self.sxx = self.sy = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        if self.n >= 1.5 and (predicted := self.predict(x)) > 0:
            y = min(y, CLIP_FACTOR * predicted)
        d = self.decay
        self.n, self.sx, self.sxx = d * self.n + 1, d * self.sx + x, d * self.sxx + x * x
        self.sy, self.sxy = d * self.sy + y, d * self.sxy + x * y

    def fit(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 0.0
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        spread = self.sxx - self.sx * mean_x
        prior = VERIFY_SLOPE_WEIGHT * self.n * VERIFY_SLOPE_PRIOR * mean_y
        slope = max(0.0, (self.sxy - self.sx * mean_y + prior) / (spread + VERIFY_SLOPE_WEIGHT * self.n))
        intercept = mean_y - slope * mean_x
        if intercept < 0:  # all of it per token
            return 0.0, mean_y / mean_x
        return intercept, slope

    def predict(self, x: float) -> float:
        a, b = self.fit()
        return a + b * x

    def scaled(self, weight: float) -> None:
        """Keep the fit, but let it count as at most ``weight`` samples."""
        if self.n > weight:
            factor = weight / self.n
            self.n, self.sx, self.sxx, self.sy, self.sxy = (
                v * factor for v in (self.n, self.sx, self.sxx, self.sy, self.sxy))


@dataclass(frozen=True)
class StepRecord:
    """What the loop knows after one step."""

    requested: int  # drafts asked for (0: no Propose call)
    accepted: int  # drafts kept
    drafted: int = 0  # drafts the draft proposed (an n-gram draft may propose fewer than asked)
    timed: bool = True  # False: a failover or a reopened session ran inside; times mean nothing
    propose_s: float = 0.0  # the Propose call's wall time
    propose_model_s: float = 0.0  # the draft worker's model time in it
    caught_up: int = 0  # committed tokens the draft appended before drafting (1 after a drafting step)
    verify_s: float = 0.0  # the Verify call's wall time (block size drafted + 1)
    # The block was drafted ahead (pipelining): no Propose call in this step, so its times say
    # nothing about what a Propose costs.
    drafted_ahead: bool = False
    # The Propose that drafted the next block ahead during this step's Verify (0: none made).
    ahead_drafted: int = 0  # tokens it drafted (the guess of the target's token included)
    ahead_model_s: float = 0.0  # the draft worker's model time in it


@dataclass
class MeasuredCosts:
    """The costs from measured wall times (seconds)."""

    verify: DecayedLine = field(default_factory=DecayedLine)  # Verify wall time vs block size
    loop: Ewma = field(default_factory=Ewma)  # the loop's own time per step, outside both calls
    propose_call: Ewma = field(default_factory=Ewma)  # Propose wall time less the worker's model time
    draft_token: Ewma = field(default_factory=Ewma)  # the draft's model time per drafted token

    def observe(self, step: StepRecord) -> None:
        if not step.timed:
            return
        self.verify.add(step.drafted + 1, step.verify_s)
        if step.requested > 0 and step.caught_up <= NORMAL_CATCH_UP and not step.drafted_ahead:
            self.propose_call.add(max(0.0, step.propose_s - step.propose_model_s))
            if step.drafted > 0:
                self.draft_token.add(step.propose_model_s / step.drafted)
        # Its wall time overlaps the Verify (on a shared machine, inflated by it): not a
        # propose_call sample. Its model time is what drafting costs, as in any Propose.
        self.observe_ahead(step.ahead_drafted, step.ahead_model_s)

    def observe_ahead(self, drafted: int, model_s: float) -> None:
        """A Propose that drafted ahead: its model time per drafted token (a draft that nearly
        always agrees has almost every block drafted ahead; this is then its only measure)."""
        if drafted > 0:
            self.draft_token.add(model_s / drafted)

    def model(self) -> CostModel | None:
        """None until a Verify was measured (in a time above 0); until a Propose was, the
        draft's costs are FIXED_COSTS' shares of a measured target-alone step."""
        if self.verify.n == 0:
            return None
        intercept, slope = self.verify.fit()
        overhead = intercept + self.loop.value
        unit = overhead + slope  # a target-alone step
        if unit <= 0:  # a clock too coarse to see it: no rate to compare
            return None
        propose_call = self.propose_call.value if self.propose_call.weight else FIXED_COSTS.propose_call * unit
        per_token = self.draft_token.value if self.draft_token.weight else FIXED_COSTS.draft_per_token * unit
        return CostModel(overhead, slope, propose_call, per_token)

    def handed_on(self) -> MeasuredCosts:
        """A copy for a new request, weighing as RECALLED_COST_WEIGHT samples (its own count more)."""
        costs = copy.deepcopy(self)
        for estimate in (costs.verify, costs.loop, costs.propose_call, costs.draft_token):
            estimate.scaled(RECALLED_COST_WEIGHT)
        return costs


@dataclass
class Learned:
    """What a timed request starts from: the costs, acceptance and steps at k = 0 left by the
    last request on the same replicas and sampling."""

    costs: MeasuredCosts
    acceptance: PositionAcceptance
    idle: int


class KPolicy:
    """Chooses each step's k; see the module docstring."""

    def __init__(self, timed: bool, learned: Learned | None = None):
        self.timed = timed
        start = learned if timed else None  # an untimed policy knows this request only
        self.costs = start.costs.handed_on() if start else MeasuredCosts()
        self.acceptance = start.acceptance.handed_on(MEMORY_WEIGHT) if start else PositionAcceptance()
        self.idle = start.idle if start else 0  # steps at k = 0 since the last drafting step
        self.probing = False  # the step just chosen is a probe
        self.probe_again = False  # the last probe had a draft accepted: look again at once
        self.gap: float | None = None  # probe_gap, set on the first step at k = 0 after drafting
        self.long_shot = False  # a_1's estimate is under SURPRISE x the break-even acceptance

    def cost_model(self) -> CostModel:
        return (self.costs.model() if self.timed else None) or FIXED_COSTS

    def probe_gap(self, rate: float, even: float) -> float:
        """Steps at k = 0 before the next probe, for a_1's estimate ``rate`` and the break-even
        acceptance ``even``."""
        z = (even - rate) / self.acceptance.deviation()
        scale, low = ((PROBE_GAP_SCALE, PROBE_GAP_MIN) if self.timed
                      else (UNTIMED_PROBE_GAP_SCALE, UNTIMED_PROBE_GAP_MIN))
        return min(PROBE_GAP_MAX, max(low, scale * max(0.0, z) ** 2))

    def choose(self, cap: int, ready: int = 0) -> int:
        """This step's k in [0, cap]; ``ready``: tokens of its block already drafted ahead (a
        timed policy then stays within them, at no Propose cost; an untimed one ignores it)."""
        if cap <= 0:
            return 0
        rates, costs = self.acceptance.rates(cap), self.cost_model()
        step_costs, high = costs, cap
        if self.timed and ready > 0:  # (untimed: k must not depend on pipelining)
            step_costs, high = costs.drafted_ahead(), min(ready, cap)
        k = best_k(rates, step_costs, 0, high)
        self.probing = False
        if k > 0:
            self.idle, self.gap = 0, None
            return k
        self.idle += 1
        if self.gap is None:  # nothing is learned at k = 0: the gap holds until the next draft
            even = break_even(costs, cap)
            self.gap = self.probe_gap(rates[0], even)
            self.long_shot = rates[0] < SURPRISE * even
        if self.idle <= self.gap and not self.probe_again:
            return 0
        self.idle, self.gap, self.probing, self.probe_again = 0, None, True, False
        return best_k(rates, step_costs, 1, high)

    def observe(self, step: StepRecord) -> None:
        """After a step. Timings are recorded by every policy (for ``learned``), but only a timed
        one ever reads them."""
        if step.requested > 0:
            self.acceptance.observe(step.requested, step.accepted)
            # A long-shot probe that had a draft accepted anyway hints that the pair changed:
            # look again at once.
            self.probe_again = self.probing and self.long_shot and step.accepted > 0
        self.costs.observe(step)

    def observe_loop(self, seconds: float) -> None:
        """The loop's own time for a step, outside the Propose and Verify calls (acceptance,
        streaming the step's tokens to the client)."""
        self.costs.loop.add(max(0.0, seconds))

    def learned(self) -> Learned:
        return Learned(self.costs, self.acceptance, self.idle)

    def fork(self) -> KPolicy:
        """A copy to ask "what next, if ..." without touching this one: ``choose`` and an untimed
        ``observe`` change only the acceptance counts and the probing state, which the copy owns
        (the costs are shared; a deep copy of everything cost ~0.1 ms per pipelined step)."""
        forked = copy.copy(self)
        forked.acceptance = copy.copy(self.acceptance)
        forked.acceptance.tried, forked.acceptance.kept = list(self.acceptance.tried), list(self.acceptance.kept)
        return forked


class KMemory:
    """What requests learned (``KPolicy.learned``), by (draft replica, target replica, sampling):
    the start of the next timed request on the same ones. Requests end in any order; the last
    one wins. Bounded, least recently used first out."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Learned] = OrderedDict()

    def recall(self, key: Hashable) -> Learned | None:
        learned = self._entries.get(key)
        if learned is not None:
            self._entries.move_to_end(key)
        return learned

    def store(self, key: Hashable, learned: Learned) -> None:
        self._entries[key] = learned
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
