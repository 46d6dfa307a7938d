"""The speculative loop (``orchestrator/speculative.py``) against fake backends, without MLX or
servers: greedy output must equal the fake target's own greedy output whatever happens to
the replicas, and no session may be left open anywhere."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from orchestrator.backend_protocol import ReplicaError, ReplicaFailure
from orchestrator.estimates import DECAY, Costs, PairCosts
from orchestrator.params import GenerationParams
from orchestrator.planner import Planner
from orchestrator.speculative import SpeculativeGeneration
from specdec_core.errors import (
    DeadlineExceeded,
    PrefixMismatch,
    ResourceExhausted,
    SessionNotFound,
    Unavailable,
)
from specdec_core.steps import Distribution, Proposal, SamplingParams, StepRequest, Verdict

START, EOS, VOCAB = 0, 1, 11


def target_next(prompt: list[int], tokens: list[int]) -> int:
    """The fake target's greedy choice after ``tokens`` (EOS once the output is long enough)."""
    if len(tokens) > 30:
        return EOS
    return 2 + (sum(prompt) * 3 + sum(tokens) * 5 + len(tokens) * 7) % (VOCAB - 2)


def draft_next(prompt: list[int], tokens: list[int]) -> int:
    """The fake draft agrees with the target about 3 times in 4."""
    right = target_next(prompt, tokens)
    mix = (sum(t * (i + 1) for i, t in enumerate(tokens)) * 2654435761) % 1009
    return right if mix % 4 else 2 + (right + 1) % (VOCAB - 2)


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = [START]
    while len(tokens) - 1 < max_tokens:
        tokens.append(target_next(prompt, tokens))
        if tokens[-1] == EOS:
            break
    return tokens[1:]


@dataclass
class Fault:
    """Make call number ``at`` (counted over all calls of ``method`` on this replica) fail."""

    method: str  # "open" or "step"
    at: int
    kind: str  # "down", "full", "lost" (session vanished), "malformed"


@dataclass
class FakeReplica:
    role: str
    address: str
    faults: list[Fault] = field(default_factory=list)
    max_draft: int = 0
    max_batch: int = 0
    draft_method: str = "model"
    sessions: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # id -> (prompt, tokens)
    calls: dict[str, int] = field(default_factory=lambda: {"open": 0, "step": 0})
    opened: int = 0
    requests: list[StepRequest] = field(default_factory=list)

    def _fault(self, method: str) -> str | None:
        n = self.calls[method]
        self.calls[method] += 1
        return next((f.kind for f in self.faults if f.method == method and f.at == n), None)

    def _raise(self, kind: str) -> None:
        if kind == "down":
            raise ReplicaError(self.address, ReplicaFailure.DOWN, "connection refused")
        if kind == "full":
            raise ResourceExhausted(f"{self.role} {self.address} is full")

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        await asyncio.sleep(0)
        kind = self._fault("open")
        if kind:
            self._raise(kind)
        self.opened += 1
        session_id = f"{self.address}/{self.opened}"
        self.sessions[session_id] = (list(prompt_ids), [START])
        return session_id

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        await asyncio.sleep(0)
        self.requests.append(request)
        kind = self._fault("step")
        if kind in ("down", "full"):
            self._raise(kind)
        if kind == "lost":
            self.sessions.pop(request.session_id, None)
        if request.session_id not in self.sessions:
            raise ReplicaError(self.address, ReplicaFailure.SESSION_LOST, str(SessionNotFound("gone")))
        prompt, tokens = self.sessions[request.session_id]
        if request.expected_length != len(tokens):
            raise ReplicaError(self.address, ReplicaFailure.SESSION_LOST, str(PrefixMismatch("length")))
        if self.max_draft and request.num_draft > self.max_draft:
            raise AssertionError(f"k={request.num_draft} above this replica's max_draft {self.max_draft}")
        if request.rollback_to:
            del tokens[request.rollback_to :]
        tokens.extend(request.append_tokens)
        if self.role == "draft":
            drafted = []
            for _ in range(request.num_draft):
                drafted.append(draft_next(prompt, tokens))
                tokens.append(drafted[-1])
                if drafted[-1] == EOS:
                    break
            result = Proposal(drafted, [1.0] * len(drafted), length=len(tokens))
            if kind == "malformed":
                result.tokens = result.tokens + [2] * (request.num_draft + 1 - len(drafted))
        else:
            k = request.num_draft
            argmax = [target_next(prompt, tokens[: len(tokens) - k + j]) for j in range(k + 1)]
            result = Verdict(argmax[:-1] if kind == "malformed" else argmax, [], [], length=len(tokens))
        return result

    async def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


