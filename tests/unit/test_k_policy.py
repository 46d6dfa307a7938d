"""The k policy of num_draft=auto (``orchestrator/k_policy.py``) on simulated pairs, and the loop
running it against the fake backends of test_loop (no MLX, no servers)."""

from __future__ import annotations

import copy
import random

import pytest
import test_loop
from test_loop import FakeReplica, assert_clean, expected, generate, pair

from orchestrator.k_policy import (
    FIXED_COSTS,
    PROBE_GAP_MAX,
    UNTIMED_PROBE_GAP_MIN,
    CostModel,
    KMemory,
    KPolicy,
    MeasuredCosts,
    StepRecord,
    best_k,
)

# -- a simulated pair ---------------------------------------------------------------------------------


class SimulatedPair:
    """A draft/target pair with known per-position acceptance and known costs (seconds).

    Acceptance is keyed by decoder position, as the real loop's randomness is: the draft at
    output position p is accepted iff uniforms[p] < rate of its draft position. So for a given k
    sequence the outcomes are fixed, whatever the timings."""

    def __init__(self, rates: list[float], costs: CostModel, seed: int = 0):
        self.rates = rates
        self.costs = costs
        rng = random.Random(seed)
        self.uniforms = [rng.random() for _ in range(100_000)]
        self.position = 0

    def step(self, k: int) -> tuple[int, StepRecord]:
        """Run one step with k drafts; the tokens emitted and what the loop would record."""
        accepted = 0
        while accepted < k and self.uniforms[self.position + accepted] < self.rates[min(accepted, len(self.rates) - 1)]:
            accepted += 1
        self.position += accepted + 1
        c = self.costs
        propose_model = c.draft_per_token * k
        record = StepRecord(
            requested=k, accepted=accepted, drafted=k,
            propose_s=c.propose_call + propose_model if k else 0.0, propose_model_s=propose_model,
            caught_up=1, verify_s=c.overhead + c.verify_per_token * (k + 1),
        )
        return accepted + 1, record

    def true_rate(self, k: int) -> float:
        return expected_by_enumeration(self.rates, k) / self.costs.step_time(k)


def run(policy: KPolicy, sim: SimulatedPair, steps: int, cap: int = 16) -> list[int]:
    """Run the policy on the pair for ``steps`` steps; the k of each."""
    ks = []
    for _ in range(steps):
        k = policy.choose(cap)
        _, record = sim.step(k)
        policy.observe(record)
        ks.append(k)
    return ks


def expected_by_enumeration(rates: list[float], k: int) -> float:
    """E(k) from the distribution of the number accepted: exactly j kept (then one rejected, or
    j = k) gives j + 1 tokens. Independent of the policy's cumulative-product form."""
    total = 0.0
    for j in range(k + 1):
        kept = 1.0
        for i in range(j):
            kept *= rates[min(i, len(rates) - 1)]
        stop = 1.0 - rates[min(j, len(rates) - 1)] if j < k else 1.0
        total += (j + 1) * kept * stop
    return total


def random_costs(rng: random.Random) -> CostModel:
    verify = rng.uniform(0.002, 0.05)
    return CostModel(overhead=verify, verify_per_token=verify * rng.uniform(0, 0.1),
                     propose_call=verify * rng.uniform(0, 0.3), draft_per_token=verify * rng.uniform(0.01, 0.6))


# -- the choice ------------------------------------------------------------------------------------------


def test_best_k_is_the_brute_force_maximum_of_the_expected_rate() -> None:
    rng = random.Random(1)
    for _ in range(500):
        cap = rng.randint(0, 16)
        rates = [rng.random() ** rng.choice([0.2, 1, 3]) for _ in range(max(cap, 1))]
        costs = random_costs(rng)
        low = rng.choice([0, 0, min(1, cap)])
        rate = {k: expected_by_enumeration(rates, k) / costs.step_time(k) for k in range(low, cap + 1)}
        best = max(rate.values())
        chosen = best_k(rates, costs, low, cap)
        assert low <= chosen <= cap
        assert rate[chosen] == pytest.approx(best, rel=1e-9)
        assert chosen == min(k for k, r in rate.items() if r >= best * (1 - 1e-9))  # ties: the smaller k


