"""Gathering batches (specdec_core/step_scheduler.py): sessions answered together come back a few
milliseconds apart; the model thread must run them as one batch again, not split them into
cohorts that alternate for good. A fake engine whose pass takes a fixed time stands in for MLX."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from specdec_core.step_scheduler import QueuedStep, StepScheduler
from specdec_core.steps import SamplingParams, StepRequest

PASS_S = 0.08  # one batched pass, whatever its rows (a pass that reads the weights once)


class FakeEngine:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def check_verify(self, *args: object) -> None:
        pass

    def verify_batch(self, items: list[tuple]) -> list[object]:
        self.batches.append(len(items))
        time.sleep(PASS_S)
        return [SimpleNamespace() for _ in items]


def scheduler(engine: FakeEngine, max_batch: int = 16) -> tuple[StepScheduler, ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)  # the model thread
    limits = SimpleNamespace(max_batch=max_batch, batch_wait_ms=0.0)
    metrics = SimpleNamespace(batches=0, batched_steps=0)
    return StepScheduler(engine, lambda job: None, pool.submit, limits, metrics), pool


def step(state: SimpleNamespace) -> QueuedStep:
    request = StepRequest(session_id="s", expected_length=1, rollback_to=0, append_tokens=[], num_draft=0,
                          sampling=SamplingParams(), seed=0)
    return QueuedStep("verify", state, request, list(state.tokens), time.perf_counter())


async def clients(sched: StepScheduler, sessions: int, steps: int, turnaround_s: tuple[float, float]) -> None:
    rng = random.Random(3)

    async def one(i: int) -> None:
        state = SimpleNamespace(tokens=[0], cache=None)
        await asyncio.sleep(i * 0.003)  # they start apart
        for _ in range(steps):
            await sched.submit(step(state))
            await asyncio.sleep(rng.uniform(*turnaround_s))  # the orchestrator's turn

    await asyncio.gather(*(one(i) for i in range(sessions)))


def test_sessions_that_come_back_soon_run_as_one_batch() -> None:
    engine = FakeEngine()
    sched, pool = scheduler(engine)
    asyncio.run(clients(sched, sessions=8, steps=10, turnaround_s=(0.001, 0.004)))
    pool.shutdown()
    steady = engine.batches[4:]  # the first passes run as the clients start
    # without gathering they settle into cohorts that alternate (batches of ~4, twice the passes)
    assert sum(steady) / len(steady) >= 7, engine.batches


def test_sessions_that_come_back_slowly_are_not_waited_for() -> None:
    engine = FakeEngine()
    sched, pool = scheduler(engine)
    started = time.perf_counter()
    # each session comes back after more than a pass: waiting for it would only delay the others
    asyncio.run(clients(sched, sessions=2, steps=6, turnaround_s=(2.5 * PASS_S, 2.5 * PASS_S)))
    slow = time.perf_counter() - started
    pool.shutdown()
    assert slow < 6 * (2.5 * PASS_S + 2 * PASS_S), engine.batches


def test_a_closed_session_is_not_waited_for() -> None:
    sched, pool = scheduler(FakeEngine())
    states = [SimpleNamespace(tokens=[0], cache=None) for _ in range(3)]
    gathering = sched._gathering["verify"]
    gathering.turnaround_s = 0.001  # sessions come back fast
    gathering.ran([step(state) for state in states], pass_s=PASS_S, finished=time.perf_counter())
    assert gathering.wait_until(1, 16) is not None  # two of three are still on their way
    sched.forget(states[1])
    gathering.arrived(states[0], time.perf_counter())
    assert gathering.wait_until(1, 16) is not None  # states[2] may still come
    sched.forget(states[2])
    assert gathering.wait_until(1, 16) is None
    pool.shutdown()
