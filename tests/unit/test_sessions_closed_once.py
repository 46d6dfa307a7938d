"""A request's two sessions are closed exactly once, however it ends: it finishes (before its last
event), it fails, it is cancelled mid-step, or whoever iterates it stops early (the orchestrator
closes the generation it iterates at once, not when the garbage collector gets to it). Fake
replicas count every open and close; no MLX, no servers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from orchestrator.generation import Orchestrator, OrchestratorLimits
from orchestrator.params import GenerationParams
from orchestrator.speculative import SpeculativeGeneration
from specdec_core.errors import InvalidArgument
from specdec_core.steps import Proposal, SamplingParams, StepRequest, Verdict

START, EOS = 0, 1
PROMPT = [5, 6, EOS]


def next_token(tokens: list[int]) -> int:
    """Draft and target agree: a fixed sequence, EOS after 12 tokens."""
    return EOS if len(tokens) > 12 else 2 + len(tokens) % 7


@dataclass
class CountingReplica:
    """A draft or target replica that counts its sessions' opens and closes. Its step number
    ``fail_at`` raises ``failure``; its step number ``hold_at`` waits until it is cancelled."""

    role: str
    address: str
    max_draft: int = 0
    max_batch: int = 0
    draft_method: str = "model"
    fail_at: int = -1
    failure: Exception = field(default_factory=lambda: InvalidArgument("a step this replica refuses"))
    hold_at: int = -1
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: dict[str, list[int]] = field(default_factory=dict)
    opened: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    steps: int = 0

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        await asyncio.sleep(0)
        session_id = f"{self.address}/{len(self.opened)}"
        self.opened.append(session_id)
        self.sessions[session_id] = [START]
        return session_id

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        await asyncio.sleep(0)
        n, self.steps = self.steps, self.steps + 1
        if n == self.fail_at:
            raise self.failure
        if n == self.hold_at:
            self.holding.set()
            await asyncio.Event().wait()
        tokens = self.sessions[request.session_id]
        if request.rollback_to:
            del tokens[request.rollback_to :]
        tokens.extend(request.append_tokens)
        if self.role == "draft":
            drafted: list[int] = []
            while len(drafted) < request.num_draft and EOS not in drafted:
                drafted.append(next_token(tokens))
                tokens.append(drafted[-1])
            return Proposal(drafted, [1.0] * len(drafted), length=len(tokens))
        k = request.num_draft
        argmax = [next_token(tokens[: len(tokens) - k + j]) for j in range(k + 1)]
        return Verdict(argmax, [], [], length=len(tokens))

    async def close(self, session_id: str) -> None:
        self.closed.append(session_id)
        self.sessions.pop(session_id, None)


class CountingSource:
    """One draft and one target; counts what it hands out and gets back."""

    def __init__(self, draft: CountingReplica, target: CountingReplica):
        self.replicas = {"draft": draft, "target": target}
        self.acquired = self.released = 0

    def acquire(self, role: str, exclude: set[str]) -> CountingReplica | None:
        replica = self.replicas[role]
        if replica.address in exclude:
            return None
        self.acquired += 1
        return replica

    def release(self, backend: CountingReplica) -> None:
        self.released += 1

    def report_failure(self, backend: CountingReplica, error: Exception) -> None:
        pass

    def sessions_sharing(self, backend: CountingReplica) -> int:
        return 1


@pytest.fixture
def generation_closes(monkeypatch: pytest.MonkeyPatch) -> list[SpeculativeGeneration]:
    """Every ``SpeculativeGeneration.close`` call, by the generation it closed."""
    calls: list[SpeculativeGeneration] = []
    close = SpeculativeGeneration.close

    async def counted(self: SpeculativeGeneration) -> None:
        calls.append(self)
        await close(self)

    monkeypatch.setattr(SpeculativeGeneration, "close", counted)
    return calls


def replicas(**target: int) -> tuple[CountingReplica, CountingReplica, CountingSource]:
    draft, target_ = CountingReplica("draft", "d0"), CountingReplica("target", "t0", **target)
    return draft, target_, CountingSource(draft, target_)


def assert_closed_once(source: CountingSource, *all_replicas: CountingReplica) -> None:
    for replica in all_replicas:
        assert replica.opened, f"{replica.address} opened no session"
        assert sorted(replica.closed) == sorted(replica.opened), (replica.address, replica.opened, replica.closed)
        assert not replica.sessions
    assert source.released == source.acquired


def params(max_tokens: int = 40) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, num_draft=3, sampling=SamplingParams(), seed=1)


async def finish(generation: SpeculativeGeneration, draft: CountingReplica, target: CountingReplica) -> None:
    async for event in generation.run():
        if event.finish_reason is not None:  # closed before the client hears the request is done
            assert not draft.sessions and not target.sessions


async def fail(generation: SpeculativeGeneration, draft: CountingReplica, target: CountingReplica) -> None:
    with pytest.raises(InvalidArgument):
        await finish(generation, draft, target)


async def cancel(generation: SpeculativeGeneration, draft: CountingReplica, target: CountingReplica) -> None:
    task = asyncio.ensure_future(finish(generation, draft, target))
    await asyncio.wait_for(target.holding.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_every_way_a_request_ends_closes_each_session_once(generation_closes: list[SpeculativeGeneration]
                                                            ) -> None:
    """Finished by EOS or by max_tokens, failed by a step, cancelled mid-step: each session is closed
    once, every replica handed back, and the generation's close runs once."""
    ways = {"eos": (finish, 40, {}), "length": (finish, 5, {}), "error": (fail, 40, {"fail_at": 1}),
            "cancel": (cancel, 40, {"hold_at": 1})}
    for way, (end, max_tokens, target_faults) in ways.items():
        generation_closes.clear()
        draft, target, source = replicas(**target_faults)
        generation = SpeculativeGeneration(source, PROMPT, params(max_tokens), START, EOS)
        asyncio.run(end(generation, draft, target))
        assert_closed_once(source, draft, target)
        assert generation_closes == [generation], way