class FakeSource:
    """Hands out the least-used healthy replica of a role, like ReplicaPool."""

    def __init__(self, replicas: list[FakeReplica]):
        self.replicas = replicas
        self.in_use: dict[str, int] = {r.address: 0 for r in replicas}
        self.reported: list[tuple[str, Exception]] = []

    def acquire(self, role: str, exclude: set[str]) -> FakeReplica | None:
        free = [r for r in self.replicas if r.role == role and r.address not in exclude]
        if not free:
            return None
        replica = min(free, key=lambda r: self.in_use[r.address])
        self.in_use[replica.address] += 1
        return replica

    def release(self, backend: FakeReplica) -> None:
        self.in_use[backend.address] -= 1

    def report_failure(self, backend: FakeReplica, error: Exception) -> None:
        self.reported.append((backend.address, error))

    def sessions_sharing(self, backend: FakeReplica) -> int:
        return 1


PROMPT = [5, 9, 4]


def generate(replicas: list[FakeReplica], max_tokens: int = 40, k: int = 3, auto: bool = False,
             speculative: bool = True, pipeline: bool = True, sampling: SamplingParams | None = None,
             **params_: object) -> tuple[list[int], SpeculativeGeneration, FakeSource]:
    source = FakeSource(replicas)
    params = GenerationParams(max_tokens=max_tokens, num_draft=k, num_draft_auto=auto,
                              sampling=sampling or SamplingParams(), seed=1, speculative=speculative,
                              pipeline=pipeline,
                              **params_)  # type: ignore[arg-type]
    generation = SpeculativeGeneration(source, PROMPT, params, START, EOS)

    async def run() -> list[int]:
        out: list[int] = []
        async for event in generation.run():
            out.extend(event.tokens)
        await asyncio.sleep(0.01)  # let background closes of abandoned sessions run
        return out

    tokens = asyncio.run(run())
    return tokens, generation, source


def expected(max_tokens: int = 40) -> list[int]:
    return [t for t in reference(PROMPT, max_tokens) if t != EOS]


def assert_clean(replicas: list[FakeReplica], source: FakeSource) -> None:
    assert all(not r.sessions for r in replicas), {r.address: r.sessions for r in replicas}
    assert all(n == 0 for n in source.in_use.values()), source.in_use


def pair(**faults: list[Fault]) -> list[FakeReplica]:
    return [FakeReplica("draft", "d0", faults.get("d0", [])), FakeReplica("draft", "d1", faults.get("d1", [])),
            FakeReplica("target", "t0", faults.get("t0", [])), FakeReplica("target", "t1", faults.get("t1", []))]


# -- no faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_equals_the_target_alone(k: int) -> None:
    replicas = pair()
    tokens, generation, source = generate(replicas, k=k)
    assert tokens == expected()
    stats = generation.stats
    assert generation.stats.tokens == len(reference(PROMPT, 40))
    assert stats.accepted <= stats.proposed and stats.target_passes == stats.steps
    assert stats.tokens == stats.accepted + stats.target_tokens
    assert 0 < stats.accepted < stats.proposed  # the fake draft is right 3 times in 4
    assert_clean(replicas, source)


def test_eos_inside_a_drafted_block_ends_the_generation() -> None:
    full = reference(PROMPT, 1000)
    assert full[-1] == EOS
    # k large enough that EOS falls inside a block the draft proposes
    tokens, generation, _ = generate(pair(), max_tokens=1000, k=8)
    assert tokens == full[:-1] and generation.stats.tokens == len(full)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 7])
def test_max_tokens_mid_block_is_never_exceeded(max_tokens: int) -> None:
    tokens, generation, _ = generate(pair(), max_tokens=max_tokens, k=5)
    assert tokens == expected(max_tokens)
    assert generation.stats.tokens == max_tokens
    assert all(r.num_draft <= max(0, max_tokens - 1) for r in generation.source.replicas[0].requests)


