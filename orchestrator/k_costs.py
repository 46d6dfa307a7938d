"""What a (draft, target) replica pair's steps cost, from what its workers measure: the
``StepCosts`` that num_draft=auto's k policy (``k_policy.py``) weighs; docs/architecture.md,
"Choosing k". A step with k drafts costs its share of the passes it joins:

    T(k) = (A + o + [k > 0] p) / B + b (k + 1) + [k > 0] d k

A + b rows: a target pass, fitted to each Verify's worker model time and its batch's rows; B:
steps per batch; o, p: the Verify's and the Propose's wall time outside the workers' model
time, and the loop's own; d: the draft's model time per drafted token, over its batch. T(0)
of a step that runs alone is a one-row pass measured apart (the line still spans all). No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COST_DECAY = 0.98  # costs: the last ~50 steps on a replica pair (~3 batches at 16 clients)
# A row's cost until the rows vary enough to measure it: this share of a one-row pass (issue
# 24's T5-large shape: ~0.06; the CPU toy pairs ~0.2), worth SLOPE_PRIOR_WEIGHT samples per unit
# of row variance (rows that vary by one outweigh it 20:1).
SLOPE_PRIOR = 0.1
SLOPE_PRIOR_WEIGHT = 0.05
# Under this mean Verify batch most steps run alone, and a target-alone step is a one-row pass
# (above it a step's rows join others' and the line prices them).
ALONE_BATCH = 1.5


def drafts_overlap(draft: tuple[str, str], target: tuple[str, str]) -> bool:
    """Does a session's drafting run beside the target's passes for other sessions? Given each
    replica's (hostname, device): yes on two hosts, or on one host's CPU (each worker's BLAS
    threads on cores of their own: docs/deployment.md); no when a GPU on one host serves both
    (an Apple GPU: drafting takes its time from the target), or when either is unknown."""
    (draft_host, draft_device), (target_host, target_device) = draft, target
    if not (draft_host and draft_device and target_host and target_device):
        return False
    return draft_host != target_host or (draft_device == "cpu" and target_device == "cpu")


@dataclass(frozen=True)
class StepCosts:
    """A step's cost as a function of k, in any one unit."""

    fixed: float  # (A + o) / B, paid by every step
    per_row: float  # b, per position of the verified block (k + 1)
    propose: float  # p / B, a Propose call's fixed part
    per_draft: float  # d, per drafted token
    alone: float = 0.0  # T(0) measured apart (0: from the line)
    # The share of the smaller of a step's draft and target parts that it still pays: 1 for a step
    # that runs alone (it drafts, then verifies); 1/B when B sessions share the passes, since one
    # session's drafting then runs while the target serves the others.
    serial_share: float = 1.0

    def time(self, k: int) -> float:
        if k == 0 and self.alone:
            return self.alone
        target = self.fixed + self.per_row * (k + 1)
        if k == 0:
            return target
        draft = self.propose + self.per_draft * k
        return max(target, draft) + min(target, draft) * self.serial_share


# A seeded request's costs, in target-alone steps: a row 0.1, a Propose call 0.15, a draft 0.2.
# On the CPU toy pairs a sampled step with one draft costs ~1.5 target steps (draft/target
# 0.13-0.33, plus sampling), so drafting pays from an acceptance of ~0.45 and never loses there;
# on an accelerator it drafts a little less than a measured policy would.
SEEDED_COSTS = StepCosts(fixed=0.9, per_row=0.1, propose=0.15, per_draft=0.2)


class Ewma:
    def __init__(self) -> None:
        self.weight = self.value = 0.0  # weight: the decayed count of samples

    def add(self, sample: float) -> None:
        self.weight = COST_DECAY * self.weight + 1.0
        self.value += (sample - self.value) / self.weight


