"""``num_draft=auto``: each step drafts the k that maximises expected tokens per unit of batch time.

With one acceptance rate a, a step with k drafts emits E(k) = 1 + a + ... + a^k tokens on
average and costs T(k), its share of the passes it joins (``k_costs.py``; docs/architecture.md,
"Choosing k"); the policy picks the k in [0, cap] with the largest E(k) / T(k). At one client
T(k) is the step's own time; in a batch only its rows are its own, so k falls as the batch
grows. Costs are per replica pair, shared by its requests; acceptance is per request, started
from the last request's on the same replicas and sampling (``KMemory``).

A seeded request with a random output must not follow timing: its policy is untimed (k from
its own acceptance and the fixed ``SEEDED_COSTS``; it ignores blocks drafted ahead). At k = 0
the policy probes after ``gap`` steps; each probe doubles the gap, but one accepted against the
odds probes again at once, so a draft that starts to agree is soon back. No MLX, no I/O.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeVar

from .k_costs import SEEDED_COSTS, ReplicaCosts, StepCosts, StepRecord

# Acceptance: each tried draft's count decays by this (about the last 30 count: fewer made the
# estimate dip below what drafting needs, and stop it, on the toy pairs).
ACCEPT_DECAY = 0.97
PRIOR_ACCEPTANCE = 0.5  # a fresh request's belief, worth PRIOR_WEIGHT drafts: a coin, held
PRIOR_WEIGHT = 1.0  # lightly (one rejection takes it to 0.25, where drafting rarely pays)
MEMORY_WEIGHT = 20.0  # an earlier request's acceptance counts as at most this many drafts
PROBE_GAP_MIN = 4  # steps at k = 0 before a probe: a good draft unlucky 2-3 times is back soon
PROBE_GAP_MAX = 64  # a draft that is always wrong costs one probe in 64 steps (<1%)
# A probe accepted when the estimate gave it less than these odds is a surprise: probe again
# at once. (Expected ones, from a good draft that does not pay in a big batch, must not.)
SURPRISE = 0.5


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


@dataclass
class Acceptance:
    """Decayed counts of tried and kept drafts; the rate is shrunk toward PRIOR_ACCEPTANCE."""

    tried: float = 0.0
    kept: float = 0.0

    @property
    def rate(self) -> float:
        return (self.kept + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (self.tried + PRIOR_WEIGHT)

    def observe(self, requested: int, accepted: int) -> None:
        """Drafts 1..accepted were kept; draft accepted+1, if asked for, was not."""
        for i in range(min(requested, accepted + 1)):
            self.tried, self.kept = ACCEPT_DECAY * self.tried + 1, ACCEPT_DECAY * self.kept + (i < accepted)

    def handed_on(self) -> Acceptance:
        factor = min(1.0, MEMORY_WEIGHT / self.tried) if self.tried else 1.0
        return Acceptance(self.tried * factor, self.kept * factor)


@dataclass(frozen=True)
class Learned:
    """What a timed request leaves the next one on the same replicas and sampling."""

    acceptance: Acceptance
    gap: int  # its probing state: a pair that rarely agrees is probed across requests as in one
    idle: int


class KPolicy:
    """Chooses each step's k. ``costs``: the replica pair's (every policy feeds them; only a
    timed one reads them). ``choose`` once per step, then ``observe``."""

    def __init__(self, timed: bool, costs: ReplicaCosts | None = None, learned: Learned | None = None):
        self.timed = timed
        self.costs = costs if costs is not None else ReplicaCosts()
        start = learned if timed else None  # a seeded request knows itself only
        self.acceptance = start.acceptance.handed_on() if start else Acceptance()
        self.gap = start.gap if start else PROBE_GAP_MIN  # steps at k = 0 before the next probe
        self.idle = start.idle if start else 0  # steps at k = 0 since the last drafting step
        self.probing = False  # the step just chosen is a probe
        self.probe_odds = 0.0  # the acceptance estimate when it was chosen

    def step_costs(self, sharing: int = 1) -> StepCosts:
        return (self.costs.step_costs(sharing) if self.timed else None) or SEEDED_COSTS

    def choose(self, cap: int, ready: int = 0, sharing: int = 1) -> int:
        """This step's k in [0, cap]; ``ready``: tokens of its block already drafted ahead (a
        timed policy then stays within them, at no Propose cost; a seeded one ignores it);
        ``sharing``: sessions on the target replica that could share a pass (a seeded policy
        ignores it: load must not change its tokens)."""
        self.probing = False
        if cap <= 0:
            return 0
        costs, high, rate = self.step_costs(sharing), cap, self.acceptance.rate
        if self.timed and ready > 0:
            costs, high = dataclasses.replace(costs, propose=0.0, per_draft=0.0), min(ready, cap)
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
            if self.probing and step.accepted > 0 and self.probe_odds < SURPRISE:
                self.idle = self.gap  # a surprise: probe again next step (the gap stays)
            elif self.probing:
                self.gap = min(PROBE_GAP_MAX, 2 * self.gap)
        self.costs.observe(step)

    def observe_loop(self, seconds: float) -> None:
        """The loop's own time for a step, outside the Propose and Verify calls."""
        self.costs.loop.add(max(0.0, seconds))

    def learned(self) -> Learned:
        return Learned(copy.copy(self.acceptance), self.gap, self.idle)

    def fork(self) -> KPolicy:
        """A copy to ask "what next, if ..." (told by an untimed ``StepRecord``): it owns its
        acceptance and probing state, and shares the costs."""
        forked = copy.copy(self)
        forked.acceptance = copy.copy(self.acceptance)
        return forked


class KMemory:
    """The shared ``ReplicaCosts`` per replica pair, and the last timed request's ``Learned`` per
    (pair, sampling). Bounded, least recently used first out."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._costs: OrderedDict[Hashable, ReplicaCosts] = OrderedDict()
        self._entries: OrderedDict[Hashable, Learned] = OrderedDict()

    def costs(self, pair: Hashable, overlap: bool = False) -> ReplicaCosts:
        costs = _put(self._costs, pair, self._costs.get(pair) or ReplicaCosts(), self.capacity)
        costs.overlap = overlap  # (the replicas' Info says; it may change if one restarts elsewhere)
        return costs

    def recall(self, key: Hashable) -> Learned | None:
        learned = self._entries.get(key)
        return _put(self._entries, key, learned, self.capacity) if learned is not None else None

    def store(self, key: Hashable, learned: Learned) -> None:
        _put(self._entries, key, learned, self.capacity)


Entry = TypeVar("Entry")


def _put(entries: OrderedDict[Hashable, Entry], key: Hashable, value: Entry, capacity: int) -> Entry:
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > capacity:
        entries.popitem(last=False)
    return value
