"""The planner of num_draft=auto and drafting ahead (``orchestrator/planner.py``, ``estimates.py``):
against its own docstring formula on constructed costs, on simulated pairs with known acceptance and
known costs, learning from observations whether drafting slows the target, and the loop running it
against the fake backends of test_loop."""

from __future__ import annotations

import asyncio
import random

import pytest
import test_loop
from test_loop import FakeReplica, assert_clean, expected, generate

from orchestrator.estimates import Acceptance, Costs, PairCosts, PlanMemory, StepRecord
from orchestrator.planner import PROBE_GAP_MAX, Planner
from specdec_core.steps import Proposal, StepRequest, Verdict

CAP = 8

# -- a simulated pair ---------------------------------------------------------------------------------


class Pair:
    """A target pass of r rows takes pass_fixed + per_row * r seconds (model time), a drafted
    token draft_s per step of the draft's batch (as big as the target's), a Propose call propose_s
    more, a Verify wait_s more and the loop loop_s; the step joins a batch of ``batch`` steps whose
    others bring about ``other_rows`` rows. With chance ``beside`` another session's draft pass runs
    during the pass, for a random part of it, and slows it by ``share`` of its length. Draft i is
    kept with chance ``rate`` when draft i-1 was (uniforms keyed by the step: the outcomes of a
    given k sequence are fixed). Times are placed on a clock, as the loop places them."""

    def __init__(self, rate: float, pass_fixed: float = 0.010, per_row: float = 0.001, draft_s: float = 0.002,
                 propose_s: float = 0.001, wait_s: float = 0.001, loop_s: float = 0.0005, batch: int = 1,
                 other_rows: int = 0, passes: dict[int, float] | None = None, seed: int = 0, sharing: int = 1,
                 beside: float = 0.0, share: float = 1.0, spikes: float = 0.0, busy: float = 1.0):
        self.rate, self.pass_fixed, self.per_row, self.draft_s = rate, pass_fixed, per_row, draft_s
        self.propose_s, self.wait_s, self.loop_s, self.batch, self.other_rows = propose_s, wait_s, loop_s, batch, other_rows
        self.passes = passes or {}  # passes whose time is off the line, by rows
        self.sharing = sharing  # sessions on the target that could share a pass (the pool's count)
        self.beside, self.share = beside, share
        self.spikes = spikes  # the chance that a pass runs 2.5x long (another process's burst)
        self.busy = busy  # with others on the target: the share of a Propose during which it runs their pass
        self.rng = random.Random(seed)
        self.tokens, self.seconds = 0, 0.0  # what the runs emitted, and their true time (batch 1)
        self.clock = 100.0

    def pass_s(self, rows: int) -> float:
        return self.passes.get(rows, self.pass_fixed + self.per_row * rows)

    def step_s(self, k: int) -> float:
        """A step's true time at one client (batch 1)."""
        return self.pass_s(k + 1) + self.wait_s + self.loop_s + (self.propose_s + self.draft_s * k if k else 0.0)

    @staticmethod
    def verifying_others(planner: Planner, end: float, seconds: float) -> None:
        if seconds > 0:
            planner.pair.verifying.add(end, seconds)

    def tokens_per_second(self, k: int) -> float:
        """The true throughput of always drafting k at one client."""
        return sum(self.rate**i for i in range(k + 1)) / self.step_s(k)

    def best_k(self) -> int:
        return max(range(CAP + 1), key=self.tokens_per_second)

    def run(self, planner: Planner, steps: int, jitter: float = 0.0, k: int | None = None) -> list[int]:
        """Drive the planner ``steps`` steps; the ks it chose. ``jitter``: timings scaled by a
        random factor in [1 - jitter, 1 + jitter] (acceptance outcomes unchanged); ``k``: a fixed
        k instead of the planner's (its steps still teach it)."""
        timing = random.Random(self.rng.random())
        ks, caught_up = [], 1
        fixed_k = k
        for _ in range(steps):
            k = planner.choose(CAP, 0, self.sharing) if fixed_k is None else fixed_k
            accepted = 0
            while accepted < k and self.rng.random() < self.rate:
                accepted += 1
            scale = 1 + jitter * (2 * timing.random() - 1)
            rows = self.rng.randint(self.other_rows // 2, self.other_rows * 3 // 2) + k + 1  # the others' ks vary
            propose_model = self.draft_s * k * self.batch * scale
            propose_s = (self.propose_s + self.draft_s * k * self.batch) * scale if k else 0.0
            propose_end = self.clock + propose_s
            if propose_s and max(self.batch, self.sharing) > 1:  # the others' passes while this one drafts
                self.verifying_others(planner, propose_end, self.busy * propose_s)
            verify_model = self.pass_s(rows) * scale * (2.5 if timing.random() < self.spikes else 1.0)
            if timing.random() < self.beside:  # another session drafts during this pass
                drafting = timing.uniform(0.1, 1.0) * verify_model
                planner.pair.drafting.add(propose_end + drafting, drafting)
                verify_model += self.share * drafting
            verify_end = propose_end + verify_model + self.wait_s * scale
            planner.observe(StepRecord(
                requested=k, accepted=accepted, drafted=k,
                propose_s=propose_s, propose_model_s=propose_model, propose_batch=self.batch, propose_end=propose_end,
                caught_up=caught_up, verify_s=verify_end - propose_end, verify_model_s=verify_model,
                verify_batch=self.batch, verify_rows=rows, verify_end=verify_end))
            planner.observe_loop(self.loop_s * scale)
            self.clock = verify_end + self.loop_s * scale
            caught_up = 1 if k else caught_up + 1
            ks.append(k)
            self.tokens, self.seconds = self.tokens + accepted + 1, self.seconds + self.step_s(k)
        return ks


def steady_k(ks: list[int]) -> float:
    """The mean k of the last half of a run."""
    tail = ks[len(ks) // 2:]
    return sum(tail) / len(tail)


# -- the rule, recomputed from the docstring's formula ------------------------------------------------


def formula_time(costs: Costs, k: int, drafting: bool = True) -> float:
    """T(k) as planner.py's docstring writes it."""
    a, o, b, p, d, B, s, c, h = (costs.fixed, costs.wait, costs.per_row, costs.propose, costs.per_draft,
                                 costs.batch, costs.share, costs.split, costs.hidden)
    t = costs.passes[k] + o if k < len(costs.passes) else a / (B / (1 + c * k)) + b * (k + 1) + o / B
    u = p / B + d * k if k > 0 and drafting else 0.0
    return t + (1 - h + h * (s + (1 - s) / B)) * u


def formula_k(rate: float, costs: Costs, cap: int, drafting: bool = True) -> int:
    """The k in [0, cap] with the most E(k) / T(k), the smallest on a tie."""
    goodput = [sum(rate**i for i in range(k + 1)) / formula_time(costs, k, drafting) for k in range(cap + 1)]
    return goodput.index(max(goodput))


def random_costs(rng: random.Random) -> Costs:
    return Costs(fixed=rng.uniform(0.005, 0.3), wait=rng.uniform(0.0, 0.1), per_row=rng.uniform(0.0, 0.02),
                 propose=rng.uniform(0.0, 0.01),
                 per_draft=rng.uniform(0.0005, 0.05),
                 passes=rng.choice([(), tuple(rng.uniform(0.005, 0.3) for _ in range(rng.randint(1, 9)))]),
                 batch=rng.choice([1.0, 1.0, rng.uniform(1.0, 16.0)]), share=rng.choice([0.0, 1.0, rng.random()]),
                 split=rng.choice([0.0, rng.uniform(0.0, 1.0)]), hidden=rng.choice([1.0, rng.random()]))


def planner_at(rate: float, costs: Costs, monkeypatch: pytest.MonkeyPatch, timed: bool = True) -> Planner:
    """A planner whose acceptance estimate is ``rate`` and whose pair's costs are ``costs``."""
    monkeypatch.setattr(PairCosts, "costs", lambda self, sharing=1: costs)
    planner = Planner(timed)
    planner.acceptance = Acceptance(tried=20.0, kept=rate * 21.0 - 0.5)
    assert planner.acceptance.rate == pytest.approx(rate)
    return planner


def test_the_chosen_k_is_the_docstrings_goodput_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    rng, chosen = random.Random(5), set()
    for _ in range(400):
        costs, rate, cap = random_costs(rng), rng.uniform(0.02, 0.98), rng.randint(1, 16)
        ready = rng.choice([0, rng.randint(1, cap)])
        planner = planner_at(rate, costs, monkeypatch)
        k = planner.choose(cap, ready)
        # (k = 0 on a first step: a probe comes only after PROBE_GAP_MIN such steps)
        want = formula_k(rate, costs, min(ready, cap), drafting=False) if ready else formula_k(rate, costs, cap)
        assert k == want, (costs, rate, cap, ready)
        chosen.add(k)
    assert len(chosen) >= 6  # the cases span short and long blocks, and the target alone


def formula_ahead(rate: float, costs: Costs, k: int, k_next: int, sizes: list[int]) -> int:
    """The n of ``sizes`` with the most V(n), if V(n) > 0 (0: none), as the docstring writes it."""
    def value(n: int) -> float:
        u = costs.propose / costs.batch + costs.per_draft * (n + 1)
        t_k = costs.passes[k] + costs.wait if k < len(costs.passes) else (
            costs.fixed / (costs.batch / (1 + costs.split * k)) + costs.per_row * (k + 1) + costs.wait / costs.batch)
        saved = formula_time(costs, n) - formula_time(costs, n, drafting=False)
        return rate ** (k + 1) * saved - costs.share * u - max(0.0, u - t_k) / costs.batch

    values = [value(n) for n in sizes]
    best = sizes[values.index(max(values))]
    return best if value(best) > 0 else 0


def test_drafting_ahead_follows_the_docstrings_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    rng, answers = random.Random(6), set()
    for _ in range(400):
        costs, rate = random_costs(rng), rng.uniform(0.02, 0.98)
        k, k_next = rng.randint(1, 8), rng.randint(1, 8)
        timed = rng.random() < 0.7
        planner = planner_at(rate, costs, monkeypatch, timed)
        want = formula_ahead(rate, costs, k, k_next, list(range(1, k_next + 1)) if timed else [k_next])
        assert planner.ahead(k, k_next) == want, (costs, rate, k, k_next, timed)
        answers.add((want == 0, 0 < want < k_next, want == k_next))
    # none, a shorter block than the next k, and all of it each happen
    assert answers == {(True, False, False), (False, True, False), (False, False, True)}


def test_drafting_ahead_is_charged_to_the_target_only_where_they_share_a_processor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A block drafted ahead with a 30% hit chance: free where the draft computes apart, not worth
    its drafts where every second of them is taken from the target."""
    apart = Costs(fixed=0.25, per_row=0.01, propose=0.005, per_draft=0.03, share=0.0)
    shared = Costs(fixed=0.25, per_row=0.01, propose=0.005, per_draft=0.03, share=1.0)
    rate = 0.3 ** (1 / 4)  # all 3 drafts and the guess right: 30%
    assert planner_at(rate, apart, monkeypatch).ahead(3, 3) == 3
    assert planner_at(rate, shared, monkeypatch).ahead(3, 3) == 0


def test_a_draft_ahead_that_would_outlast_the_verify_is_cut_to_what_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft apart (drafting ahead costs the target nothing) but slow: 1 + 8 drafted tokens take
    longer than the Verify of 3 they run beside, and the step waits for both. A timed request drafts
    a shorter block ahead; a seeded one, whose next step takes all 8 or none, drafts none."""
    slow = Costs(fixed=0.25, per_row=0.01, propose=0.005, per_draft=0.08, share=0.0)
    assert 0 < planner_at(0.9, slow, monkeypatch).ahead(3, 8) < 8
    assert planner_at(0.9, slow, monkeypatch, timed=False).ahead(3, 8) == 0


# -- the choice ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate, draft_s, per_row", [
    (0.9, 0.0005, 0.0002),  # a cheap draft that nearly always agrees: long blocks
    (0.8, 0.002, 0.001),
    (0.6, 0.002, 0.001),
    (0.6, 0.004, 0.003),  # rows and drafts cost more: shorter blocks
    (0.4, 0.001, 0.0005),
])
def test_the_steady_k_at_one_client_is_the_best_k_within_one(rate: float, draft_s: float, per_row: float) -> None:
    simulated = Pair(rate, draft_s=draft_s, per_row=per_row, seed=3)
    best = simulated.best_k()
    k = steady_k(simulated.run(Planner(timed=True), 3000))
    speed = simulated.tokens / simulated.seconds / simulated.tokens_per_second(best)
    print(f"acceptance {rate}: best k {best}, steady k {k:.2f}, {speed:.3f} x the best k's tokens/s")
    assert abs(k - best) <= 1
    assert speed >= 0.97  # the whole run, learning included, within 3% of the best k's throughput