def test_target_alone_when_speculation_is_off() -> None:
    replicas = pair()
    tokens, generation, _ = generate(replicas, speculative=False)
    assert tokens == expected() and generation.stats.proposed == 0
    assert not replicas[0].opened and not replicas[1].opened


class SlowOpeningTarget(FakeReplica):
    """A target whose open finishes only once the draft has been asked for a block (or after a
    timeout): a loop that opened the two lanes one after the other would wait it out."""

    draft: FakeReplica | None = None
    overlapped: bool = False

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        for _ in range(200):
            if self.draft is not None and self.draft.requests:
                self.overlapped = True
                break
            await asyncio.sleep(0.001)
        return await super().open(prompt_ids, request_id, timeout)


@pytest.mark.parametrize("pipeline", [True, False])
def test_pipelined_start_drafts_the_first_block_while_the_target_opens(pipeline: bool) -> None:
    draft, target = FakeReplica("draft", "d0"), SlowOpeningTarget("target", "t0")
    target.draft = draft
    source = FakeSource([draft, target])
    params = GenerationParams(max_tokens=40, num_draft=3, sampling=SamplingParams(), seed=1, pipeline=pipeline)
    generation = SpeculativeGeneration(source, PROMPT, params, START, EOS)

    async def run() -> list[int]:
        return [t async for event in generation.run() for t in event.tokens]

    assert asyncio.run(run()) == expected()
    assert target.overlapped == pipeline  # serial (the baseline): the draft waits for the target
    first = draft.requests[0]
    assert first.num_draft == 3 and first.expected_length == 1 and not first.append_tokens
    assert_clean([draft, target], source)


class DraftReportingModelTime(FakeReplica):
    """A draft whose worker takes and reports 0.7 ms of model time per drafted token (a model time
    longer than the call would be dropped as impossible)."""

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        result = await super().step(request)
        result.model_ms = 0.7 * len(result.tokens)
        await asyncio.sleep(result.model_ms / 1e3)
        return result


def test_the_model_time_of_blocks_drafted_ahead_reaches_the_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft that always agrees has (nearly) every block drafted ahead, the first one during
    the target's open included: those Proposes are what measures its cost per token. (A fixed
    k, which feeds the policy as well: auto k on the fakes' microseconds would stop drafting.)"""
    monkeypatch.setitem(globals(), "draft_next", target_next)  # (the fake draft looks it up here)
    replicas = [DraftReportingModelTime("draft", "d0"), FakeReplica("target", "t0")]
    tokens, generation, source = generate(replicas, max_tokens=25, k=3)
    assert tokens == expected(25)
    assert generation.stats.predraft_hits >= generation.stats.steps // 2
    planner = generation.planner
    assert planner is not None
    assert planner.pair.draft_token.value == pytest.approx(0.0007)
    # One sample per Propose, drafted ahead or not (a decayed count).
    proposes = len(replicas[0].requests)
    assert planner.pair.draft_token.weight == pytest.approx(sum(DECAY**i for i in range(proposes)))
    assert_clean(replicas, source)


def test_a_timed_request_verifies_the_whole_block_drafted_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """With n tokens drafted ahead, a timed policy is asked with ready = n and chooses k = n, and
    the step's Verify scores that block. Drafting pays here, so unaware of the ready block the
    policy would choose its cap, the draft replica's --max-draft (3), past the blocks drafted
    ahead (2: the guess takes the third slot of the ahead Propose)."""
    costs = Costs(fixed=1.0, per_row=0.02, propose=0.1, per_draft=0.05, share=0.0)  # drafting ahead is free
    monkeypatch.setattr(PairCosts, "costs", lambda self, sharing=1: costs)
    asked: list[tuple[int, int, int]] = []  # (ready, cap, chosen)
    choose = Planner.choose

    def recording(self: Planner, cap: int, ready: int = 0, sharing: int = 1) -> int:
        k = choose(self, cap, ready, sharing)
        asked.append((ready, cap, k))
        return k

    monkeypatch.setattr(Planner, "choose", recording)
    monkeypatch.setitem(globals(), "draft_next", target_next)  # a draft that always agrees
    replicas = pair()
    replicas[0].max_draft = replicas[1].max_draft = 3
    tokens, generation, _ = generate(replicas, max_tokens=40, k=3, auto=True)
    assert tokens == expected(40) and generation.planner is not None and generation.planner.timed
    assert max(k for _, _, k in asked) == 3  # its choice without a ready block
    with_ready = [(ready, k) for ready, _, k in asked if ready > 0]
    assert len(with_ready) >= 3 and all(k == ready == 2 for ready, k in with_ready), asked
    blocks = [r.num_draft for r in replicas[2].requests + replicas[3].requests]
    assert all(ready in blocks for ready, _ in with_ready)


