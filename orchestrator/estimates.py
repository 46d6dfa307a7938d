"""What the planner (``planner.py``) learns from what it observes: one request's acceptance, and a
(draft, target) replica pair's costs from the times its workers report. No I/O, no MLX.

Acceptance, per request: a = (kept + PRIOR_KEPT) / (tried + 1), with tried and kept the decayed
counts of the drafts tried and kept (a draft after a rejected one is not tried).

Costs, per replica pair (``PairCosts``), every sum and mean decayed by DECAY per sample:

    a target pass takes  A + b rows + s x   (least squares; x: seconds of draft model time that ran
                                             during the pass, from the draft passes' timeline)

b is pulled toward SLOPE_PRIOR (A + b) and s toward 0, each with the weight of RIDGE of the samples
varying by one row (b) or by the mean x (s); a pair's first pass (a cold start) is left out. s, within
[0, 1], is the share of the draft's time that lands on the target: about 1 where they share a
processor, 0 where they do not. Beside the line: the pass of each number of rows as measured, less
s x (``PassTable``, the median of the last RECENT: a CPU's pass need not grow with its rows; at one
client the planner prices k by it); B, the steps per Verify batch or the sessions that could share
it, whichever is more; c, how far a drafting step's Verify batch falls short of them, per drafted
token ((B / batch - 1) / k); h, the share of a Propose during which the target ran a pass (from the
target's pass timeline); o, a Verify's wall time outside its model time plus the loop's own time per
step; p, a Propose's wall time outside its model time; d, the draft's model time per drafted token
over its batch.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

DECAY = 0.97  # every estimate weighs about the last 1 / (1 - DECAY) = 33 samples
PRIOR_KEPT = 0.5  # a fresh request's belief: one draft, half kept (one rejection takes it to 0.25)
SLOPE_PRIOR = 0.1  # a row's share of a pass until rows vary (T5-large: ~0.06; CPU toy pairs ~0.2)
RIDGE = 0.05  # the priors' weight, as a share of the samples: data that vary soon outweigh them
BOUND = 256  # entries kept in each table: replica pairs, sampling keys, recent draft passes
RECENT = 5  # passes of one number of rows whose median stands for it: two spikes in five do not move it


@dataclass
class Acceptance:
    tried: float = 0.0
    kept: float = 0.0

    @property
    def rate(self) -> float:
        return (self.kept + PRIOR_KEPT) / (self.tried + 1.0)

    def observe(self, requested: int, accepted: int) -> None:
        """Drafts 1..accepted were kept; draft accepted+1, if asked for, was not."""
        for i in range(min(requested, accepted + 1)):
            self.tried, self.kept = DECAY * self.tried + 1, DECAY * self.kept + (i < accepted)


@dataclass(frozen=True)
class StepRecord:
    """What the loop knows after one step (seconds; a model time is its batch's; ``*_end``: when the
    reply came, on ``time.perf_counter``'s clock, 0 when unknown)."""

    requested: int  # drafts asked for (0: no Propose call)
    accepted: int  # drafts kept
    drafted: int = 0  # drafts proposed (an n-gram draft may propose fewer than asked)
    timed: bool = True  # False: a failover or a reopened session ran inside; times mean nothing
    propose_s: float = 0.0  # the Propose call's wall time
    propose_model_s: float = 0.0
    propose_batch: int = 1
    propose_end: float = 0.0
    caught_up: int = 0  # committed tokens the draft appended first (1 after a drafting step)
    verify_s: float = 0.0
    verify_model_s: float = 0.0
    verify_batch: int = 1
    verify_rows: int = 0  # rows in the Verify's batch pass (0: not reported)
    verify_end: float = 0.0
    sharing: int = 1  # sessions on the target replica that could share its pass, when the step began
    drafted_ahead: bool = False  # the block was drafted ahead: no Propose in this step
    ahead_drafted: int = 0  # tokens drafted ahead during this step's Verify (0: none)
    ahead_model_s: float = 0.0
    ahead_batch: int = 1
    ahead_end: float = 0.0


@dataclass(frozen=True)
class Costs:
    """A replica pair's costs as the planner weighs them (seconds, or any one unit)."""

    fixed: float  # A: the pass's part that its batch's steps share
    per_row: float  # b
    propose: float  # p
    per_draft: float  # d
    wait: float = 0.0  # o
    passes: tuple[float, ...] = ()  # alone (B rounds to 1): the pass of 1, 2, ... rows (beyond: the line)
    batch: float = 1.0  # B
    share: float = 1.0  # s
    split: float = 0.0  # c
    hidden: float = 1.0  # h


# Costs before any are measured, and always a seeded request's, in target-alone steps: a row 0.1, a
# Propose 0.15, a draft 0.2 (on the CPU toy pairs a sampled step with one draft costs ~1.5 target steps,
# so drafting pays from an acceptance of ~0.45 and never loses there); no drafting beside the target.
SEEDED_COSTS = Costs(fixed=0.9, per_row=0.1, propose=0.15, per_draft=0.2, share=0.0)


class Ewma:
    def __init__(self) -> None:
        self.weight = self.value = 0.0  # weight: the decayed count of samples

    def add(self, sample: float) -> None:
        self.weight = DECAY * self.weight + 1.0
        self.value += (sample - self.value) / self.weight


class PassFit:
    """A pass's time ~ A + b rows + s x: decayed least squares over the centred rows and x."""

    def __init__(self) -> None:
        self.n = self.r = self.x = self.y = self.rr = self.rx = self.xx = self.ry = self.xy = 0.0

    def add(self, rows: float, x: float, y: float) -> None:
        sums = (1.0, rows, x, y, rows * rows, rows * x, x * x, rows * y, x * y)
        names = ("n", "r", "x", "y", "rr", "rx", "xx", "ry", "xy")
        for name, value in zip(names, sums, strict=True):
            setattr(self, name, DECAY * getattr(self, name) + value)

    def fit(self) -> tuple[float, float, float]:
        """(A, b, s); s not yet clipped."""
        n = self.n
        if n == 0:
            return 0.0, 0.0, 0.0
        mean_r, mean_x, mean_y = self.r / n, self.x / n, self.y / n
        ridge_b, ridge_s = RIDGE * n, RIDGE * n * mean_x * mean_x
        prior_b = mean_y / ((1 - SLOPE_PRIOR) / SLOPE_PRIOR + mean_r)  # b = SLOPE_PRIOR (A + b)
        crr = self.rr - self.r * mean_r + ridge_b
        crx = self.rx - self.r * mean_x
        cxx = self.xx - self.x * mean_x + ridge_s
        cry = self.ry - self.r * mean_y + ridge_b * prior_b
        cxy = self.xy - self.x * mean_y
        det = crr * cxx - crx * crx
        if cxx <= 0 or det <= 0:  # x never varied: nothing to tell s by
            slope, share = cry / crr, 0.0
        else:
            slope, share = (cry * cxx - cxy * crx) / det, (cxy * crr - cry * crx) / det
        slope = max(0.0, slope)
        if (intercept := mean_y - slope * mean_r - share * mean_x) < 0:  # all of it per row
            return 0.0, (mean_y - share * mean_x) / mean_r, share
        return intercept, slope, share


class PassTable:
    """The pass of each number of rows, as measured: the median of its last RECENT passes (another
    process's burst on a shared machine is a spike, not the pass's cost). An entry weighs its samples,
    aged by DECAY for every pass since its last, so one not measured lately yields to the line."""

    def __init__(self) -> None:
        self.samples = 0  # passes seen
        self.entries: OrderedDict[int, tuple[deque[float], int]] = OrderedDict()  # rows: (recent, at)

    def add(self, rows: int, seconds: float) -> None:
        self.samples += 1
        recent, _ = self.entries.pop(rows, (deque(maxlen=RECENT), 0))
        recent.append(seconds)
        self.entries[rows] = (recent, self.samples)
        if len(self.entries) > BOUND:
            self.entries.popitem(last=False)

    def passes(self, line: Callable[[int], float], upto: int) -> tuple[float, ...]:
        """The pass of 1..upto rows: the line where nothing was measured; a median below the line as
        measured (choosing its k measures it again); one above it pulled toward the line with the weight
        of one sample, more as it ages (nothing else would choose its k again)."""
        def value(rows: int) -> float:
            recent, at = self.entries[rows]
            median, weight = statistics.median(recent), len(recent) * DECAY ** (self.samples - at)
            return min(median, (weight * median + line(rows)) / (weight + 1.0))

        return tuple(value(r) if r in self.entries else line(r) for r in range(1, upto + 1))


class Timeline:
    """A worker's recent passes on this pair, as (start, end) intervals."""

    def __init__(self) -> None:
        self.passes: deque[tuple[float, float]] = deque(maxlen=BOUND)

    def add(self, end: float, model_s: float) -> None:
        if end > 0 and model_s > 0:
            self.passes.append((end - model_s, end))

    def overlap(self, start: float, end: float) -> float:
        """Seconds within [start, end] during which a pass ran (the passes of one batch counted once)."""
        covered, reach = 0.0, start
        for first, last in sorted(p for p in self.passes if p[1] > start and p[0] < end):
            first, last = max(first, reach), min(last, end)
            if last > first:
                covered, reach = covered + last - first, last
        return covered


@dataclass
class PairCosts:
    """A (draft, target) replica pair's costs, from what its workers measure."""

    verify: PassFit = field(default_factory=PassFit)
    measured: PassTable = field(default_factory=PassTable)  # on a CPU a pass of 3 rows may cost more than one of 4
    batch: Ewma = field(default_factory=Ewma)
    split: Ewma = field(default_factory=Ewma)  # c: how far each drafted token splits the sessions' passes
    verify_wait: Ewma = field(default_factory=Ewma)  # o, less the loop's part
    loop: Ewma = field(default_factory=Ewma)  # o, the loop's part
    propose_wait: Ewma = field(default_factory=Ewma)
    draft_token: Ewma = field(default_factory=Ewma)
    drafting: Timeline = field(default_factory=Timeline)  # the draft's passes
    verifying: Timeline = field(default_factory=Timeline)  # the target's passes
    hidden: Ewma = field(default_factory=Ewma)  # h: the share of a Propose during which the target ran a pass
    passes_seen: int = 0
    s_decided: int = 0  # steps whose drafting ahead s decided, modulo the planner's probe gap

    def observe(self, step: StepRecord) -> None:
        """Everything in a step but its pass, which ``observe_pass`` takes a step later."""
        if not step.timed:
            return
        self.batch.add(step.verify_batch)
        if step.requested > 0:  # B_k = B / (1 + c k): this step's c, its B the sessions that could join
            self.split.add(max(0.0, (max(step.sharing, step.verify_batch) / step.verify_batch - 1) / step.requested))
        self.verify_wait.add(max(0.0, step.verify_s - step.verify_model_s))
        self.verifying.add(step.verify_end, step.verify_model_s)
        # A Propose after steps at k = 0 first caught the draft up: its times are not a draft's.
        if step.requested > 0 and step.caught_up <= 1 and not step.drafted_ahead:
            self.propose_wait.add(max(0.0, step.propose_s - step.propose_model_s))
            self.observe_draft(step.drafted, step.propose_model_s, step.propose_batch, step.propose_end)
        self.observe_draft(step.ahead_drafted, step.ahead_model_s, step.ahead_batch, step.ahead_end)

    def observe_pass(self, step: StepRecord) -> None:
        """A step's Verify pass, once the draft passes that ran beside it have reported."""
        if not step.timed:
            return
        self.passes_seen += 1
        if self.passes_seen == 1:  # a cold start: the worker's first pass built its kernels and buffers
            return
        if step.requested > 0 and step.caught_up <= 1 and not step.drafted_ahead and step.propose_end \
                and step.propose_s > 0:  # (the other sessions' passes during it have reported by now)
            start = step.propose_end - step.propose_s
            self.hidden.add(min(1.0, self.verifying.overlap(start, step.propose_end) / step.propose_s))
        rows = step.verify_rows or step.drafted + 1
        end = step.verify_end
        beside = self.drafting.overlap(end - step.verify_model_s, end) if end else 0.0
        self.verify.add(rows, beside, step.verify_model_s)
        share = min(1.0, max(0.0, self.verify.fit()[2]))
        self.measured.add(rows, step.verify_model_s - share * beside)

    def observe_draft(self, drafted: int, model_s: float, batch: int, end: float) -> None:
        if drafted > 0:
            self.draft_token.add(model_s / drafted / max(1, batch))
            self.drafting.add(end, model_s)

    def costs(self, sharing: int = 1) -> Costs:
        """SEEDED_COSTS until a pass was measured; then until a Propose was, their shares of a
        target-alone step. B is the larger of the batches seen and ``sharing``, the sessions on the
        target that could share its pass: drafting keeps batches small (each session's Verify waits
        for its own Propose), so the batches seen would price a step at k = 0 too high."""
        intercept, per_row, share = self.verify.fit()
        batch = max(1.0, self.batch.value, float(sharing))
        wait = self.verify_wait.value + self.loop.value
        if self.verify.n == 0 or (intercept + wait) / batch + per_row <= 0:
            return SEEDED_COSTS
        # Alone, a step's pass is the one measured for its rows; in a batch, its share of the line.
        passes = self.measured.passes(lambda rows: intercept + per_row * rows, max(self.measured.entries)) \
            if round(batch) == 1 else ()
        unit = passes[0] + wait if passes else (intercept + wait) / batch + per_row
        propose = self.propose_wait.value if self.propose_wait.weight else SEEDED_COSTS.propose * unit
        per_draft = self.draft_token.value if self.draft_token.weight else SEEDED_COSTS.per_draft * unit
        return Costs(intercept, per_row, propose, per_draft, wait, passes, batch, min(1.0, max(0.0, share)),
                     self.split.value, self.hidden.value if self.hidden.weight else 1.0)


@dataclass(frozen=True)
class Learned:
    """What a timed request leaves the next one on the same replicas and sampling."""

    acceptance: Acceptance
    gap: int  # its probing state: a pair that rarely agrees is probed across requests as in one
    idle: int


class PlanMemory:
    """The shared ``PairCosts`` per replica pair, and the last timed request's ``Learned`` per (pair,
    sampling); each table bounded, the least recently used first out."""

    def __init__(self, capacity: int = BOUND):
        self.capacity = capacity
        self.pairs: OrderedDict[Hashable, PairCosts] = OrderedDict()
        self.learned: OrderedDict[Hashable, Learned] = OrderedDict()

    def costs(self, pair: Hashable) -> PairCosts:
        return _put(self.pairs, pair, self.pairs.get(pair) or PairCosts(), self.capacity)

    def recall(self, key: Hashable) -> Learned | None:
        learned = self.learned.get(key)
        return _put(self.learned, key, learned, self.capacity) if learned is not None else None

    def store(self, key: Hashable, learned: Learned) -> None:
        _put(self.learned, key, learned, self.capacity)


Entry = TypeVar("Entry")


def _put(entries: OrderedDict[Hashable, Entry], key: Hashable, value: Entry, capacity: int) -> Entry:
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > capacity:
        entries.popitem(last=False)
    return value