class PassLine:
    """A pass's time ~ A + b rows: decayed least squares, b pulled toward SLOPE_PRIOR (A + b)."""

    def __init__(self) -> None:
        self.n = self.sx = self.sxx = self.sy = self.sxy = 0.0

    def add(self, rows: float, seconds: float) -> None:
        d = COST_DECAY
        self.n, self.sx, self.sxx = d * self.n + 1, d * self.sx + rows, d * self.sxx + rows * rows
        self.sy, self.sxy = d * self.sy + seconds, d * self.sxy + rows * seconds

    def fit(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 0.0
        mean_x, mean_y, ridge = self.sx / self.n, self.sy / self.n, SLOPE_PRIOR_WEIGHT * self.n
        prior = mean_y / ((1 - SLOPE_PRIOR) / SLOPE_PRIOR + mean_x)  # b = SLOPE_PRIOR (A + b)
        slope = (self.sxy - self.sx * mean_y + ridge * prior) / (self.sxx - self.sx * mean_x + ridge)
        slope = max(0.0, slope)
        if (intercept := mean_y - slope * mean_x) < 0:  # all of it per row
            return 0.0, mean_y / mean_x
        return intercept, slope


@dataclass(frozen=True)
class StepRecord:
    """What the loop knows after one step (times in seconds; a model time is its batch's)."""

    requested: int  # drafts asked for (0: no Propose call)
    accepted: int  # drafts kept
    drafted: int = 0  # drafts proposed (an n-gram draft may propose fewer than asked)
    timed: bool = True  # False: a failover or a reopened session ran inside; times mean nothing
    propose_s: float = 0.0  # the Propose call's wall time
    propose_model_s: float = 0.0
    propose_batch: int = 1
    caught_up: int = 0  # committed tokens the draft appended first (1 after a drafting step)
    verify_s: float = 0.0
    verify_model_s: float = 0.0
    verify_batch: int = 1
    verify_rows: int = 0  # rows in the Verify's batch pass (0: not reported)
    drafted_ahead: bool = False  # the block was drafted ahead: no Propose in this step
    ahead_drafted: int = 0  # tokens drafted ahead during this step's Verify (0: none)
    ahead_model_s: float = 0.0
    ahead_batch: int = 1


@dataclass
class ReplicaCosts:
    """A (draft, target) replica pair's costs, from what its workers measure."""

    verify: PassLine = field(default_factory=PassLine)  # target model time vs the batch's rows
    batch: Ewma = field(default_factory=Ewma)  # B: steps per Verify batch
    verify_wait: Ewma = field(default_factory=Ewma)  # Verify wall time less its model time
    loop: Ewma = field(default_factory=Ewma)  # the loop's own time per step, outside both calls
    propose_wait: Ewma = field(default_factory=Ewma)  # Propose wall time less its model time
    draft_token: Ewma = field(default_factory=Ewma)  # d
    # A pass of one row (the target alone, unbatched) apart from the line: on a CPU a second row
    # cost 40-50% more (the toy pairs: 7.5 -> 11.5 ms), the rows after it ~10% each.
    one_row: Ewma = field(default_factory=Ewma)
    # The draft computes on a processor of its own (``drafts_overlap``): with B sessions sharing
    # the target, one session's drafting runs while the target serves the others.
    overlap: bool = False

    def observe(self, step: StepRecord) -> None:
        if not step.timed:
            return
        rows = step.verify_rows or step.drafted + 1
        self.verify.add(rows, step.verify_model_s)
        if rows == 1:
            self.one_row.add(step.verify_model_s)
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

    def step_costs(self, sharing: int = 1) -> StepCosts | None:
        """None until a Verify was measured; until a Propose was, SEEDED_COSTS' shares.

        ``sharing``: the sessions on the target replica that could share its passes (at most its
        --max-batch). B is the larger of that and the batches seen: drafting itself keeps Verify
        batches small (each session's Verify waits for its own Propose), so batches seen would
        price a step at k = 0 as if it ran alone, and a loaded replica would never fall to the
        target alone, where every session's step joins one pass. Where the draft has a processor of
        its own (``overlap``), a step pays only 1/B of the smaller of its draft and target parts:
        on the T5-shaped pair at 8 clients, k=3 ran at 1.18x the target alone, which a step that
        pays both in full prices below it."""
        intercept, per_row = self.verify.fit()
        batch = max(1.0, self.batch.value, float(sharing))
        fixed = (intercept + self.verify_wait.value + self.loop.value) / batch
        if self.verify.n == 0 or fixed + per_row <= 0:
            return None
        alone = self.one_row.value + self.verify_wait.value + self.loop.value if self.one_row.weight and batch < ALONE_BATCH else 0.0
        unit = alone or fixed + per_row  # a target-alone step
        propose = self.propose_wait.value / batch if self.propose_wait.weight else SEEDED_COSTS.propose * unit
        per_draft = self.draft_token.value if self.draft_token.weight else SEEDED_COSTS.per_draft * unit
        return StepCosts(fixed, per_row, propose, per_draft, alone, serial_share=1.0 / batch if self.overlap else 1.0)