def test_k_is_capped_at_the_replicas_max_draft() -> None:
    replicas = pair()
    replicas[0].max_draft = replicas[1].max_draft = 2
    replicas[2].max_draft = replicas[3].max_draft = 3
    tokens, generation, _ = generate(replicas, k=8, auto=True)  # the fake raises above the cap
    assert tokens == expected()
    assert max(r.num_draft for r in replicas[0].requests) == 2


@pytest.mark.parametrize("seeded", [False, True])
def test_auto_k_respects_the_max_draft_of_a_target_still_opening(seeded: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelined, the first k is chosen while the target's session is still opening: the cap of
    that replica (known from its Info when the pool hands it out) must bound it too. The fake
    target raises above its --max-draft; the draft's --max-draft is left at its default, and the
    policy drafts all it may (as one that learned a good pair from earlier requests does)."""
    monkeypatch.setattr(Planner, "choose", lambda self, cap, ready=0, sharing=1: cap)
    draft, target = FakeReplica("draft", "d0"), SlowOpeningTarget("target", "t0", max_draft=3)
    target.draft = draft
    source = FakeSource([draft, target])
    params = GenerationParams(max_tokens=40, num_draft=8, num_draft_auto=True, sampling=SamplingParams(), seed=1,
                              seeded=seeded, delta=0.3 if seeded else 0.0)
    generation = SpeculativeGeneration(source, PROMPT, params, START, EOS)

    async def run() -> list[int]:
        return [t async for event in generation.run() for t in event.tokens]

    tokens = asyncio.run(run())
    assert target.overlapped  # the first block was drafted while the target opened
    assert draft.requests[0].num_draft <= 3  # the first block: at most the target's cap
    assert max(r.num_draft for r in target.requests) <= 3
    if not seeded:
        assert tokens == expected()
    assert_clean([draft, target], source)


@pytest.mark.parametrize("auto", [False, True])
def test_an_untimed_request_at_the_draft_replicas_max_draft_scores_the_same_blocks_pipelined_or_not(
        auto: bool) -> None:
    """k = the draft replica's --max-draft: a block drafted ahead (the guess plus k drafts) does
    not fit one Propose, and a shorter one would change which positions the Verify scores, so a
    seeded request with a random output (here greedy with delta > 0: untimed, like sampling)
    would get other tokens pipelined. Every Verify must score the same blocks either way."""
    cap = 2 if auto else 3  # (auto reaches 2 on this pair)
    blocks, outputs = {}, {}
    for pipeline in (True, False):
        replicas = pair()
        replicas[0].max_draft = replicas[1].max_draft = cap
        outputs[pipeline], generation, _ = generate(replicas, k=cap, auto=auto, pipeline=pipeline, seeded=True,
                                                    delta=0.3)
        assert not generation.params.timed_k
        blocks[pipeline] = [r.num_draft for r in replicas[2].requests]
    assert max(blocks[True]) == cap
    assert blocks[True] == blocks[False] and outputs[True] == outputs[False]


@pytest.mark.parametrize("method", ["model", "ngram", "hybrid"])
def test_a_seeded_request_drafts_ahead_only_with_a_model_draft(method: str) -> None:
    """An n-gram lookup depends on where its Propose starts, so a block it drafted ahead need not
    be the block a Propose after the committed guess would give: a seeded request with a random
    output (untimed) must not use one. A greedy request's output never depends on its blocks."""
    drafted_ahead = {}
    for seeded in (True, False):
        replicas = pair()
        replicas[0].draft_method = replicas[1].draft_method = method
        extra = {"seeded": True, "delta": 0.3} if seeded else {}
        _, generation, _ = generate(replicas, k=3, **extra)
        drafted_ahead[seeded] = generation.stats.predrafts
    assert drafted_ahead[False] > 0
    assert (drafted_ahead[True] > 0) == (method == "model")


def test_a_timed_request_at_the_draft_replicas_max_draft_still_drafts_ahead() -> None:
    """A greedy request's output never depends on its blocks: it still drafts ahead what fits."""
    replicas = pair()
    replicas[0].max_draft = replicas[1].max_draft = 3
    tokens, generation, _ = generate(replicas, k=3)
    assert tokens == expected() and generation.stats.predrafts > 0


# -- faults at every point of a step ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["draft", "target"])
@pytest.mark.parametrize("kind", ["down", "full", "lost", "malformed"])
@pytest.mark.parametrize("at", range(6))
def test_a_fault_at_any_step_keeps_the_output(role: str, kind: str, at: int) -> None:
    replicas = pair(**{"d0" if role == "draft" else "t0": [Fault("step", at, kind)]})
    tokens, generation, source = generate(replicas)
    assert tokens == expected()
    assert_clean(replicas, source)
    serving = generation.stats.draft_replica if role == "draft" else generation.stats.target_replica
    if kind == "lost":  # reopened on the same live replica, not failed over
        assert serving.endswith("0") and generation.stats.failovers == 0
    else:
        assert serving.endswith("1") and generation.stats.failovers >= (kind != "full")


@pytest.mark.parametrize("role", ["draft", "target"])
@pytest.mark.parametrize("kind", ["down", "full"])
def test_a_fault_at_open_moves_to_another_replica(role: str, kind: str) -> None:
    replicas = pair(**{"d0" if role == "draft" else "t0": [Fault("open", 0, kind)]})
    tokens, _, source = generate(replicas)
    assert tokens == expected()
    assert_clean(replicas, source)


def test_a_draft_that_becomes_full_mid_request_leaves_the_target_alone() -> None:
    replicas = [FakeReplica("draft", "d0", [Fault("step", 2, "full")]), FakeReplica("target", "t0")]
    tokens, generation, source = generate(replicas)
    assert tokens == expected()
    steps_after = [r for r in replicas[1].requests[3:]]
    assert steps_after and all(r.num_draft == 0 for r in steps_after)  # finished with the target alone
    assert_clean(replicas, source)


def test_a_lost_session_on_the_only_target_is_reopened_there() -> None:
    replicas = [FakeReplica("draft", "d0"), FakeReplica("target", "t0", [Fault("step", 3, "lost")])]
    tokens, generation, source = generate(replicas)
    assert tokens == expected() and replicas[1].opened == 2
    assert_clean(replicas, source)


def test_no_target_left_is_unavailable_and_frees_everything() -> None:
    replicas = [FakeReplica("draft", "d0"), FakeReplica("target", "t0", [Fault("step", 2, "down")])]
    with pytest.raises(Unavailable):
        generate(replicas)
    assert not replicas[0].sessions and not replicas[1].sessions


def test_every_target_full_is_resource_exhausted() -> None:
    replicas = [FakeReplica("draft", "d0"), FakeReplica("target", "t0", [Fault("open", 0, "full")])]
    with pytest.raises(ResourceExhausted):
        generate(replicas)
    assert not replicas[0].sessions


@pytest.mark.parametrize("cancel_after", range(10))
def test_a_request_cancelled_while_its_sessions_open_hands_every_replica_back(cancel_after: int) -> None:
    """Pipelined, the target's replica is chosen before either open starts: a request cancelled
    before, during or after the opens (a client that went away) hands back each replica exactly
    once and leaves no session open."""
    replicas = pair()
    source = FakeSource(replicas)
    params = GenerationParams(max_tokens=40, num_draft=3, sampling=SamplingParams(), seed=1)
    generation = SpeculativeGeneration(source, PROMPT, params, START, EOS)

    async def consume() -> None:
        async for _ in generation.run():
            pass

    async def run() -> None:
        task = asyncio.ensure_future(consume())
        for _ in range(cancel_after):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)  # background closes of abandoned sessions

    asyncio.run(run())
    assert_clean(replicas, source)