def test_k_falls_as_a_row_of_the_batch_costs_more() -> None:
    """16 steps per batch, the others bringing 3 rows each: as a row's share of the pass grows,
    drafting buys less; at the largest, the target alone (k = 0 but for probes)."""
    ks = []
    for per_row in (0.00005, 0.0002, 0.0008, 0.003, 0.01):
        simulated = Pair(0.7, per_row=per_row, draft_s=0.00002, batch=16, other_rows=45, seed=5, beside=0.5)
        ks.append(steady_k(simulated.run(Planner(timed=True), 1500)))
    print("steady k as a row costs more:", ks)
    assert all(a >= b for a, b in zip(ks[:-1], ks[1:], strict=True)) and ks[0] >= 3 and ks[-1] < 0.2


def test_k_is_smaller_in_a_big_batch_than_alone() -> None:
    """The same pass line: alone the step pays the pass's fixed part, in a batch of 16 a
    sixteenth of it, while its rows cost the same: fewer drafts pay."""
    ks = {}
    for batch in (1, 16):
        simulated = Pair(0.7, per_row=0.0008, draft_s=0.0003, batch=batch, other_rows=3 * (batch - 1), seed=6,
                         beside=0.5)
        ks[batch] = steady_k(simulated.run(Planner(timed=True), 1500))
    print("steady k alone and in a batch of 16:", ks)
    assert ks[16] <= ks[1] - 1