@pytest.mark.parametrize("timed", [True, False])
def test_nothing_accepted_and_a_costly_draft_means_the_target_alone(timed: bool) -> None:
    sim = SimulatedPair([0.0], CostModel(0.010, 0.0002, 0.001, 0.002))
    ks = run(KPolicy(timed), sim, 100, cap=8)
    assert ks[0] > 0  # a fresh request tries drafting
    assert ks[1] == 0  # one rejection is enough to stop
    assert sum(k > 0 for k in ks) <= 8  # then only probes
    assert max(ks[1:]) == 1  # each drafting a single token


def test_everything_accepted_and_a_cheap_draft_means_the_longest_blocks() -> None:
    sim = SimulatedPair([1.0], CostModel(0.010, 0.0001, 0.0005, 0.0002))
    ks = run(KPolicy(True), sim, 30, cap=16)
    assert ks[-10:] == [16] * 10


@pytest.mark.parametrize("case", range(24))
def test_the_timed_policy_reaches_the_best_rate_of_a_simulated_pair(case: int) -> None:
    """Over many steps, the throughput it achieves (probes and learning included, past a
    warm-up) is within 5% of the best fixed k's, whose expected rate is known exactly."""
    rng = random.Random(100 + case)
    base = rng.choice([0.02, 0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99])
    rates = [min(1.0, max(0.0, base + rng.uniform(-0.05, 0.05))) for _ in range(16)]
    sim = SimulatedPair(rates, random_costs(rng), seed=case)
    ks = run(KPolicy(True), sim, 1200)
    achieved = sum(expected_by_enumeration(rates, k) for k in ks[200:]) / sum(
        sim.costs.step_time(k) for k in ks[200:])
    best = max(sim.true_rate(k) for k in range(17))
    assert achieved >= 0.95 * best, (rates[0], ks[-20:], achieved / best)


# -- the measured costs -----------------------------------------------------------------------------------


def test_measured_costs_recover_the_verify_line_and_the_draft_split() -> None:
    costs = MeasuredCosts()
    for k in [0, 1, 2, 3, 4, 5, 6, 7] * 5:
        costs.observe(StepRecord(requested=k, accepted=0, drafted=k, propose_s=0.0015 + 0.002 * k,
                                 propose_model_s=0.002 * k, caught_up=1, verify_s=0.010 + 0.0004 * (k + 1)))
    for _ in range(5):
        costs.loop.add(0.001)
    model = costs.model()
    assert model is not None
    assert model.overhead == pytest.approx(0.011, rel=0.05)  # the Verify's fixed part + the loop's
    assert model.verify_per_token == pytest.approx(0.0004, rel=0.15)
    assert model.propose_call == pytest.approx(0.0015, rel=0.01)
    assert model.draft_per_token == pytest.approx(0.002, rel=0.01)


def test_a_catch_up_after_steps_at_k0_or_a_failover_does_not_count_as_drafting_cost() -> None:
    costs = MeasuredCosts()
    normal = StepRecord(requested=2, accepted=0, drafted=2, propose_s=0.005, propose_model_s=0.004, caught_up=1,
                        verify_s=0.01)
    for _ in range(5):
        costs.observe(normal)
    before = costs.model()
    costs.observe(StepRecord(requested=1, accepted=0, drafted=1, propose_s=0.05, propose_model_s=0.045,
                             caught_up=30, verify_s=0.01))
    costs.observe(StepRecord(requested=2, accepted=0, drafted=2, propose_s=0.5, propose_model_s=0.004,
                             caught_up=1, verify_s=0.5, timed=False))
    after = costs.model()
    assert before is not None and after is not None
    assert (after.propose_call, after.draft_per_token) == (before.propose_call, before.draft_per_token)
    # The catch-up's Verify was an ordinary one; the failover's 0.5 s is not counted.
    assert after.step_time(2) - after.propose_call - 2 * after.draft_per_token == pytest.approx(0.01, rel=0.01)