class AnswerInFlight(FakeReplica):
    """Its open number ``held`` makes the session on the replica, then holds the answer back until
    ``answer`` is set: a worker that opened the session as the request gave up (cancelling the
    caller cannot undo what the worker did)."""

    def __init__(self, role: str, address: str, held: int, faults: list[Fault] | None = None):
        super().__init__(role, address, faults or [])
        self.held = held
        self.answer = asyncio.Event()

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        number = self.calls["open"]
        session_id = await super().open(prompt_ids, request_id, timeout)
        if number == self.held:
            await self.answer.wait()
        return session_id


@pytest.mark.parametrize("role, pipeline, held, faults", [
    ("target", True, 0, []), ("draft", True, 0, []), ("target", False, 0, []), ("draft", False, 0, []),
    ("target", True, 1, [Fault("step", 1, "lost")]),  # the reopen after a lost session
])
def test_an_open_answered_after_the_request_was_cancelled_is_closed(role: str, pipeline: bool, held: int,
                                                                    faults: list[Fault]) -> None:
    replicas = [FakeReplica("draft", "d0"), FakeReplica("target", "t0")]
    index = 0 if role == "draft" else 1
    slow = replicas[index] = AnswerInFlight(role, replicas[index].address, held, faults)
    source = FakeSource(replicas)
    params = GenerationParams(max_tokens=40, num_draft=3, sampling=SamplingParams(), seed=1, pipeline=pipeline)
    generation = SpeculativeGeneration(source, PROMPT, params, START, EOS)

    async def consume() -> None:
        async for _ in generation.run():
            pass

    async def run() -> None:
        task = asyncio.ensure_future(consume())
        while slow.opened <= held:  # until the held open has made its session
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sum(source.in_use.values()) == 0  # every replica handed back at once
        slow.answer.set()  # the answer arrives after the request is gone
        await asyncio.sleep(0.01)  # background closes

    asyncio.run(run())
    assert_clean(replicas, source)