def test_sessions_that_could_share_a_pass_price_k0_as_batched_though_drafting_keeps_batches_small() -> None:
    """16 sessions on the target, but drafting keeps its Verify batches at 2 (each waits for its
    own Propose): priced by the batches seen, a step at k = 0 pays half a pass and drafting wins;
    priced by the 16 that would share a pass at k = 0, the target alone wins (T5-large's shape: a
    row ~6% of a pass, a drafted token ~12%; the draft shares the target's processor). Alone, the
    same pair drafts."""
    ks = {}
    for sharing in (1, 16):
        simulated = Pair(0.6, pass_fixed=0.100, per_row=0.006, draft_s=0.006, batch=2, other_rows=3,
                         seed=8, sharing=sharing, beside=0.5)
        ks[sharing] = steady_k(simulated.run(Planner(timed=True), 1500))
    print("steady k with 1 and 16 sessions sharing the target:", ks)
    assert ks[1] >= 1 and ks[16] < 0.2


def test_a_draft_on_a_processor_of_its_own_keeps_drafting_when_sessions_share_the_target() -> None:
    """The same shapes and 16 sessions sharing the target as above, at an acceptance of 0.8, where the
    draft's time decides: where the passes show that the draft computes apart (other sessions' drafting
    beside a pass does not slow it: s learned ~0), a session's drafting runs while the target serves
    the others, a step pays a sixteenth of its draft part and drafting pays; where each second of
    drafting lengthens the pass by one, it does not. Alone, both price it alike."""
    ks, learned = {}, {}
    for share in (1.0, 0.0):
        simulated = Pair(0.8, pass_fixed=0.100, per_row=0.006, draft_s=0.006, batch=2, other_rows=3,
                         seed=8, sharing=16, beside=0.5, share=share)
        planner = Planner(timed=True)
        ks[share] = steady_k(simulated.run(planner, 1500))
        learned[share] = planner.pair.costs().share
    ks_alone = [steady_k(Pair(0.8, pass_fixed=0.100, per_row=0.006, draft_s=0.006, seed=8, beside=0.5,
                              share=share).run(Planner(timed=True), 1500)) for share in (1.0, 0.0)]
    print("steady k at 16 sharing, draft shared / apart:", ks, "learned share:", learned, "alone:", ks_alone)
    assert learned[1.0] > 0.8 and learned[0.0] < 0.2
    assert ks[1.0] < 0.2 and ks[0.0] >= 1
    assert abs(ks_alone[0] - ks_alone[1]) < 0.5


