"""Limits of the orchestrator and of the draft/target services, end to end over gRPC.

Each limit is set by its command-line flag (checked through the parsers), refuses with the
designed status (INVALID_ARGUMENT for a request that asks too much, RESOURCE_EXHAUSTED for
a full service) and a message naming the limit, and leaves the services serving.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from harness import (
    LoopThread,
    RunningOrchestrator,
    Worker,
    position_bytes,
    start_orchestrator_in,
    start_worker_in,
)
from procs import Pacer, wait_until

from orchestrator.client import SpecdecClient
from orchestrator.generation import OrchestratorLimits
from orchestrator.server import OrchestratorConfig
from orchestrator.server import build_parser as orchestrator_parser
from specdec_core.session_host import HostLimits
from specdec_core.sizes import format_bytes
from specdec_grpc.worker import WorkerConfig
from specdec_grpc.worker import build_parser as worker_parser
from specdec_tools.tiny_checkpoints import corpus_lines

PROMPT = corpus_lines()[13]  # 18 tokens
CODE = grpc.StatusCode
PACE_S = 0.03  # per draft/target answer: keeps a stream in flight while a second one arrives

pytestmark = pytest.mark.timeout(120)


# -- flags ----------------------------------------------------------------------------------------


def test_orchestrator_flags_set_its_limits() -> None:
    args = orchestrator_parser().parse_args([
        "--target", "127.0.0.1:1", "--max-prompt-tokens", "7", "--max-tokens-cap", "9",
        "--default-max-tokens", "5", "--max-num-draft", "3", "--default-num-draft", "2",
        "--max-generations", "4", "--health-interval", "0.25", "--connect-timeout", "3",
    ])
    config = OrchestratorConfig.from_args(args)
    assert config.limits == OrchestratorLimits(max_prompt_tokens=7, max_tokens_cap=9, default_max_tokens=5,
                                               max_num_draft=3, default_num_draft=2, max_generations=4)
    assert config.health_interval_s == 0.25 and config.connect_timeout_s == 3


@pytest.mark.parametrize("role", ["draft", "target"])
def test_worker_flags_set_its_limits(role: str) -> None:
    args = worker_parser(role).parse_args([
        "--model", "unused", "--max-sessions", "3", "--cache-memory", "1.5GiB", "--max-prompt-tokens", "11",
        "--max-draft", "4", "--session-ttl", "7.5",
    ])
    config = WorkerConfig.from_args(role, args)
    assert config.limits == HostLimits(max_sessions=3, cache_memory_bytes=3 * 2**29, max_prompt_tokens=11,
                                       max_draft=4, session_ttl_s=7.5)


# -- a small cluster per test: in-process draft, target and orchestrator -----------------------------


@dataclass
class Cluster:
    client: SpecdecClient
    orch: RunningOrchestrator
    draft: Worker
    target: Worker
    pacer: Pacer

    def sessions(self) -> tuple[int, int]:
        return self.draft.host.snapshot()["live_sessions"], self.target.host.snapshot()["live_sessions"]



@pytest.fixture
def make_cluster(loop: LoopThread, near_draft_dir: Path, target_dir: Path):  # type: ignore[no-untyped-def]
    stack = contextlib.ExitStack()

    def make(draft: HostLimits | None = None, target: HostLimits | None = None,
             orchestrator: OrchestratorLimits | None = None) -> Cluster:
        d = start_worker_in(loop, "draft", near_draft_dir, limits=draft)
        stack.callback(d.stop)
        t = start_worker_in(loop, "target", target_dir, limits=target)
        stack.callback(t.stop)
        orch = start_orchestrator_in(loop, [d.address], [t.address], limits=orchestrator or OrchestratorLimits())
        stack.callback(orch.stop)
        client = SpecdecClient(orch.address, timeout=30)
        stack.callback(client.close)
        return Cluster(client, orch, d, t, Pacer(orch.pool))

    with stack:
        yield make


def refused(call, code: grpc.StatusCode, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    """Run ``call``; assert it fails with ``code`` and a message holding every fragment."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    return info.value.details()


def assert_still_serving(cluster: Cluster) -> None:
    response = cluster.client.generate(PROMPT, max_tokens=8, num_draft=2)
    assert response.stats.tokens == 8
    wait_until(lambda: cluster.sessions() == (0, 0), 1.0, what="no sessions left")
    assert cluster.client.status().active_generations == 0


def second_while_first_streams(cluster: Cluster, **options) -> str:  # type: ignore[no-untyped-def]
    """Start a slow stream, and while it holds its sessions send a second request: it must be
    refused with RESOURCE_EXHAUSTED (its message is returned). The first one still finishes."""
    cluster.pacer.delay_s = PACE_S
    first = cluster.client.stream(PROMPT, max_tokens=48, num_draft=2, **options)
    chunks = [next(first)]
    details = refused(lambda: cluster.client.generate(PROMPT, max_tokens=8, num_draft=2, **options),
                      CODE.RESOURCE_EXHAUSTED)
    chunks.extend(first)
    assert chunks[-1].finish_reason == "length"
    cluster.pacer.delay_s = 0
    return details


# -- orchestrator limits ----------------------------------------------------------------------------


