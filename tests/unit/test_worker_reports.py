"""Numbers a worker reports are checked where they enter the orchestrator (issue 31.2): a step
reply's timing (model_ms, batch_size, batch_rows) and an Info's load. An impossible one is dropped
and counted, never folded into the planner's shared costs, the stats or the replica choice; a
reply whose tokens are fine keeps its tokens."""

from __future__ import annotations

import asyncio
import math
import types
from dataclasses import dataclass
from unittest.mock import AsyncMock, MagicMock

import pytest
from test_loop import FakeReplica, FakeSource, assert_clean, expected

import orchestrator.speculative as speculative
from orchestrator.estimates import SEEDED_COSTS
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.params import GenerationParams, Stats
from orchestrator.replicas import ReplicaPool
from orchestrator.speculative import SpeculativeGeneration
from specdec_core.steps import Proposal, SamplingParams, StepRequest, Verdict
from specdec_pb import specdec_pb2 as pb

PROMPT = [5, 9, 4]
START, EOS = 0, 1
BAD_STEP = 4  # the step call (counted per replica) whose report is bad


class FakeClock:
    """The loop's perf_counter: it moves only by the time the fake workers take, so two runs of the
    same sequence measure the same wall times."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@dataclass
class TimedReplica(FakeReplica):
    """A worker that takes and reports an honest model time (the target: a pass of 10 ms + 1 ms a
    row; the draft: 0.5 ms + 2 ms a drafted token) in batches of one; at step call ``BAD_STEP``
    it reports ``bad`` instead (field -> value), or, when ``absent``, no timing at all."""

    clock: FakeClock | None = None
    max_batch: int = 16
    bad: dict[str, float] | None = None
    absent: bool = False

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        n = self.calls["step"]
        result = await super().step(request)
        if isinstance(result, Verdict):
            result.model_ms, result.batch_rows = 10.0 + (request.num_draft + 1), request.num_draft + 1
        else:
            result.model_ms = 0.5 + 2.0 * len(result.tokens)
        assert self.clock is not None
        self.clock.now += result.model_ms / 1e3 + 0.0002  # the call: its model time and the wire
        if n == BAD_STEP and self.absent:
            result.timed, result.model_ms, result.batch_size = False, 0.0, 1
            if isinstance(result, Verdict):
                result.batch_rows = 0
        elif n == BAD_STEP and self.bad:
            for name, value in self.bad.items():
                setattr(result, name, value)
        return result


def run(monkeypatch: pytest.MonkeyPatch, role: str, bad: dict[str, float] | None = None,
        absent: bool = False) -> tuple[SpeculativeGeneration, list[int]]:
    """A num_draft=auto request over a timed pair whose ``role`` worker misreports one step."""
    clock = FakeClock()
    monkeypatch.setattr(speculative, "time", types.SimpleNamespace(perf_counter=clock.perf_counter,
                                                                   monotonic=speculative.time.monotonic))
    replicas = [TimedReplica("draft", "d0", max_draft=8, clock=clock),
                TimedReplica("target", "t0", max_draft=8, clock=clock)]
    odd = replicas[0 if role == "draft" else 1]
    odd.bad, odd.absent = bad, absent
    source = FakeSource(replicas)
    params = GenerationParams(max_tokens=30, num_draft=3, num_draft_auto=True, max_num_draft=8,
                              sampling=SamplingParams(), seed=1, pipeline=False)
    generation = SpeculativeGeneration(source, PROMPT, params, START, EOS)

    async def go() -> list[int]:
        return [t async for event in generation.run() for t in event.tokens]

    tokens = asyncio.run(go())
    assert tokens == expected(30)  # the bad step's tokens were used: the output is the target's
    assert_clean(replicas, source)
    return generation, [r.num_draft for r in replicas[1].requests]


BAD_REPORTS = [
    ("target", {"model_ms": math.nan}),
    ("target", {"model_ms": math.inf}),
    ("target", {"model_ms": -5.0}),
    ("target", {"model_ms": 1e30}),  # finite, but longer than the call that carried it
    ("target", {"batch_size": 2**31 - 1}),
    ("target", {"batch_size": -3}),
    ("target", {"batch_rows": 2**31 - 1}),
    ("draft", {"model_ms": math.nan}),
    ("draft", {"model_ms": -1.0}),
    ("draft", {"batch_size": 2**31 - 1}),
]


@pytest.mark.parametrize("role, bad", BAD_REPORTS, ids=[f"{r}-{next(iter(b))}={next(iter(b.values()))}"
                                                        for r, b in BAD_REPORTS])
def test_a_bad_report_changes_nothing_the_planner_learns_or_chooses(monkeypatch: pytest.MonkeyPatch, role: str,
                                                                      bad: dict[str, float]) -> None:
    """The same sequence with the bad report and with no report at that step: the same ks chosen
    at every step, the same costs and model times after, and the drop counted."""
    with_bad, ks_with_bad = run(monkeypatch, role, bad=bad)
    without, ks_without = run(monkeypatch, role, absent=True)
    assert ks_with_bad == ks_without
    assert with_bad.planner is not None and without.planner is not None
    assert with_bad.planner.costs() == without.planner.costs()
    assert without.planner.costs() != SEEDED_COSTS  # measured
    stats = with_bad.stats
    assert (stats.draft_model_s, stats.target_model_s) == (without.stats.draft_model_s, without.stats.target_model_s)
    assert math.isfinite(stats.draft_model_s) and math.isfinite(stats.target_model_s)
    assert stats.dropped_timings == {role: 1} and without.stats.dropped_timings == {}


def test_an_honest_report_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Honest timings, a batch at the worker's --max-batch and the rows it implies, are all kept."""
    generation, _ = run(monkeypatch, "target", bad={"batch_size": 16, "batch_rows": 24})  # k <= 8, 15 others
    assert generation.stats.dropped_timings == {}