@pytest.mark.parametrize("share", [0.0, 0.4, 1.0])
def test_the_share_of_the_drafts_time_taken_from_the_target_is_learned_from_its_passes(share: float) -> None:
    """Passes with and without another session drafting beside them, of varying rows: the fit
    finds the pass's line and how much a second of drafting beside it lengthens it."""
    pair_costs, rng, clock = PairCosts(), random.Random(3), 10.0
    for _ in range(400):
        rows, beside = rng.randint(1, 40), rng.choice([0.0, rng.uniform(0.002, 0.02)])
        model = 0.020 + 0.0005 * rows + share * beside
        clock += 0.1
        if beside:
            pair_costs.drafting.add(clock - model + beside, beside)  # it starts with the pass
        pair_costs.observe_pass(StepRecord(requested=0, accepted=0, verify_s=model, verify_model_s=model,
                                           verify_rows=rows, verify_end=clock))
    intercept, per_row, learned = pair_costs.verify.fit()
    assert learned == pytest.approx(share, abs=0.05)
    assert intercept == pytest.approx(0.020, rel=0.05) and per_row == pytest.approx(0.0005, rel=0.05)


def test_under_load_drafting_is_priced_by_how_much_of_it_the_target_spends_serving_the_others() -> None:
    """8 sessions on a target with a draft of its own processor (s = 0): where the target runs the
    others' passes through a session's Propose (h = 1), drafting costs the target 1/8 of it and pays;
    where it mostly waits for the Proposes too (h = 0.2: on a 2-core machine shared with the
    orchestrator and the clients, the target idled while they drafted), it does not."""
    ks, learned = {}, {}
    for busy in (1.0, 0.2):
        simulated = Pair(0.6, pass_fixed=0.100, per_row=0.006, draft_s=0.010, batch=8, other_rows=8,
                         seed=8, sharing=8, beside=0.5, share=0.0, busy=busy)
        planner = Planner(timed=True)
        ks[busy] = steady_k(simulated.run(planner, 1500))
        learned[busy] = planner.pair.costs(8).hidden
    print("steady k with the target busy / mostly idle through a Propose:", ks, "learned h:", learned)
    assert learned[1.0] == pytest.approx(1.0, abs=0.05) and learned[0.2] == pytest.approx(0.2, abs=0.05)
    assert ks[1.0] >= 1 and ks[0.2] < 0.2


def test_drafting_that_splits_the_sessions_passes_is_priced_by_the_batch_it_gets() -> None:
    """8 sessions could share the target's pass, but drafting steps' Verifies run in batches of 3 at
    k = 3 (each waits for its own Propose): c = (8 / 3 - 1) / 3, and a pair priced with it drafts less
    than one whose drafting steps kept their batches full."""
    split, full = PairCosts(), PairCosts()
    for pair_costs, batch in ((split, 3), (full, 8)):
        for _ in range(100):
            record = StepRecord(requested=3, accepted=2, drafted=3, propose_s=0.03, propose_model_s=0.02,
                                caught_up=1, verify_s=0.2, verify_model_s=0.15, verify_batch=batch,
                                verify_rows=4 * batch, sharing=8)
            pair_costs.observe(record)
            pair_costs.observe_pass(record)
    assert split.costs(8).split == pytest.approx((8 / 3 - 1) / 3) and full.costs(8).split == 0.0
    ks = {}
    for name, pair_costs in (("split", split), ("full", full)):
        planner = Planner(timed=True, pair=pair_costs)
        planner.acceptance = Acceptance(tried=20.0, kept=0.8 * 21.0 - 0.5)
        ks[name] = planner.choose(CAP, sharing=8)
    assert ks["split"] < ks["full"], ks


