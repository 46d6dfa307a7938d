"""Orchestrator.generate refuses cheaply before it tokenizes, and tokenizing never stalls the
event loop (no MLX, no servers: a fake target replica and a recording tokenizer)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from orchestrator.generation import Orchestrator, OrchestratorLimits
from orchestrator.params import GenerationParams
from specdec_core.errors import InvalidArgument, ResourceExhausted
from specdec_core.steps import StepRequest, Verdict

START, EOS = 0, 1


@dataclass
class Encoding:
    input_ids: list[int]


@dataclass
class RecordingTokenizer:
    """One token per word plus EOS. Prompts listed in ``blocking`` wait in the tokenizer until
    ``release`` is set (or a generous deadlock breaker passes), as a huge prompt would."""

    calls: list[str] = field(default_factory=list)
    blocking: set[str] = field(default_factory=set)
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    released_in_time: list[bool] = field(default_factory=list)
    all_special_ids: tuple[int, ...] = (START, EOS)

    def __call__(self, prompt: str) -> Encoding:
        self.calls.append(prompt)
        if prompt in self.blocking:
            self.entered.set()
            self.released_in_time.append(self.release.wait(timeout=20))
        return Encoding([2 + len(word) % 5 for word in prompt.split()][:8] + [EOS])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids if i not in self.all_special_ids)

    def convert_ids_to_tokens(self, token: int) -> str:
        return f"t{token}"


@dataclass
class FakeTarget:
    """A target replica that writes 3 fixed tokens, then EOS."""

    role: str = "target"
    address: str = "fake-target:1"
    max_draft: int = 0
    max_batch: int = 0
    draft_method: str = ""
    sessions: dict[str, int] = field(default_factory=dict)

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        session = f"s{len(self.sessions)}"
        self.sessions[session] = 0
        return session

    async def step(self, request: StepRequest) -> Verdict:
        await asyncio.sleep(0)
        length = (request.rollback_to or request.expected_length) + len(request.append_tokens)
        produced = length - 1
        token = EOS if produced >= 3 else 5 + produced
        return Verdict(argmax=[token] * (request.num_draft + 1), draft_probs=[], resampled=[], length=length)

    async def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


@dataclass
class Source:
    target: FakeTarget = field(default_factory=FakeTarget)

    def acquire(self, role: str, exclude: set[str]) -> Any:
        return self.target if role == "target" and self.target.address not in exclude else None

    def release(self, backend: Any) -> None:
        pass

    def report_failure(self, backend: Any, error: Exception) -> None:
        pass

    def sessions_sharing(self, backend: Any) -> int:
        return 1


def make(limits: OrchestratorLimits | None = None) -> tuple[Orchestrator, RecordingTokenizer]:
    tokenizer = RecordingTokenizer()
    return Orchestrator(Source(), tokenizer, START, EOS, limits or OrchestratorLimits()), tokenizer


PARAMS = GenerationParams(max_tokens=16, num_draft=1, speculative=False)


async def collect(orchestrator: Orchestrator, prompt: str) -> str:
    text = []
    async for event in orchestrator.generate(prompt, PARAMS, None):
        text.append(event.text)
    return "".join(text)


def test_a_too_long_prompt_is_refused_without_tokenizing() -> None:
    orchestrator, tokenizer = make(OrchestratorLimits(max_prompt_chars=100))
    with pytest.raises(InvalidArgument, match="max_prompt_chars is 100"):
        asyncio.run(collect(orchestrator, "x" * 101))
    assert tokenizer.calls == []
    assert orchestrator.active == 0
    assert asyncio.run(collect(orchestrator, "y" * 100)) == "<5><6><7>"  # the limit itself is allowed
    assert tokenizer.calls == ["y" * 100]


def test_the_default_refuses_a_message_sized_prompt_cheaply() -> None:
    """The orchestrator accepts 64 MiB messages; a prompt that large never reaches the tokenizer."""
    orchestrator, tokenizer = make()
    with pytest.raises(InvalidArgument, match="characters"):
        asyncio.run(collect(orchestrator, "word " * (64 * 1024 * 1024 // 5)))
    assert tokenizer.calls == [] and orchestrator.active == 0


def test_a_full_orchestrator_refuses_before_tokenizing() -> None:
    orchestrator, tokenizer = make(OrchestratorLimits(max_generations=1))
    orchestrator.active = 1  # one generation in flight
    with pytest.raises(ResourceExhausted, match="max_generations is 1"):
        asyncio.run(collect(orchestrator, "a prompt"))
    assert tokenizer.calls == []
    assert orchestrator.active == 1


def test_the_slot_is_freed_on_every_path() -> None:
    """Too many tokens (found only by tokenizing), a finished generation and an abandoned one
    all give their slot back."""
    orchestrator, tokenizer = make(OrchestratorLimits(max_prompt_tokens=3, max_generations=1))
    with pytest.raises(InvalidArgument, match="max_prompt_tokens is 3"):
        asyncio.run(collect(orchestrator, "one two three four"))
    assert orchestrator.active == 0
    assert asyncio.run(collect(orchestrator, "one")) == "<5><6><7>"
    assert orchestrator.active == 0

    async def abandon() -> None:
        events = orchestrator.generate("one", PARAMS, None)
        await events.__anext__()
        assert orchestrator.active == 1
        await events.aclose()

    asyncio.run(abandon())
    assert orchestrator.active == 0


def test_tokenizing_a_long_prompt_does_not_stall_the_event_loop() -> None:
    """While one allowed but long prompt is still in the tokenizer, a second request on the same
    event loop runs to completion; only then is the first one's tokenizer let go."""
    orchestrator, tokenizer = make()
    long_prompt = "long " * 12_000
    tokenizer.blocking.add(long_prompt)

    async def main() -> tuple[str, str]:
        first = asyncio.create_task(collect(orchestrator, long_prompt))
        await asyncio.to_thread(tokenizer.entered.wait, 20)
        assert tokenizer.entered.is_set()
        assert orchestrator.active == 1  # the long prompt holds its slot while it tokenizes
        second = await collect(orchestrator, "short prompt")
        tokenizer.release.set()
        return await first, second

    first, second = asyncio.run(main())
    assert tokenizer.released_in_time == [True], "the short request waited for the long prompt's tokenizer"
    assert first == second == "<5><6><7>"
    assert orchestrator.active == 0


@dataclass
class TimedTarget(FakeTarget):
    """``FakeTarget`` that records the timeout of every open and the deadline of every step."""

    open_timeouts: list[float | None] = field(default_factory=list)
    step_deadlines: list[float | None] = field(default_factory=list)

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        self.open_timeouts.append(timeout)
        return await super().open(prompt_ids, request_id, timeout)

    async def step(self, request: StepRequest) -> Verdict:
        self.step_deadlines.append(request.deadline)
        return await super().step(request)


def test_call_timeout_bounds_every_call_to_a_worker() -> None:
    """--call-timeout: with no client deadline, an open and every step may take that long before the
    replica is failed over (a large target on a slow CPU needs minutes where 60 s is the default)."""
    target = TimedTarget()
    orchestrator = Orchestrator(Source(target), RecordingTokenizer(), START, EOS,
                                OrchestratorLimits(call_timeout_s=600.0))
    started = time.monotonic()
    assert asyncio.run(collect(orchestrator, "one two")) == "<5><6><7>"
    ended = time.monotonic()
    assert target.open_timeouts == [600.0]
    assert len(target.step_deadlines) == 4  # three tokens and EOS, one step each
    assert all(d is not None and started + 600 <= d <= ended + 600 for d in target.step_deadlines)