class LateOpen(FakeReplica):
    """Makes the session at once but answers ``delay_s`` later; a call whose timeout ends first
    fails DEADLINE_EXCEEDED, as gRPC's would, and the session the worker made stays there."""

    delay_s = 0.1

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        session_id = await super().open(prompt_ids, request_id, timeout)
        if timeout is not None and timeout < self.delay_s:
            await asyncio.sleep(timeout)
            raise ReplicaError(self.address, ReplicaFailure.TIMED_OUT, "Deadline Exceeded")
        await asyncio.sleep(self.delay_s)
        return session_id


@pytest.mark.parametrize("role", ["draft", "target"])
def test_an_open_answered_after_the_request_deadline_is_closed(role: str) -> None:
    """The request's deadline passes while its session opens: the request fails DEADLINE_EXCEEDED
    at its deadline, and the session the worker made meanwhile is closed when its answer comes
    (an open call cut at the request's deadline would have lost the session's id)."""
    replicas = [FakeReplica("draft", "d0"), FakeReplica("target", "t0")]
    index = 0 if role == "draft" else 1
    replicas[index] = LateOpen(role, replicas[index].address)
    source = FakeSource(replicas)
    params = GenerationParams(max_tokens=40, num_draft=3, sampling=SamplingParams(), seed=1)

    async def run() -> None:
        generation = SpeculativeGeneration(source, PROMPT, params, START, EOS, time.monotonic() + 0.03)
        with pytest.raises(DeadlineExceeded):
            async for _ in generation.run():
                pass
        await asyncio.sleep(LateOpen.delay_s + 0.05)  # the answer, then the background close

    asyncio.run(run())
    assert_clean(replicas, source)


class StallingReplica(FakeReplica):
    """Answers its first ``steps`` steps, then holds each step until its deadline and fails it
    as a call that ran out of time (DEADLINE_EXCEEDED), as a replica behind a slow link."""

    steps: int = 2

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        if self.calls["step"] < self.steps:
            return await super().step(request)
        self.calls["step"] += 1
        assert request.deadline is not None
        await asyncio.sleep(max(0.0, request.deadline - time.monotonic()))
        raise ReplicaError(self.address, ReplicaFailure.TIMED_OUT, "Deadline Exceeded")