def test_a_timed_planner_under_load_probes_as_much_less_often_as_sessions_share_the_target() -> None:
    counts = {}
    for sharing in (1, 8):
        planner = Planner(timed=True)
        costs = Costs(fixed=0.1, per_row=0.01, propose=0.01, per_draft=0.05, batch=float(sharing))
        planner.pair.costs = lambda sharing=1, costs=costs: costs  # type: ignore[method-assign]
        planner.acceptance = Acceptance(tried=20.0, kept=0.05 * 21.0 - 0.5)  # drafting never pays
        counts[sharing] = sum(planner.choose(CAP, sharing=sharing) > 0 for _ in range(2000))
    assert counts[8] < counts[1] / 4 and counts[8] >= 1, counts


def test_draft_passes_of_one_batch_count_once_beside_a_pass() -> None:
    pair_costs = PairCosts()
    for end, length in ((1.010, 0.010), (1.010, 0.010), (1.030, 0.005), (0.990, 0.5)):
        pair_costs.drafting.add(end, length)  # two sessions in one draft pass; one long done before
    assert pair_costs.drafting.overlap(1.005, 1.028) == pytest.approx(0.005 + 0.003)


def test_a_planner_learns_that_drafting_ahead_costs_the_target_where_they_share_a_processor() -> None:
    """One client, pipelined: the passes the loop saw with the request's own block drafted ahead
    beside them, and without. Where the draft takes the target's processor (each second of drafting
    lengthens the pass by one), drafting ahead at a 20% hit chance stops; where it computes apart it
    goes on, at any hit chance."""
    decisions = {}
    for share in (0.0, 1.0):
        planner, clock, rng = Planner(timed=True), 10.0, random.Random(4)
        for step in range(200):
            ahead = step % 2 == 1  # every other step drafted ahead (after a hit, the next one did not)
            k = rng.randint(2, 5)
            drafting = 0.004 * (k + 1) if ahead else 0.0
            model = 0.050 + 0.003 * (k + 1) + share * drafting
            propose_end, clock = clock + 0.002 + 0.004 * k, clock + 0.002 + 0.004 * k + model + 0.001
            planner.observe(StepRecord(
                requested=k, accepted=k // 2, drafted=k, propose_s=0.002 + 0.004 * k, propose_model_s=0.004 * k,
                propose_end=propose_end, caught_up=1, verify_s=model + 0.001, verify_model_s=model,
                verify_rows=k + 1, verify_end=clock, ahead_drafted=k + 1 if ahead else 0, ahead_model_s=drafting,
                ahead_end=propose_end + drafting if ahead else 0.0))
        planner.settle()
        assert planner.pair.costs().share == pytest.approx(share, abs=0.1)
        planner.acceptance = Acceptance(tried=20.0, kept=0.2 ** (1 / 4) * 21.0 - 0.5)
        decisions[share] = planner.ahead(3, 3)
    assert decisions == {0.0: 3, 1.0: 0}


def test_a_probe_accepted_against_the_odds_probes_again_at_once_under_load_too() -> None:
    for sharing in (1, 8):
        planner = Planner(timed=True)
        costs = Costs(fixed=0.1, per_row=0.01, propose=0.01, per_draft=0.05, batch=float(sharing))
        planner.pair.costs = lambda sharing=1, costs=costs: costs  # type: ignore[method-assign]
        planner.acceptance = Acceptance(tried=20.0, kept=0.05 * 21.0 - 0.5)  # drafting does not pay
        steps = 0
        while (k := planner.choose(CAP, sharing=sharing)) == 0:
            planner.observe(StepRecord(requested=0, accepted=0, timed=False))
            steps += 1
        assert steps == 4 * sharing  # PROBE_GAP_MIN x B steps at k = 0, then a probe
        planner.observe(StepRecord(requested=k, accepted=k, drafted=k, timed=False))  # all kept
        assert planner.choose(CAP, sharing=sharing) > 0, sharing


def test_a_draft_that_cannot_pay_is_left_then_found_again_by_a_probe() -> None:
    simulated = Pair(0.0, seed=7)
    policy = Planner(timed=True)
    ks = simulated.run(policy, 400)
    drafting = sum(k > 0 for k in ks[100:])
    assert drafting <= 300 / PROBE_GAP_MAX * 2, drafting  # probes only, ever more rarely
    assert drafting >= 1  # ... but still probes
    simulated.rate = 0.95  # the text turns to something the draft knows
    ks = simulated.run(policy, 2 * PROBE_GAP_MAX + 40)
    assert steady_k(ks[-40:]) >= 3, ks


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_probes_of_a_draft_that_agrees_but_does_not_pay_stay_rare(rate: float) -> None:
    """A draft too slow to pay at this acceptance: some probes are accepted, but the gap keeps
    growing (about one probe in PROBE_GAP_MAX steps, as for a draft that is always wrong), and
    the run stays within 1.5% of the target alone."""
    simulated = Pair(rate, draft_s=0.006, propose_s=0.002, seed=4)
    assert simulated.best_k() == 0
    ks = simulated.run(Planner(timed=True), 3000)
    assert sum(k > 0 for k in ks[500:]) <= 1.5 * 2500 / PROBE_GAP_MAX
    assert simulated.tokens / simulated.seconds >= 0.985 * simulated.tokens_per_second(0)


