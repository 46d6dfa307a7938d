"""The k policy of num_draft=auto (``orchestrator/k_policy.py``, ``k_costs.py``) on simulated pairs with known
acceptance and known costs, and the loop running it against the fake backends of test_loop."""

from __future__ import annotations

import random

import pytest
import test_loop
from test_loop import FakeReplica, assert_clean, expected, generate, pair

from orchestrator.k_costs import ReplicaCosts, StepRecord
from orchestrator.k_policy import PROBE_GAP_MAX, KMemory, KPolicy

CAP = 8

# -- a simulated pair ---------------------------------------------------------------------------------


class Pair:
    """A target pass of r rows takes pass_fixed + per_row * r seconds (model time), a drafted
    token draft_s per step of the draft's batch (as big as the target's), a Propose call propose_s more, a Verify wait_s more and the loop loop_s; the
    step joins a batch of ``batch`` steps whose others bring about ``other_rows`` rows. Draft i is
    kept with chance ``rate`` when draft i-1 was (uniforms keyed by the step: the outcomes of a
    given k sequence are fixed)."""

    def __init__(self, rate: float, pass_fixed: float = 0.010, per_row: float = 0.001, draft_s: float = 0.002,
                 propose_s: float = 0.001, wait_s: float = 0.001, loop_s: float = 0.0005, batch: int = 1,
                 other_rows: int = 0, one_row_s: float = 0.0, seed: int = 0, sharing: int = 1):
        self.rate, self.pass_fixed, self.per_row, self.draft_s = rate, pass_fixed, per_row, draft_s
        self.propose_s, self.wait_s, self.loop_s, self.batch, self.other_rows = propose_s, wait_s, loop_s, batch, other_rows
        self.one_row_s = one_row_s  # a one-row pass's time, when it is off the line (0: on it)
        self.sharing = sharing  # sessions on the target that could share a pass (the pool's count)
        self.rng = random.Random(seed)
        self.tokens, self.seconds = 0, 0.0  # what the runs emitted, and their true time (batch 1)

    def pass_s(self, rows: int) -> float:
        return self.one_row_s if rows == 1 and self.one_row_s else self.pass_fixed + self.per_row * rows

    def step_s(self, k: int) -> float:
        """A step's true time at one client (batch 1)."""
        return self.pass_s(k + 1) + self.wait_s + self.loop_s + (self.propose_s + self.draft_s * k if k else 0.0)

    def tokens_per_second(self, k: int) -> float:
        """The true throughput of always drafting k at one client."""
        return sum(self.rate**i for i in range(k + 1)) / self.step_s(k)

    def best_k(self) -> int:
        return max(range(CAP + 1), key=self.tokens_per_second)

    def run(self, policy: KPolicy, steps: int, jitter: float = 0.0, k: int | None = None) -> list[int]:
        """Drive the policy ``steps`` steps; the ks it chose. ``jitter``: timings scaled by a
        random factor in [1 - jitter, 1 + jitter] (acceptance outcomes unchanged); ``k``: a fixed
        k instead of the policy's (its steps still teach the policy)."""
        timing = random.Random(self.rng.random())
        ks, caught_up = [], 1
        fixed_k = k
        for _ in range(steps):
            k = policy.choose(CAP, 0, self.sharing) if fixed_k is None else fixed_k
            accepted = 0
            while accepted < k and self.rng.random() < self.rate:
                accepted += 1
            scale = 1 + jitter * (2 * timing.random() - 1)
            rows = self.rng.randint(self.other_rows // 2, self.other_rows * 3 // 2) + k + 1  # the others' ks vary
            verify_model = self.pass_s(rows) * scale
            policy.observe(StepRecord(
                requested=k, accepted=accepted, drafted=k,
                propose_s=(self.propose_s + self.draft_s * k * self.batch) * scale if k else 0.0,
                propose_model_s=self.draft_s * k * self.batch * scale, propose_batch=self.batch,
                caught_up=caught_up, verify_s=verify_model + self.wait_s * scale, verify_model_s=verify_model,
                verify_batch=self.batch, verify_rows=rows))
            policy.observe_loop(self.loop_s * scale)
            caught_up = 1 if k else caught_up + 1
            ks.append(k)
            self.tokens, self.seconds = self.tokens + accepted + 1, self.seconds + self.step_s(k)
        return ks


def steady_k(ks: list[int]) -> float:
    """The mean k of the last half of a run."""
    tail = ks[len(ks) // 2:]
    return sum(tail) / len(tail)


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
    k = steady_k(simulated.run(KPolicy(timed=True), 3000))
    speed = simulated.tokens / simulated.seconds / simulated.tokens_per_second(best)
    print(f"acceptance {rate}: best k {best}, steady k {k:.2f}, {speed:.3f} x the best k's tokens/s")
    assert abs(k - best) <= 1
    assert speed >= 0.97  # the whole run, learning included, within 3% of the best k's throughput


def test_k_falls_as_a_row_of_the_batch_costs_more() -> None:
    """16 steps per batch, the others bringing 3 rows each: as a row's share of the pass grows,
    drafting buys less; at the largest, the target alone (k = 0 but for probes)."""
    ks = []
    for per_row in (0.00005, 0.0002, 0.0008, 0.003, 0.01):
        simulated = Pair(0.7, per_row=per_row, draft_s=0.00002, batch=16, other_rows=45, seed=5)
        ks.append(steady_k(simulated.run(KPolicy(timed=True), 1500)))
    print("steady k as a row costs more:", ks)
    assert all(a >= b for a, b in zip(ks[:-1], ks[1:], strict=True)) and ks[0] >= 3 and ks[-1] < 0.2


def test_k_is_smaller_in_a_big_batch_than_alone() -> None:
    """The same pass line: alone the step pays the pass's fixed part, in a batch of 16 a
    sixteenth of it, while its rows cost the same: fewer drafts pay."""
    ks = {}
    for batch in (1, 16):
        simulated = Pair(0.7, per_row=0.0008, draft_s=0.0003, batch=batch, other_rows=3 * (batch - 1), seed=6)
        ks[batch] = steady_k(simulated.run(KPolicy(timed=True), 1500))
    print("steady k alone and in a batch of 16:", ks)
    assert ks[16] <= ks[1] - 1


def test_sessions_that_could_share_a_pass_price_k0_as_batched_though_drafting_keeps_batches_small() -> None:
    """16 sessions on the target, but drafting keeps its Verify batches at 2 (each waits for its
    own Propose): priced by the batches seen, a step at k = 0 pays half a pass and drafting wins;
    priced by the 16 that would share a pass at k = 0, the target alone wins (T5-large's shape: a
    row ~6% of a pass, a drafted token ~12%). Alone, the same pair drafts."""
    ks = {}
    for sharing in (1, 16):
        simulated = Pair(0.6, pass_fixed=0.100, per_row=0.006, draft_s=0.006, batch=2, other_rows=3,
                         seed=8, sharing=sharing)
        ks[sharing] = steady_k(simulated.run(KPolicy(timed=True), 1500))
    print("steady k with 1 and 16 sessions sharing the target:", ks)
    assert ks[1] >= 1 and ks[16] < 0.2


def test_a_draft_on_a_processor_of_its_own_keeps_drafting_when_sessions_share_the_target() -> None:
    """The same pair and 16 sessions sharing the target as above, but the draft computes apart
    (``overlap``): a session's drafting runs while the target serves the others, so a step pays a
    sixteenth of its draft part and drafting still pays (at one session both price it alike)."""
    ks = {}
    for overlap in (False, True):
        simulated = Pair(0.6, pass_fixed=0.100, per_row=0.006, draft_s=0.006, batch=2, other_rows=3,
                         seed=8, sharing=16)
        ks[overlap] = steady_k(simulated.run(KPolicy(timed=True, costs=ReplicaCosts(overlap=overlap)), 1500))
    alone = Pair(0.6, pass_fixed=0.100, per_row=0.006, draft_s=0.006, seed=8)
    ks_alone = [steady_k(alone.run(KPolicy(timed=True, costs=ReplicaCosts(overlap=overlap)), 1500))
                for overlap in (False, True)]
    print("steady k at 16 sharing, draft shared / apart:", ks, "alone:", ks_alone)
    assert ks[False] < 0.2 and ks[True] >= 0.5  # (k=1 and k=0 are close here: it drafts most steps)
    assert abs(ks_alone[0] - ks_alone[1]) < 0.5


@pytest.mark.parametrize("draft, target, overlap", [
    (("a", "gpu"), ("a", "gpu"), False),  # one Apple GPU serves both
    (("a", "cpu"), ("a", "gpu"), False),
    (("a", "cpu"), ("a", "cpu"), True),  # cores of their own
    (("a", "gpu"), ("b", "gpu"), True),  # two hosts
    (("", ""), ("a", "cpu"), False),  # unknown (an older worker): as if shared
])
def test_whether_drafting_overlaps_the_target_follows_the_replicas_processors(
        draft: tuple[str, str], target: tuple[str, str], overlap: bool) -> None:
    from orchestrator.k_costs import drafts_overlap

    assert drafts_overlap(draft, target) is overlap


def test_a_draft_that_cannot_pay_is_left_then_found_again_by_a_probe() -> None:
    simulated = Pair(0.0, seed=7)
    policy = KPolicy(timed=True)
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
    ks = simulated.run(KPolicy(timed=True), 3000)
    assert sum(k > 0 for k in ks[500:]) <= 1.5 * 2500 / PROBE_GAP_MAX
    assert simulated.tokens / simulated.seconds >= 0.985 * simulated.tokens_per_second(0)


def test_a_one_row_pass_cheaper_than_the_line_is_measured_apart() -> None:
    """On a CPU a second row costs far more than the rows after it (the toy pairs: 7.5 ms for one
    row, 11.5 for two, ~1 ms a row on): a line through blocks of 1..9 rows puts a target-alone
    step too high, and drafting at an acceptance of 0.35 would look worth it. After steps at
    fixed k = 0, 1 and 8 (other requests on the replicas), auto k stays with the target alone."""
    simulated = Pair(0.35, pass_fixed=0.0105, per_row=0.001, one_row_s=0.0075, draft_s=0.0009,
                     propose_s=0.0003, wait_s=0.0003, loop_s=0.0002, seed=8)
    assert simulated.best_k() == 0
    policy = KPolicy(timed=True)
    for k in (0, 1, 8):
        simulated.run(policy, 100, k=k)
    simulated.tokens, simulated.seconds = 0, 0.0
    ks = simulated.run(policy, 400)
    assert sum(k > 0 for k in ks) <= 20, ks  # probes only (the line alone: ~140)
    assert simulated.tokens / simulated.seconds >= 0.97 * simulated.tokens_per_second(0)


def test_a_seeded_policys_ks_are_a_function_of_its_acceptance_alone() -> None:
    """Same acceptance outcomes, very different timings (and a different start in memory):
    the same ks. A timed policy given the same runs does follow the timings."""
    runs = {}
    for timed in (False, True):
        for costs in (dict(pass_fixed=0.01, draft_s=0.0005), dict(pass_fixed=0.001, draft_s=0.01)):
            memory = KMemory()
            memory.costs("pair").loop.add(0.05 if costs["draft_s"] > 0.005 else 0.0)
            policy = KPolicy(timed, memory.costs("pair"))
            runs[timed, costs["draft_s"]] = Pair(0.5, seed=9, **costs).run(policy, 300, jitter=0.5)
    assert runs[False, 0.0005] == runs[False, 0.01]
    assert runs[True, 0.0005] != runs[True, 0.01]


def test_a_seeded_policy_ignores_a_block_drafted_ahead_and_a_fork_predicts_its_next_k() -> None:
    policy = KPolicy(timed=False)
    for accepted in (3, 2, 3, 3):
        policy.observe(StepRecord(requested=3, accepted=accepted, drafted=3))
    forked = policy.fork()
    forked.observe(StepRecord(requested=3, accepted=3, drafted=3, timed=False))
    predicted = forked.choose(CAP)
    assert policy.acceptance.tried < forked.acceptance.tried  # the fork owns its counts
    policy.observe(StepRecord(requested=3, accepted=3, drafted=3))
    assert policy.choose(CAP, ready=1) == predicted >= 2


def test_a_timed_policy_stays_within_a_block_drafted_ahead() -> None:
    policy = KPolicy(timed=True)
    Pair(0.9, draft_s=0.0005, per_row=0.0002).run(policy, 200)
    assert policy.choose(CAP) >= 4 and policy.choose(CAP, ready=2) == 2


# -- the costs ----------------------------------------------------------------------------------------


def test_the_pass_line_is_fitted_from_batches_of_varying_rows() -> None:
    costs, rng = ReplicaCosts(), random.Random(1)
    for _ in range(300):
        rows = rng.randint(1, 80)
        model = 0.020 + 0.0005 * rows
        costs.observe(StepRecord(requested=0, accepted=0, verify_s=model + 0.003, verify_model_s=model,
                                 verify_batch=8, verify_rows=rows))
    intercept, per_row = costs.verify.fit()
    assert intercept == pytest.approx(0.020, rel=0.02) and per_row == pytest.approx(0.0005, rel=0.02)
    step = costs.step_costs()
    assert step is not None
    assert step.fixed == pytest.approx((0.020 + 0.003) / 8, rel=0.02) and step.per_row == pytest.approx(0.0005, rel=0.02)


def test_a_propose_after_steps_at_k0_or_an_untimed_step_teaches_no_cost() -> None:
    costs = ReplicaCosts()
    costs.observe(StepRecord(requested=2, accepted=0, drafted=2, propose_s=0.5, propose_model_s=0.4, caught_up=5,
                             verify_s=0.01, verify_model_s=0.01))
    costs.observe(StepRecord(requested=2, accepted=0, drafted=2, timed=False, propose_s=9, propose_model_s=9,
                             verify_s=9, verify_model_s=9))
    assert costs.draft_token.weight == costs.propose_wait.weight == 0 and costs.verify.n == 1


def test_requests_on_one_replica_pair_share_its_costs_and_hand_on_acceptance() -> None:
    memory = KMemory(capacity=2)
    first = KPolicy(True, memory.costs(("d0", "t0")))
    Pair(0.9, draft_s=0.0005, per_row=0.0002, seed=2).run(first, 100)
    memory.store(("d0", "t0", "greedy"), first.learned())
    second = KPolicy(True, memory.costs(("d0", "t0")), memory.recall(("d0", "t0", "greedy")))
    assert second.step_costs() == first.step_costs()
    assert second.acceptance.rate == pytest.approx(first.acceptance.rate, abs=0.02)
    assert second.choose(CAP) == first.choose(CAP) >= 4  # its first step already drafts long blocks
    seeded = KPolicy(False, memory.costs(("d0", "t0")), memory.recall(("d0", "t0", "greedy")))
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


def never_agrees(prompt: list[int], tokens: list[int]) -> int:
    return 2 + (test_loop.target_next(prompt, tokens) + 1) % (test_loop.VOCAB - 2)


def test_a_draft_that_never_agrees_leaves_the_target_alone_and_in_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_loop, "draft_next", never_agrees)
    replicas = pair()
    tokens, generation, source = generate(replicas, max_tokens=200, auto=True)
    assert tokens == expected(200)
    stats = generation.stats
    assert sum(stats.steps_per_num_draft) == stats.steps
    # (The fakes report no model time: drafting looks nearly free, so the first steps and the
    # probes draft long blocks before the estimate falls; the simulated pairs above test the rest.)
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


@pytest.mark.parametrize("hosts, overlap", [(("h", "h"), False), (("h", "g"), True)])
def test_the_loop_tells_the_replica_pairs_costs_whether_drafting_overlaps(hosts: tuple[str, str],
                                                                          overlap: bool) -> None:
    """From the replicas' Info (hostname, device): two GPUs on one host are one Apple GPU."""
    import asyncio

    from orchestrator.params import GenerationParams
    from orchestrator.speculative import SpeculativeGeneration
    from specdec_core.steps import SamplingParams

    replicas = pair()
    for replica in replicas:
        replica.processor = (hosts[0] if replica.role == "draft" else hosts[1], "gpu")
    memory = KMemory()
    source = test_loop.FakeSource(replicas)
    params = GenerationParams(max_tokens=20, num_draft=3, num_draft_auto=True, sampling=SamplingParams(), seed=1)
    generation = SpeculativeGeneration(source, test_loop.PROMPT, params, test_loop.START, test_loop.EOS,
                                       k_memory=memory)

    async def run() -> None:
        async for _ in generation.run():
            pass

    asyncio.run(run())
    assert generation.k_policy is not None and generation.k_policy.costs.overlap is overlap
    assert_clean(replicas, source)