def _costs_after(*runs: tuple[int, StepRecord]) -> CostModel:
    """The cost model of MeasuredCosts fed each (times, record) in turn."""
    costs = MeasuredCosts()
    for times, record in runs:
        for _ in range(times):
            costs.observe(record)
    model = costs.model()
    assert model is not None
    return model


def test_a_block_drafted_ahead_does_not_count_as_a_free_propose() -> None:
    """A step whose block was drafted ahead made no Propose call: its ~0 s must not teach the
    policy that drafting is free (which made auto k draft 8-16 tokens at acceptance 0.1)."""
    model = _costs_after(
        (3, StepRecord(requested=3, accepted=3, drafted=3, caught_up=0, verify_s=0.01, drafted_ahead=True)),
        (10, StepRecord(requested=3, accepted=1, drafted=3, propose_s=0.0045, propose_model_s=0.003, caught_up=1,
                        verify_s=0.01)),
    )
    assert model.propose_call == pytest.approx(0.0015, rel=0.01)
    assert model.draft_per_token == pytest.approx(0.001, rel=0.01)


def test_a_draft_whose_every_block_was_drafted_ahead_still_has_its_model_time_measured() -> None:
    """A draft that nearly always agrees has every block drafted ahead: the ahead Proposes' model
    time teaches the draft's per-token cost (not FIXED_COSTS' share, not 0); their wall time, which
    overlaps the Verify, never teaches propose_call."""
    ahead = StepRecord(requested=4, accepted=4, drafted=4, caught_up=0, verify_s=0.01, drafted_ahead=True,
                       ahead_drafted=5, ahead_model_s=0.0035)
    costs = MeasuredCosts()
    for _ in range(20):
        costs.observe(ahead)
    # A failover inside a step: its ahead call's time means nothing.
    costs.observe(StepRecord(requested=4, accepted=4, drafted=4, timed=False, verify_s=0.5, drafted_ahead=True,
                             ahead_drafted=5, ahead_model_s=0.5))
    model = costs.model()
    assert model is not None
    assert model.draft_per_token == pytest.approx(0.0007, rel=0.01)
    assert costs.propose_call.weight == 0  # not measured: FIXED_COSTS' share stands in
    assert model.propose_call == pytest.approx(FIXED_COSTS.propose_call * model.step_time(0))
    # A step with its own Propose and an ahead one: propose_call from its own call only.
    model = _costs_after((10, StepRecord(requested=3, accepted=3, drafted=3, propose_s=0.0045, propose_model_s=0.003,
                                         caught_up=1, verify_s=0.01, ahead_drafted=4, ahead_model_s=0.004)))
    assert model.propose_call == pytest.approx(0.0015, rel=0.01)
    assert model.draft_per_token == pytest.approx(0.001, rel=0.01)


def test_estimates_that_reached_zero_still_follow_the_samples() -> None:
    """The clip (4x the current value) must not pin an estimate that read 0 at 0."""
    model = _costs_after(
        (3, StepRecord(requested=2, accepted=0, drafted=2, caught_up=1)),  # every time 0
        (30, StepRecord(requested=2, accepted=0, drafted=2, propose_s=0.006, propose_model_s=0.004, caught_up=1,
                        verify_s=0.01)),
    )
    assert model.draft_per_token == pytest.approx(0.002, rel=0.1)
    assert model.propose_call == pytest.approx(0.002, rel=0.1)
    verify_of_three = model.step_time(2) - model.propose_call - 2 * model.draft_per_token
    assert verify_of_three == pytest.approx(0.01, rel=0.1)


def test_one_stall_moves_the_costs_by_a_bounded_step() -> None:
    costs = MeasuredCosts()
    for _ in range(10):
        costs.observe(StepRecord(requested=1, accepted=0, drafted=1, propose_s=0.003, propose_model_s=0.002,
                                 caught_up=1, verify_s=0.01))
    costs.observe(StepRecord(requested=1, accepted=0, drafted=1, propose_s=1.0, propose_model_s=0.002,
                             caught_up=1, verify_s=0.01))
    model = costs.model()
    assert model is not None and model.propose_call < 0.0015  # clipped to 4x, then averaged in