def test_a_one_row_pass_cheaper_than_the_line_is_measured_apart() -> None:
    """On a CPU a second row costs far more than the rows after it (the toy pairs: 7.5 ms for one
    row, 11.5 for two, ~1 ms a row on): a line through blocks of 1..9 rows puts a target-alone
    step too high, and drafting at an acceptance of 0.35 would look worth it. After steps at
    fixed k = 0, 1 and 8 (other requests on the replicas), auto k stays with the target alone."""
    simulated = Pair(0.35, pass_fixed=0.0105, per_row=0.001, passes={1: 0.0075}, draft_s=0.0009,
                     propose_s=0.0003, wait_s=0.0003, loop_s=0.0002, seed=8)
    assert simulated.best_k() == 0
    policy = Planner(timed=True)
    for k in (0, 1, 8):
        simulated.run(policy, 100, k=k)
    simulated.tokens, simulated.seconds = 0, 0.0
    ks = simulated.run(policy, 400)
    assert sum(k > 0 for k in ks) <= 20, ks  # probes only (the line alone: ~140)
    assert simulated.tokens / simulated.seconds >= 0.97 * simulated.tokens_per_second(0)


def test_at_one_client_k_follows_the_passes_as_measured_where_they_do_not_grow_with_rows() -> None:
    """The T5-large-shaped target with a 2-layer draft of its width, as measured through the services
    on a 2-core CPU: a pass of 3 rows took 185 ms, one of 4 rows 131 ms, and one pass in 20 ran 2.5x
    long (other processes' bursts). A line through them makes k = 2 look about as good as k = 3, and
    a pass's last time would follow the bursts; the passes as measured find k = 3."""
    measured = {1: 0.145, 2: 0.148, 3: 0.185, 4: 0.131, 5: 0.168, 6: 0.170, 7: 0.176, 8: 0.181, 9: 0.186}
    simulated = Pair(0.78, draft_s=0.028, propose_s=0.001, wait_s=0.002, loop_s=0.001, passes=measured, seed=0,
                     spikes=0.05)
    assert simulated.best_k() == 3
    ks = simulated.run(Planner(timed=True), 3000)
    speed = simulated.tokens / simulated.seconds / simulated.tokens_per_second(3)
    at_best = ks[300:].count(3) / len(ks[300:])
    print(f"{at_best:.2f} of the steps at k = 3, {speed:.3f} x its tokens/s")
    assert at_best >= 0.9 and speed >= 0.97  # (the line's fit: ~0.75 of the steps, 0.94-0.96x)


def test_an_s_that_stopped_drafting_ahead_is_measured_again() -> None:
    """One client, blocks drafted ahead usually hit. For 30 steps the draft shares the target's
    processor (each second drafted beside a pass lengthens it by one: s ~1, drafting ahead does not
    pay); then it has cores of its own (s = 0.1: it pays). Once s stops drafting ahead, no pass has
    drafting beside it and nothing could correct s; every PROBE_GAP_MAX steps that s decides, one
    does the other, so s is measured again and drafting ahead comes back."""
    planner, clock, rng = Planner(timed=True), 10.0, random.Random(12)
    ahead_at = []
    for step in range(400):
        planner.acceptance = Acceptance(tried=20.0, kept=0.9 * 21.0 - 0.5)
        n = planner.ahead(3, rng.randint(1, 5)) if step >= 30 else rng.randint(0, 5)
        drafting = 0.03 * (n + 1) if n else 0.0
        model = (0.131 + (1.0 if step < 30 else 0.1) * drafting) * rng.uniform(0.97, 1.03)
        propose_end, clock = clock + 0.09, clock + 0.09 + model + 0.002
        planner.observe(StepRecord(
            requested=3, accepted=3, drafted=3, propose_s=0.09, propose_model_s=0.084, propose_end=propose_end,
            caught_up=1, verify_s=model + 0.002, verify_model_s=model, verify_rows=4, verify_end=clock,
            ahead_drafted=n + 1 if n else 0, ahead_model_s=drafting, ahead_end=propose_end + drafting if n else 0.0))
        ahead_at.append(n > 0)
    assert not any(ahead_at[30:50])  # s ~1: held back
    assert sum(ahead_at[-100:]) >= 90, sum(ahead_at[-100:])  # ... measured again: back
    assert planner.pair.costs().share < 0.3