def test_a_deadline_that_passes_while_both_replicas_step_leaves_no_unretrieved_error() -> None:
    """The request's deadline passes while the Verify and the Propose drafting ahead are both in
    flight: the request fails DEADLINE_EXCEEDED once, and neither call's error is left to asyncio's
    ERROR "Task exception was never retrieved" (with its traceback) in the orchestrator's log."""
    import gc

    replicas = [StallingReplica("draft", "d0"), StallingReplica("target", "t0")]
    # The first block is missed, so the draft steps: the first block (at the open), ahead beside the
    # target's 1st Verify, a Propose, then its 4th ahead beside the target's 2nd Verify: both stall.
    replicas[0].steps, replicas[1].steps = 3, 1
    source = FakeSource(replicas)
    params = GenerationParams(max_tokens=40, num_draft=3, sampling=SamplingParams(), seed=1)
    problems: list[str] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: problems.append(f"{context['message']}: {context.get('exception')!r}"))
        generation = SpeculativeGeneration(source, PROMPT, params, START, EOS, time.monotonic() + 0.2)
        with pytest.raises(DeadlineExceeded):
            async for _ in generation.run():
                pass
        await asyncio.sleep(0.01)  # background closes of abandoned sessions
        gc.collect()  # an unretrieved task error is reported when its task is collected
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert [r.calls["step"] for r in replicas] == [4, 2]
    assert problems == []
    assert_clean(replicas, source)


# -- q(d) for acceptance comes from the q the target gets ---------------------------------------------


class SampledDraft(FakeReplica):
    """A sampling draft whose float32 ``token_probs`` field disagrees with the q it sends (a
    point mass on each token, q(d) = 1): acceptance must use the q, as the target's residual does."""

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        result = await super().step(request)
        result.token_probs = [0.001] * len(result.tokens)
        result.distributions = [Distribution(np.array([t], np.int32), np.array([1.0], np.float16))
                                for t in result.tokens]
        return result


class SampledTarget(FakeReplica):
    """p(d) = 0.001 for every draft token; its residual and bonus draws are its greedy tokens."""

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        verdict = await super().step(request)
        verdict.draft_probs = [0.001] * request.num_draft
        verdict.resampled = list(verdict.argmax)
        return verdict


def test_acceptance_uses_q_from_the_forwarded_distribution() -> None:
    """p(d)/q(d) = 0.001 with the q the target gets (keep a draft 1 time in 1000); with the float32
    field it would be 1 (keep every draft)."""
    replicas = [SampledDraft("draft", "d0"), SampledTarget("target", "t0")]
    tokens, generation, source = generate(replicas, k=3, sampling=SamplingParams(temperature=1.0), seeded=True)
    stats = generation.stats
    assert stats.proposed >= 20 and stats.accepted <= 2, (stats.proposed, stats.accepted)
    assert_clean(replicas, source)


def test_q_of_a_draft_token_from_dense_sparse_and_point_mass_wire_q() -> None:
    from orchestrator.lanes import draft_token_probs
    from specdec_grpc.wire import distribution_from_pb, distribution_to_pb

    weights = np.array([0.1, 0.2, 0.3, 0.4], np.float16)
    dense = Distribution(np.zeros(0, np.int32), weights)
    sparse = Distribution(np.array([2, 7, 9], np.int32), np.array([0.25, 0.5, 0.25], np.float16))
    point = Distribution(np.array([5], np.int32), np.array([1.0], np.float16))
    for wrap in (lambda d: d, lambda d: distribution_from_pb(distribution_to_pb(d))):  # in-process; over the wire
        proposal = Proposal([3, 7, 5, 4], [0.0] * 4, [wrap(dense), wrap(sparse), wrap(point), wrap(sparse)])
        q = draft_token_probs(proposal)
        expected_dense = float(weights.astype(np.float64)[3] / weights.astype(np.float64).sum())
        assert q == [expected_dense, 0.5, 1.0, 0.0]
    greedy = Proposal([3, 4], [1.0, 1.0], [])
    assert draft_token_probs(greedy) == [1.0, 1.0]