class Tokenizer:
    all_special_ids = (START, EOS)

    def __call__(self, prompt: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=PROMPT)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids if i not in self.all_special_ids)

    def convert_ids_to_tokens(self, token: int) -> str:
        return f"t{token}"


def test_a_consumer_that_stops_early_has_both_sessions_closed_when_it_stops(
        generation_closes: list[SpeculativeGeneration]) -> None:
    """The servicer closes ``Orchestrator.generate`` after the client went away: the generation it
    iterates is closed with it, so both sessions are freed by the time that close returns."""
    draft, target, source = replicas()
    orchestrator = Orchestrator(source, Tokenizer(), START, EOS, OrchestratorLimits())

    async def run() -> None:
        events = orchestrator.generate("a prompt", params(), None)
        first = await anext(events)
        assert first.finish_reason is None and draft.sessions and target.sessions
        await events.aclose()
        assert not draft.sessions and not target.sessions
        assert len(generation_closes) == 1

    asyncio.run(run())
    assert_closed_once(source, draft, target)


def test_a_stream_the_client_leaves_closes_both_sessions_with_the_call(
        generation_closes: list[SpeculativeGeneration]) -> None:
    """gRPC closes a server stream whose client went away: GenerateStream, its events and the
    generation under them are closed with it, at once."""
    from orchestrator.servicer import OrchestratorServicer
    from specdec_pb import specdec_pb2 as pb

    draft, target, source = replicas()
    servicer = OrchestratorServicer(Orchestrator(source, Tokenizer(), START, EOS, OrchestratorLimits()), None)
    context = SimpleNamespace(time_remaining=lambda: None)

    async def run() -> None:
        stream = servicer.GenerateStream(pb.GenerateRequest(prompt="a prompt", max_tokens=40, num_draft=3), context)
        first = await anext(stream)
        assert not first.finish_reason and draft.sessions and target.sessions
        await stream.aclose()
        assert not draft.sessions and not target.sessions
        assert len(generation_closes) == 1

    asyncio.run(run())
    assert_closed_once(source, draft, target)