def test_a_seeded_planners_ks_are_a_function_of_its_acceptance_alone() -> None:
    """Same acceptance outcomes, very different timings (a draft sharing the target or not, and a
    different start in memory): the same ks. A timed planner given the same runs follows the timings."""
    runs = {}
    for timed in (False, True):
        for costs in (dict(pass_fixed=0.01, draft_s=0.0005, share=0.0), dict(pass_fixed=0.001, draft_s=0.01)):
            memory = PlanMemory()
            memory.costs("pair").loop.add(0.05 if costs["draft_s"] > 0.005 else 0.0)
            planner = Planner(timed, memory.costs("pair"))
            runs[timed, costs["draft_s"]] = Pair(0.5, seed=9, beside=0.5, **costs).run(planner, 300, jitter=0.5)
    assert runs[False, 0.0005] == runs[False, 0.01]
    assert runs[True, 0.0005] != runs[True, 0.01]


def test_a_seeded_planner_ignores_a_block_drafted_ahead_and_predicts_its_next_k() -> None:
    planner = Planner(timed=False)
    for accepted in (3, 2, 3, 3):
        planner.observe(StepRecord(requested=3, accepted=accepted, drafted=3))
    tried = planner.acceptance.tried
    predicted = planner.next_k(3, CAP)
    assert planner.acceptance.tried == tried  # the prediction leaves the planner as it was
    planner.observe(StepRecord(requested=3, accepted=3, drafted=3))
    assert planner.choose(CAP, ready=1) == predicted >= 2


def test_a_timed_planner_stays_within_a_block_drafted_ahead() -> None:
    planner = Planner(timed=True)
    Pair(0.9, draft_s=0.0005, per_row=0.0002).run(planner, 200)
    assert planner.choose(CAP) >= 4 and planner.choose(CAP, ready=2) == 2


# -- the costs ----------------------------------------------------------------------------------------


def test_the_pass_line_is_fitted_from_batches_of_varying_rows() -> None:
    costs, rng = PairCosts(), random.Random(1)
    for _ in range(300):
        rows = rng.randint(1, 80)
        model = 0.020 + 0.0005 * rows
        record = StepRecord(requested=0, accepted=0, verify_s=model + 0.003, verify_model_s=model,
                            verify_batch=8, verify_rows=rows)
        costs.observe(record)
        costs.observe_pass(record)
    intercept, per_row, share = costs.verify.fit()
    assert intercept == pytest.approx(0.020, rel=0.02) and per_row == pytest.approx(0.0005, rel=0.02)
    assert share == 0.0  # nothing ran beside a pass: nothing to tell it by
    step = costs.costs()
    assert (step.fixed + step.wait) / step.batch == pytest.approx((0.020 + 0.003) / 8, rel=0.02)
    assert step.per_row == pytest.approx(0.0005, rel=0.02)


def test_a_propose_after_steps_at_k0_or_an_untimed_step_teaches_no_cost() -> None:
    planner = Planner(timed=True)
    planner.observe(StepRecord(requested=0, accepted=0, verify_s=0.01, verify_model_s=0.01))  # the cold first pass
    planner.observe(StepRecord(requested=2, accepted=0, drafted=2, propose_s=0.5, propose_model_s=0.4, caught_up=5,
                               verify_s=0.01, verify_model_s=0.01))
    planner.observe(StepRecord(requested=2, accepted=0, drafted=2, timed=False, propose_s=9, propose_model_s=9,
                               verify_s=9, verify_model_s=9))
    planner.settle()
    costs = planner.pair
    assert costs.draft_token.weight == costs.propose_wait.weight == 0 and costs.verify.n == 1


def test_requests_on_one_replica_pair_share_its_costs_and_hand_on_acceptance() -> None:
    memory = PlanMemory(capacity=2)
    first = Planner(True, memory.costs(("d0", "t0")))
    Pair(0.9, draft_s=0.0005, per_row=0.0002, seed=2).run(first, 100)
    memory.store(("d0", "t0", "greedy"), first.learned())
    second = Planner(True, memory.costs(("d0", "t0")), memory.recall(("d0", "t0", "greedy")))
    assert second.costs() == first.costs()
    assert second.acceptance.rate == pytest.approx(first.acceptance.rate, abs=0.02)
    assert second.choose(CAP) == first.choose(CAP) >= 4  # its first step already drafts long blocks
    seeded = Planner(False, memory.costs(("d0", "t0")), memory.recall(("d0", "t0", "greedy")))
    assert seeded.acceptance.tried == 0  # a seeded request knows itself only
    memory.costs("x"), memory.costs("y")
    assert memory.costs(("d0", "t0")).verify.n == 0  # bounded: the least recently used went first


def test_the_batch_a_step_ran_in_crosses_the_wire() -> None:
    """What the costs are fitted from reaches the orchestrator through gRPC's messages."""
    from specdec_core.steps import Proposal, Verdict
    from specdec_grpc.wire import proposal_from_pb, proposal_to_pb, verdict_from_pb, verdict_to_pb

    verdict = verdict_from_pb(verdict_to_pb(Verdict([1, 2], [], [], 5, model_ms=3.5, batch_size=4, batch_rows=11)))
    assert (verdict.model_ms, verdict.batch_size, verdict.batch_rows) == (3.5, 4, 11)
    proposal = proposal_from_pb(proposal_to_pb(Proposal([7], [1.0], [], 3, model_ms=1.5, batch_size=3)))
    assert (proposal.model_ms, proposal.batch_size) == (1.5, 3)