# -- a block drafted ahead --------------------------------------------------------------------------------


def _policy_after(timed: bool) -> KPolicy:
    """A policy that learned a pair at acceptance 0.8 whose Proposes cost enough to keep k near 4."""
    policy = KPolicy(timed)
    run(policy, SimulatedPair([0.8] * 16, CostModel(0.010, 0.0002, 0.003, 0.002), seed=0), 200, cap=8)
    return policy


def test_a_timed_policy_uses_a_block_drafted_ahead_in_full() -> None:
    """Its tokens cost no Propose in this step: cutting them short would waste them."""
    policy = _policy_after(timed=True)
    usual = copy.deepcopy(policy).choose(8)
    assert 0 < usual < 6
    for ready in range(1, 7):
        chosen = copy.deepcopy(policy)
        assert chosen.choose(8, ready=ready) == ready
        assert chosen.idle == 0 and not chosen.probing  # a drafting step, as probing counts them
    assert copy.deepcopy(policy).choose(3, ready=6) == 3  # never past the cap


def test_an_untimed_policy_ignores_a_block_drafted_ahead() -> None:
    """Its k decides which positions are drafts, so it must not depend on pipelining."""
    policy = _policy_after(timed=False)
    usual = copy.deepcopy(policy).choose(8)
    assert 0 < usual < 8  # (a block ready up to the cap would change a timed policy's choice)
    assert [copy.deepcopy(policy).choose(8, ready=ready) for ready in range(10)] == [usual] * 10


@pytest.mark.parametrize("timed", [True, False])
def test_a_forked_policy_answers_as_a_deep_copy_and_leaves_the_original_alone(timed: bool) -> None:
    """``fork`` is what pipelining asks "k after a full acceptance?" of, every step: it must
    answer exactly as a deep copy would (seeded requests depend on it) and change nothing."""
    rng = random.Random(7)
    policy = KPolicy(timed)
    pair_ = SimulatedPair([0.7, 0.6, 0.5, 0.5], CostModel(0.01, 0.001, 0.001, 0.002), seed=5)
    for step in range(120):  # through drafting, k = 0 streaks and probes
        before = copy.deepcopy(policy)
        k = rng.randrange(1, 6)
        forked, deep = policy.fork(), copy.deepcopy(policy)
        for probe in (forked, deep):
            probe.observe(StepRecord(requested=k, accepted=k, drafted=k, timed=False))
        assert forked.choose(8) == deep.choose(8), step
        assert vars(policy.acceptance) == vars(before.acceptance)
        assert (policy.idle, policy.gap, policy.probing, policy.probe_again, policy.long_shot) == (
            before.idle, before.gap, before.probing, before.probe_again, before.long_shot)
        run(policy, pair_, 1)


# -- exactness: the untimed policy -----------------------------------------------------------------------


def test_the_untimed_policy_ignores_timings() -> None:
    """The same pair (acceptance keyed by position) measured fast or slow: the untimed policy
    chooses the same k sequence, the timed one does not (so the timings do differ in kind)."""
    rates = [0.6] * 16
    fast_draft = CostModel(0.020, 0.0005, 0.0002, 0.0005)
    slow_draft = CostModel(0.002, 0.0001, 0.004, 0.006)
    sequences = {}
    for timed in (False, True):
        for name, costs in (("fast", fast_draft), ("slow", slow_draft)):
            sequences[timed, name] = run(KPolicy(timed), SimulatedPair(rates, costs, seed=3), 150)
    assert sequences[False, "fast"] == sequences[False, "slow"]
    assert sequences[True, "fast"] != sequences[True, "slow"]
    assert sum(sequences[True, "slow"][20:]) < sum(sequences[True, "fast"][20:])


