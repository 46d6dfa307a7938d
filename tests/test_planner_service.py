"""num_draft=auto's planner (``orchestrator/planner.py``) through the services, in-process.

- A draft that never agrees with its target (two unrelated random models): greedy auto equals the
  target alone, and the planner leaves most steps to the target alone (k = 0), probing now and then.
- Timing may steer k only where the output cannot depend on it: a seeded sampled request gives
  the same tokens, and drafts at the same positions, when the target is made slow; a greedy
  request's k, which may follow timing, does change (so the slowdown is one the planner sees).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import LoopThread, Worker, speculative_cluster

from orchestrator.client import SpecdecClient
from orchestrator.estimates import PlanMemory
from orchestrator.planner import step_time
from specdec_tools.tiny_checkpoints import corpus_lines

PROMPTS = corpus_lines()[7:300:37][:3]
MAX_TOKENS = 40
TARGET_DELAY_S = 0.08  # far above a tiny target's Verify (a few ms): drafting pays from an acceptance of ~0.05

pytestmark = pytest.mark.timeout(120)


def steps_at_k0(stats: Any) -> int:
    """Steps that drafted nothing: a model draft proposes at position 1 whenever asked."""
    return stats.steps - (stats.proposed_per_position[0] if stats.proposed_per_position else 0)


@pytest.fixture(scope="module")
def unrelated(loop: LoopThread, draft_dir: Path, target_dir: Path) -> Iterator[SpecdecClient]:
    with speculative_cluster(loop, draft_dir, target_dir) as (client, *_):
        yield client


@pytest.fixture(scope="module")
def related(loop: LoopThread, near_draft_dir: Path, target_dir: Path
            ) -> Iterator[tuple[SpecdecClient, Worker, PlanMemory]]:
    with speculative_cluster(loop, near_draft_dir, target_dir) as (client, _, target, orch):
        yield client, target, orch.orchestrator.plan_memory


def test_a_draft_that_never_agrees_leaves_most_steps_to_the_target_alone(unrelated: SpecdecClient) -> None:
    for prompt in PROMPTS:
        alone = unrelated.generate(prompt, max_tokens=MAX_TOKENS, speculative=False)
        auto = unrelated.generate(prompt, max_tokens=MAX_TOKENS, num_draft="auto")
        assert list(auto.token_ids) == list(alone.token_ids)
        stats = auto.stats
        assert stats.accepted == 0
        assert steps_at_k0(stats) >= 0.75 * stats.steps, (stats.steps, list(stats.proposed_per_position))


class SlowVerify:
    """Delays every Verify of a target worker by ``delay_s`` before its real work."""

    def __init__(self, target: Worker):
        self.host = target.host
        self.verify = target.host.verify
        self.delay_s = 0.0

    async def __call__(self, request: Any) -> Any:
        await asyncio.sleep(self.delay_s)
        return await self.verify(request)

    def __enter__(self) -> SlowVerify:
        self.host.verify = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.host.verify = self.verify


def greedy_step_cost(memory: PlanMemory) -> float:
    """What the replica pair's costs say a target-alone step costs (seconds): a timed planner's."""
    (costs,) = memory.pairs.values()
    return step_time(costs.costs(), 0)


def test_seeded_sampling_does_not_follow_timing_but_greedy_does(
        related: tuple[SpecdecClient, Worker, PlanMemory]) -> None:
    client, target, memory = related
    seeded = dict(max_tokens=MAX_TOKENS, num_draft="auto", temperature=1.0, seed=11)
    greedy = dict(max_tokens=MAX_TOKENS, num_draft="auto")
    runs: dict[float, dict[str, Any]] = {}
    step_cost: dict[float, float] = {}
    with SlowVerify(target) as slow:
        for delay in (0.0, TARGET_DELAY_S):
            slow.delay_s = delay
            for _ in range(2):  # the second learns from the first (the orchestrator's k memory)
                runs[delay] = {"seeded": client.generate(PROMPTS[0], **seeded),
                               "greedy": client.generate(PROMPTS[0], **greedy)}
            step_cost[delay] = greedy_step_cost(memory)
    fast, slow_runs = runs[0.0], runs[TARGET_DELAY_S]
    assert list(fast["seeded"].token_ids) == list(slow_runs["seeded"].token_ids)
    assert list(fast["seeded"].stats.proposed_per_position) == list(slow_runs["seeded"].stats.proposed_per_position)
    assert list(fast["greedy"].token_ids) == list(slow_runs["greedy"].token_ids)
    # The greedy planner saw the slowdown: what it learned a target step costs grew by most of
    # the delay. (Whether it then drafts more depends on the few drafts this near-draft gets
    # accepted, ~4% on this prompt: asserting on that made the test flaky.)
    drafted = (fast["greedy"].stats.proposed, slow_runs["greedy"].stats.proposed)
    print(f"greedy auto drafted {drafted[0]} tokens with a fast target, {drafted[1]} with a slow one; "
          f"a target step learned as {step_cost[0.0] * 1e3:.1f} ms, then {step_cost[TARGET_DELAY_S] * 1e3:.1f} ms")
    assert step_cost[TARGET_DELAY_S] > step_cost[0.0] + TARGET_DELAY_S / 2, step_cost