def test_orchestrator_request_limits_are_invalid_argument(make_cluster) -> None:
    cluster = make_cluster(orchestrator=OrchestratorLimits(max_prompt_tokens=12, max_tokens_cap=16,
                                                           max_num_draft=4))
    client = cluster.client
    refused(lambda: client.generate(PROMPT, max_tokens=8), CODE.INVALID_ARGUMENT, "max_prompt_tokens is 12")
    # Defaults above a lowered cap are clamped to it.
    assert client.generate("spell 1").stats.tokens == 16
    assert client.generate("spell 1", max_tokens=4).stats.final_num_draft == 4
    refused(lambda: client.generate("spell 1", max_tokens=17), CODE.INVALID_ARGUMENT, "max_tokens_cap", "16")
    refused(lambda: client.generate("spell 1", num_draft=5), CODE.INVALID_ARGUMENT, "max_num_draft", "4")
    refused(lambda: client.stream("spell 1", max_tokens=17), CODE.INVALID_ARGUMENT, "max_tokens_cap")
    # At the limits exactly, requests run.
    response = client.generate("spell 1", max_tokens=16, num_draft=4)
    assert response.stats.tokens == 16 and response.stats.final_num_draft == 4
    auto = client.generate("spell 1", max_tokens=16, num_draft="auto")
    assert auto.stats.final_num_draft <= 4
    assert cluster.sessions() == (0, 0) and client.status().active_generations == 0


def test_max_generations_is_resource_exhausted(make_cluster) -> None:
    cluster = make_cluster(orchestrator=OrchestratorLimits(max_generations=1))
    details = second_while_first_streams(cluster)
    assert "max_generations is 1" in details
    assert cluster.client.status().max_generations == 1
    # The slot is given back after success and after errors alike.
    refused(lambda: cluster.client.generate(PROMPT, max_tokens=10**6), CODE.INVALID_ARGUMENT)
    assert_still_serving(cluster)
    assert_still_serving(cluster)


# -- service limits, surfacing through the orchestrator ------------------------------------------------


def test_target_session_limit_is_resource_exhausted(make_cluster) -> None:
    cluster = make_cluster(target=HostLimits(max_sessions=1))
    details = second_while_first_streams(cluster)
    assert "every target replica is full" in details and "max_sessions=1" in details
    assert_still_serving(cluster)


def test_full_draft_falls_back_to_the_target_alone(make_cluster) -> None:
    """A draft at its session limit is not an error for the client: the request decodes with
    the target alone (same output), and the first request still finishes speculatively."""
    cluster = make_cluster(draft=HostLimits(max_sessions=1))
    expected = cluster.client.generate(PROMPT, max_tokens=8, speculative=False).token_ids
    cluster.pacer.delay_s = PACE_S
    first = cluster.client.stream(PROMPT, max_tokens=48, num_draft=2)
    chunks = [next(first)]
    second = cluster.client.generate(PROMPT, max_tokens=8, num_draft=2)
    chunks.extend(first)
    cluster.pacer.delay_s = 0
    assert list(second.token_ids) == list(expected)
    assert second.stats.proposed == 0 and second.stats.draft_replica == ""
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.proposed > 0
    assert_still_serving(cluster)


def test_service_cache_budget_is_resource_exhausted(make_cluster, target_dir: Path) -> None:
    # One session holds 256 decoder slots plus its prompt (18 tokens); two do not fit in 400.
    position = position_bytes(target_dir)
    cluster = make_cluster(target=HostLimits(cache_memory_bytes=400 * position))
    details = second_while_first_streams(cluster)
    assert (f"needs {format_bytes(274 * position)}, {format_bytes(126 * position)} free of "
            f"{format_bytes(400 * position)} (--cache-memory)") in details
    assert_still_serving(cluster)


def test_cache_budget_reached_mid_generation(make_cluster, target_dir: Path) -> None:
    # Room for the first 256 decoder positions only: growing past them is refused mid-stream.
    position = position_bytes(target_dir)
    cluster = make_cluster(target=HostLimits(cache_memory_bytes=300 * position),
                           orchestrator=OrchestratorLimits(max_tokens_cap=400))
    chunks = []
    with pytest.raises(grpc.RpcError) as info:
        for chunk in cluster.client.stream(PROMPT, max_tokens=400, num_draft=3):
            chunks.append(chunk)
    assert info.value.code() == CODE.RESOURCE_EXHAUSTED
    assert f"needs {format_bytes(256 * position)}, {format_bytes(26 * position)} free" in info.value.details()
    assert 200 < sum(len(c.token_ids) for c in chunks) < 256
    assert_still_serving(cluster)


def test_service_request_limits_are_invalid_argument(make_cluster) -> None:
    # (an orchestrator allowing more than its workers take refuses to start: test_startup_limits)
    cluster = make_cluster(draft=HostLimits(max_draft=2), target=HostLimits(max_prompt_tokens=10),
                           orchestrator=OrchestratorLimits(max_num_draft=2, max_prompt_tokens=10))
    refused(lambda: cluster.client.generate(PROMPT, max_tokens=4), CODE.INVALID_ARGUMENT,
            "max_prompt_tokens is 10")
    refused(lambda: cluster.client.generate("spell 1", max_tokens=8, num_draft=3), CODE.INVALID_ARGUMENT,
            "num_draft", "[1, 2]")
    response = cluster.client.generate("spell 1", max_tokens=8, num_draft=2)
    assert response.stats.tokens == 8
    assert cluster.sessions() == (0, 0)


def test_info_reports_the_configured_limits(make_cluster) -> None:
    limits = HostLimits(max_sessions=5, cache_memory_bytes=12345, max_prompt_tokens=99, max_draft=7,
                        session_ttl_s=42.0)
    cluster = make_cluster(draft=limits, orchestrator=OrchestratorLimits(max_num_draft=7, max_prompt_tokens=99))
    info = cluster.orch.pool.of_role("draft")[0].info
    assert (info.limits.max_sessions, info.limits.cache_memory_bytes, info.limits.max_prompt_tokens,
            info.limits.max_draft, info.limits.session_ttl_s) == (5, 12345, 99, 7, 42.0)