def test_the_untimed_policy_uses_fixed_costs_and_no_memory() -> None:
    memory = KMemory()
    low = KPolicy(True)
    never = SimulatedPair([0.0], CostModel(0.01, 0, 0.001, 0.002))
    run(low, never, 40)
    while low.idle:  # up to a probe, so that the next steps are not probes
        run(low, never, 1)
    memory.store("pair", low.learned())
    untimed = KPolicy(False, memory.recall("pair"))
    assert untimed.cost_model() == FIXED_COSTS
    assert untimed.choose(16) == KPolicy(False).choose(16) > 0  # a fresh start, not the memory's
    assert KPolicy(True, memory.recall("pair")).choose(16) == 0  # a timed one starts from it


# -- probing -----------------------------------------------------------------------------------------------


def test_at_k0_it_probes_ever_more_rarely_and_recovers_when_drafts_start_to_pass() -> None:
    costs = CostModel(0.010, 0.0002, 0.001, 0.002)
    policy = KPolicy(True)
    ks = run(policy, SimulatedPair([0.0], costs), 1000)
    probes = [i for i, k in enumerate(ks) if k > 0]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps[0] <= 8  # a first rejection is soon re-checked (while the costs are still being learned)
    assert gaps[1:] == sorted(gaps[1:]) and gaps[-1] >= 50  # then ever more rarely, up to the ceiling
    assert all(gap <= PROBE_GAP_MAX + 1 for gap in gaps)
    assert len(probes) <= 30
    # The pair changes (say, the text turns to copying the prompt): the next probe finds out.
    ks = run(policy, SimulatedPair([1.0], costs), PROBE_GAP_MAX + 20)
    assert all(k > 0 for k in ks[-10:])


def test_an_untimed_request_probes_a_rare_draft_less_often_and_still_comes_back() -> None:
    """No memory to start from: on a pair that rarely agrees an untimed request pays mostly for
    its probes, so it probes less often than a timed one with the same costs (no fewer than
    UNTIMED_PROBE_GAP_MIN steps apart), and still finds a draft that starts to agree."""
    def probes(policy: KPolicy, steps: int) -> list[int]:
        return [i for i, k in enumerate(run(policy, SimulatedPair([0.1], FIXED_COSTS), steps)) if k > 0]

    timed_with_fixed_costs = KPolicy(True)
    timed_with_fixed_costs.cost_model = lambda: FIXED_COSTS  # type: ignore[method-assign]
    untimed = KPolicy(False)
    seen, reference = probes(untimed, 48), probes(timed_with_fixed_costs, 48)
    assert 1 <= len(seen) < len(reference)
    assert all(b - a > UNTIMED_PROBE_GAP_MIN for a, b in zip(seen[1:], seen[2:], strict=False))
    ks = run(untimed, SimulatedPair([1.0], FIXED_COSTS), PROBE_GAP_MAX + 20)
    assert all(k > 0 for k in ks[-10:])


# -- memory ------------------------------------------------------------------------------------------------


def test_memory_hands_costs_and_acceptance_to_the_next_timed_request_and_is_bounded() -> None:
    memory = KMemory(capacity=2)
    first = KPolicy(True)
    run(first, SimulatedPair([1.0], CostModel(0.010, 0.0001, 0.0005, 0.0002)), 30)
    memory.store("a", first.learned())
    assert KPolicy(True, memory.recall("a")).choose(16) == 16  # no warm-up
    memory.store("b", first.learned())
    memory.store("c", first.learned())
    assert memory.recall("a") is None and memory.recall("c") is not None


# -- the loop ----------------------------------------------------------------------------------------------


def never_agrees(prompt: list[int], tokens: list[int]) -> int:
    return 2 + (test_loop.target_next(prompt, tokens) + 1) % (test_loop.VOCAB - 2)


def test_a_draft_that_never_agrees_leaves_the_target_alone_and_in_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_loop, "draft_next", never_agrees)
    replicas = pair()
    tokens, generation, source = generate(replicas, max_tokens=200, auto=True)
    assert tokens == expected(200)
    stats = generation.stats
    assert sum(stats.steps_per_num_draft) == stats.steps
    assert stats.steps_per_num_draft[0] >= 0.7 * stats.steps  # (timed: the fakes' microseconds are noisy)
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
