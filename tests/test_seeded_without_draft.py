"""What a seeded sampled request's tokens depend on when its draft is missing for some steps
(README "Reproducible sampling", docs/architecture.md "Randomness"): the same tokens for the
same seed and the same steps at which no draft was available; with no draft at all, exactly the
tokens of the target alone (``speculative=false``) with that seed, alone or batched.

In-process hosts (``specdec_tools/local_backends.py``) on the tiny pair; a draft that "dies" fails
every call from a given step of the request on, as a replica that went down would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backend_protocol import ReplicaError, ReplicaFailure
from orchestrator.params import GenerationParams
from orchestrator.speculative import SpeculativeGeneration
from specdec_core.checkpoint import load_model
from specdec_core.engine import ModelEngine
from specdec_core.session_host import HostLimits, SessionHost
from specdec_core.steps import SamplingParams
from specdec_tools.local_backends import LocalBackend

PROMPT = [37, 12, 99, 250, 8, 41, 1]
SAMPLED = SamplingParams(temperature=1.0)
MAX_TOKENS = 24


class CountingTarget(LocalBackend):
    """A target replica that counts the Verifies it was sent: the request's steps begun."""

    def __init__(self, host: SessionHost):
        super().__init__(host, "target-0")
        self.verifies = 0

    async def step(self, request: Any) -> Any:
        self.verifies += 1
        return await super().step(request)


class DyingDraft(LocalBackend):
    """A draft replica gone from the request's ``dies_at``-th step on (counted from 0). Counted in
    steps, not in the draft's calls: drafting ahead (whose timing-driven choice never changes a
    seeded request's tokens) adds a Propose to some steps, one that serves the next step. It goes
    out just after its step's Verify, so it fails here when the step it serves is ``dies_at``."""

    def __init__(self, host: SessionHost, target: CountingTarget, dies_at: int | None):
        super().__init__(host, "draft-0")
        self.target, self.dies_at = target, dies_at

    async def step(self, request: Any) -> Any:
        if self.dies_at is not None and self.target.verifies >= self.dies_at:
            raise ReplicaError(self.address, ReplicaFailure.DOWN, "UNAVAILABLE: the draft went down")
        return await super().step(request)


class Source:
    """One target and, unless ``draft`` is None (every draft busy or gone), one draft."""

    def __init__(self, target: LocalBackend, draft: LocalBackend | None):
        self.backends = {"target": target, "draft": draft}

    def acquire(self, role: str, exclude: set[str]) -> Any:
        backend = self.backends[role]
        return None if backend is None or backend.address in exclude else backend

    def release(self, backend: Any) -> None:
        pass

    def report_failure(self, backend: Any, error: Exception) -> None:
        pass

    def sessions_sharing(self, backend: Any) -> int:
        return 1


@pytest.fixture(scope="module")
def engines(near_draft_dir: Path, target_dir: Path) -> tuple[ModelEngine, ModelEngine]:
    return (ModelEngine(load_model(str(near_draft_dir)), max_draft=16),
            ModelEngine(load_model(str(target_dir)), max_draft=16))


def generate(engines: tuple[ModelEngine, ModelEngine], seed: int, draft: str = "yes", dies_at: int | None = None,
             speculative: bool = True, num_draft: int = 3, auto: bool = False, copies: int = 1) -> list[list[int]]:
    """``copies`` identical requests at once (their steps batched on the hosts)."""
    limits = HostLimits(watchdog_s=0, batch_wait_ms=5 if copies > 1 else 0)
    draft_host = SessionHost(engines[0], limits, "draft", "fp")
    target_host = SessionHost(engines[1], limits, "target", "fp")

    async def one() -> list[int]:
        target = CountingTarget(target_host)
        source = Source(target, None if draft == "none" else DyingDraft(draft_host, target, dies_at))
        params = GenerationParams(max_tokens=MAX_TOKENS, num_draft=num_draft, num_draft_auto=auto, sampling=SAMPLED,
                                  seed=seed, seeded=True, speculative=speculative)
        run = SpeculativeGeneration(source, PROMPT, params, 0, 1)
        return [t async for event in run.run() for t in event.tokens]

    async def main() -> list[list[int]]:
        draft_host.start()
        target_host.start()
        try:
            return list(await asyncio.gather(*(one() for _ in range(copies))))
        finally:
            await draft_host.stop()
            await target_host.stop()

    return asyncio.run(main())


@pytest.mark.parametrize("auto", [False, True])
def test_no_draft_free_gives_the_target_alones_tokens_alone_or_batched(engines: Any, auto: bool) -> None:
    for seed in range(4):
        alone = generate(engines, seed, speculative=False)[0]
        assert generate(engines, seed, draft="none", auto=auto)[0] == alone
        assert generate(engines, seed, draft="none", auto=auto, copies=3) == [alone] * 3


@pytest.mark.parametrize("dies_at", [1, 3])
def test_a_draft_lost_mid_request_gives_the_same_tokens_for_the_same_loss(engines: Any, dies_at: int) -> None:
    """The same seed and the same step of the loss: the same tokens (also batched). Before the
    loss the tokens are those of the run with the draft throughout (the same k schedule and draws);
    after it, the target alone's draws at each position."""
    differed = 0
    for seed in range(4):
        kept = generate(engines, seed)[0]
        lost = generate(engines, seed, dies_at=dies_at, copies=2)
        assert lost[0] == lost[1] == generate(engines, seed, dies_at=dies_at)[0]
        assert len(lost[0]) == MAX_TOKENS  # finished on the target alone
        differed += lost[0] != kept
        # The first dies_at steps ran with the draft: at least one token each, as in ``kept``.
        assert lost[0][:dies_at] == kept[:dies_at]
    assert differed  # (the README's exception is real: without the draft, other tokens)