# -- through the loop ---------------------------------------------------------------------------------


class TimedFake(FakeReplica):
    """A worker that takes and reports a model time: a target pass 2 ms, a drafted token 0.5 ms."""

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        result = await super().step(request)
        result.model_ms = 2.0 if self.role == "target" else 0.5 * len(result.tokens)
        await asyncio.sleep(result.model_ms / 1e3)
        return result


def never_agrees(prompt: list[int], tokens: list[int]) -> int:
    return 2 + (test_loop.target_next(prompt, tokens) + 1) % (test_loop.VOCAB - 2)


def test_a_draft_that_never_agrees_leaves_the_target_alone_and_in_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_loop, "draft_next", never_agrees)
    replicas = [TimedFake("draft", "d0"), TimedFake("target", "t0")]
    tokens, generation, source = generate(replicas, max_tokens=200, auto=True)
    assert tokens == expected(200)
    stats = generation.stats
    assert sum(stats.steps_per_num_draft) == stats.steps
    assert stats.steps_per_num_draft[0] >= 0.6 * stats.steps
    assert stats.accepted == 0 and stats.proposed > 0
    # Probes after runs of k = 0 append every committed token the draft session lacked: the
    # right tokens at the right place (the fake checks each call's expected length; a mismatch
    # would have been a failover).
    assert stats.failovers == 0
    draft = next(r for r in replicas if r.role == "draft" and r.requests)
    for request in draft.requests:
        start = request.rollback_to or request.expected_length
        assert request.append_tokens == generation.decoded[start : start + len(request.append_tokens)]
    assert max(len(r.append_tokens) for r in draft.requests) >= 3  # some after two steps at k = 0 or more
    assert_clean(replicas, source)


def test_auto_k_respects_the_replicas_max_draft_at_every_step() -> None:
    replicas = [FakeReplica("draft", "d0", max_draft=3), FakeReplica("target", "t0", max_draft=4)]
    tokens, generation, source = generate(replicas, k=8, auto=True)  # the fake raises above the cap
    assert tokens == expected()
    assert len(generation.stats.steps_per_num_draft) <= 4
    assert_clean(replicas, source)


def test_the_loop_places_each_pass_in_time_for_the_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's record says when its Propose, Verify and block drafted ahead came back, each after
    its own model time; a block drafted ahead ran beside the step's Verify."""
    monkeypatch.setitem(vars(test_loop), "draft_next", test_loop.target_next)  # every block drafted ahead is used
    records: list[StepRecord] = []
    observe = Planner.observe
    monkeypatch.setattr(Planner, "observe", lambda self, step: (records.append(step), observe(self, step))[1])
    replicas = [TimedFake("draft", "d0"), TimedFake("target", "t0")]
    tokens, generation, source = generate(replicas, max_tokens=30, k=3)
    assert tokens == expected(30)
    ahead = [r for r in records if r.ahead_drafted]
    assert ahead and all(r.ahead_end - r.ahead_model_s >= r.verify_end - r.verify_s - 1e-3 for r in ahead)
    assert all(r.verify_end >= r.propose_end + r.verify_model_s for r in records)
    assert generation.planner is not None and generation.planner.pair.drafting.passes
    assert_clean(replicas, source)


class SharedSource(test_loop.FakeSource):
    """Eight sessions share every target replica."""

    def sessions_sharing(self, backend: FakeReplica) -> int:
        return 8 if backend.role == "target" else 1


def test_the_first_k_chosen_while_the_target_opens_is_priced_with_the_sessions_sharing_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelined, the first step's k is chosen while the target's session is still opening; under load
    that step's Verify shares the replica's pass like any other, so it is priced with the sessions on
    the replica chosen for it, not as a step alone."""
    import asyncio as aio

    from orchestrator.params import GenerationParams
    from orchestrator.speculative import SpeculativeGeneration
    from specdec_core.steps import SamplingParams

    asked: list[int] = []
    choose = Planner.choose
    monkeypatch.setattr(Planner, "choose", lambda self, cap, ready=0, sharing=1: (asked.append(sharing),
                                                                                    choose(self, cap, ready, sharing))[1])
    draft, target = FakeReplica("draft", "d0"), test_loop.SlowOpeningTarget("target", "t0")
    target.draft = draft
    source = SharedSource([draft, target])
    params = GenerationParams(max_tokens=20, num_draft=3, num_draft_auto=True, sampling=SamplingParams(), seed=1)
    generation = SpeculativeGeneration(source, test_loop.PROMPT, params, test_loop.START, test_loop.EOS)

    async def run() -> list[int]:
        return [t async for event in generation.run() for t in event.tokens]

    assert aio.run(run()) == expected(20)
    assert asked and set(asked) == {8}, asked
    assert_clean([draft, target], source)