def test_the_dropped_reports_are_counted_in_the_metrics() -> None:
    metrics = OrchestratorMetrics()
    stats = Stats(dropped_timings={"target": 2})
    metrics.request_ended(None, stats, None, 0.1)
    metrics.dropped_report("draft", "info")
    sample = metrics.registry.get_sample_value
    assert sample("specdec_dropped_worker_reports_total", {"role": "target", "report": "step"}) == 2
    assert sample("specdec_dropped_worker_reports_total", {"role": "draft", "report": "info"}) == 1
    assert sample("specdec_dropped_worker_reports_total", {"role": "draft", "report": "step"}) == 0


# -- Info: a replica's load -------------------------------------------------------------------------


def serving_pool() -> ReplicaPool:
    def channel(address: str) -> MagicMock:
        made = MagicMock()
        made.close = AsyncMock()
        return made

    pool = ReplicaPool([], ["t:1"], channel_factory=channel)
    replica = pool.replicas[0]
    replica.healthy = True
    replica.info = info(live_sessions=3)
    return pool


def info(**load: int) -> pb.InfoResponse:
    return pb.InfoResponse(role="target", limits=pb.Limits(max_sessions=64, max_batch=16, max_draft=8,
                                                           max_prompt_tokens=64, max_decoder_tokens=256),
                           **load)


@pytest.mark.parametrize("load", [{"live_sessions": -5}, {"live_sessions": 2**31 - 1},
                                  {"cached_tokens": -1}, {"load_seconds": math.nan}, {"load_seconds": -math.inf}])
def test_an_impossible_load_reading_is_dropped_and_counted(load: dict[str, int]) -> None:
    """A load reading with a negative or non-finite number, or more sessions than --max-sessions,
    leaves no figures (not garbage that would steer the choice of replica and the sessions sharing
    a pass)."""
    pool = serving_pool()
    replica = pool.replicas[0]
    dropped: list[tuple[str, str]] = []
    pool.on_dropped_report = lambda role, report: dropped.append((role, report))

    async def read(reply: pb.InfoResponse) -> None:
        replica.backend.stub.Info = AsyncMock(return_value=reply)
        await pool._read_load(replica)

    asyncio.run(read(info(live_sessions=5)))
    assert replica.load is not None and pool.sessions_sharing(replica.backend) == 5
    asyncio.run(read(info(**{"live_sessions": 5, **load})))
    assert replica.load is None and dropped == [("target", "info")]
    assert pool.sessions_sharing(replica.backend) == 1  # this pool's own sessions (none), not garbage
