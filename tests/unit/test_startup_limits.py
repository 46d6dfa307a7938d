"""Limits declared once (HostLimits) and checked where they meet: the workers' flags and Info
follow the declaration, and an orchestrator refuses to start beside a worker that cannot serve
what its own limits let a request ask (decoder length, k, prompt length), or whose Info reports
limits no worker could have started with."""

from __future__ import annotations

import asyncio
import re
from dataclasses import fields
from unittest.mock import AsyncMock, MagicMock

import pytest

from orchestrator.generation import OrchestratorLimits
from orchestrator.replicas import IncompatibleReplicas, ReplicaPool
from orchestrator.server import decoder_tokens_needed, worker_needs
from specdec_core.host_limits import HostLimits
from specdec_pb import specdec_pb2 as pb


def pool_with_target(max_decoder_tokens: int = 4096, **limits: int) -> ReplicaPool:
    def channel(address: str) -> MagicMock:
        made = MagicMock()
        made.close = AsyncMock()
        return made

    pool = ReplicaPool([], ["t:1"], channel_factory=channel)
    declared = {"max_draft": 32, "max_batch": 16, "max_prompt_tokens": 2048, **limits}
    info = pb.InfoResponse(vocab_size=512, role="target",
                           limits=pb.Limits(max_decoder_tokens=max_decoder_tokens, **declared))
    pool.replicas[0].backend.stub.Info = AsyncMock(return_value=info)
    return pool


def start(pool: ReplicaPool, limits: OrchestratorLimits) -> None:
    async def run() -> None:
        try:
            await pool.start(1.0, worker_needs(limits))
        finally:
            await pool.close()

    asyncio.run(run())


@pytest.mark.parametrize("held, starts", [(2065, True), (2064, False)])
def test_an_orchestrator_refuses_workers_with_sessions_shorter_than_its_longest_request(held: int,
                                                                                       starts: bool) -> None:
    limits = OrchestratorLimits(max_tokens_cap=2048, max_num_draft=16)
    assert decoder_tokens_needed(limits) == 2065  # the start token, 2048 tokens and a block of 16 drafts
    if starts:
        start(pool_with_target(held), limits)
    else:
        with pytest.raises(IncompatibleReplicas, match="--max-decoder-tokens"):
            start(pool_with_target(held), limits)


@pytest.mark.parametrize("worker, orchestrator, flags", [
    ({"max_draft": 15}, OrchestratorLimits(max_num_draft=16), "takes k up to 15 (its --max-draft) and a request "
                                                              "may ask for 16 (this orchestrator's --max-num-draft)"),
    ({"max_prompt_tokens": 511}, OrchestratorLimits(max_prompt_tokens=512),
     "takes prompts of up to 511 tokens (its --max-prompt-tokens) and this orchestrator accepts 512"),
])
def test_an_orchestrator_refuses_workers_that_cannot_take_its_largest_k_or_prompt(
        worker: dict[str, int], orchestrator: OrchestratorLimits, flags: str) -> None:
    """Today a request asking for either would fail INVALID_ARGUMENT from the worker, blaming the
    client: refused at start-up instead, naming both values and flags."""
    with pytest.raises(IncompatibleReplicas, match=re.escape("refusing to start: target t:1 " + flags)):
        start(pool_with_target(**worker), orchestrator)
    name, held = next(iter(worker.items()))
    start(pool_with_target(**{name: held + 1}), orchestrator)  # one more, and it starts


@pytest.mark.parametrize("limits", [{"max_draft": 0}, {"max_draft": -3}, {"max_batch": 0},
                                    {"max_prompt_tokens": -1}, {"max_draft": 10_000}])
def test_an_orchestrator_refuses_a_worker_whose_info_reports_impossible_limits(limits: dict[str, int]) -> None:
    """A max_draft of 0 would cap every k at 0, a max_batch of 0 price a pass as shared by every
    session: limits outside their flag's range are garbage, and the replica is refused."""
    with pytest.raises(IncompatibleReplicas, match="its Info reports " + next(iter(limits))):
        start(pool_with_target(**limits), OrchestratorLimits(max_num_draft=1, max_prompt_tokens=1))


def test_a_replica_that_returns_short_of_the_limits_stays_out_of_rotation() -> None:
    """A replica that comes back (health SERVING again) with a smaller --max-draft than this
    orchestrator's --max-num-draft is not put back: its last_error says why."""
    from grpc_health.v1 import health_pb2

    async def run() -> None:
        pool = pool_with_target()
        try:
            await pool.start(1.0, worker_needs(OrchestratorLimits()))
            replica = pool.replicas[0]
            replica.healthy = False  # it failed a call, then restarted with --max-draft 4
            replica.backend.stub.Info.return_value = pb.InfoResponse(
                vocab_size=512, role="target", limits=pb.Limits(max_decoder_tokens=4096, max_draft=4, max_batch=16,
                                                                max_prompt_tokens=2048))
            replica.health.Check = AsyncMock(return_value=health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVING))
            await pool._check(replica)
            assert not replica.healthy and "takes k up to 4" in replica.last_error
            assert pool.acquire("target", set()) is None
        finally:
            await pool.close()

    asyncio.run(run())


def test_every_worker_limit_has_one_flag_and_every_info_limit_is_one() -> None:
    flags = [limit.metadata["flag"] for limit in fields(HostLimits)]
    assert len(set(flags)) == len(flags) and all(flag.startswith("--") for flag in flags)
    names = {limit.name for limit in fields(HostLimits)}
    assert set(pb.Limits.DESCRIPTOR.fields_by_name) <= names  # Info reports declared limits only


def test_the_sessions_that_could_share_a_target_pass_count_every_orchestrators_up_to_max_batch() -> None:
    from orchestrator.replicas import Load

    pool = pool_with_target(4096)
    replica = pool.replicas[0]
    replica.info = pb.InfoResponse(limits=pb.Limits(max_batch=16))
    replica.active_sessions = 3
    assert pool.sessions_sharing(replica.backend) == 3  # ours, before any Info load was read
    replica.load = Load(live_sessions=9, cache_bytes_used=0, cache_memory_bytes=1, typical_sessions_free=0, steps=0,
                        at=0.0)
    assert pool.sessions_sharing(replica.backend) == 9  # every orchestrator's sessions on it
    replica.load = Load(live_sessions=40, cache_bytes_used=0, cache_memory_bytes=1, typical_sessions_free=0, steps=0,
                        at=0.0)
    assert pool.sessions_sharing(replica.backend) == 16  # no more than one pass takes
    assert pool.sessions_sharing(object()) == 1  # not one of the pool's


def pool_with_targets(*settings: dict[str, object]) -> ReplicaPool:
    """Targets answering Info with the same tokenizer and limits, each with its own ``settings``."""
    def channel(address: str) -> MagicMock:
        made = MagicMock()
        made.close = AsyncMock()
        return made

    pool = ReplicaPool([], [f"t:{i}" for i in range(len(settings))], channel_factory=channel)
    limits = pb.Limits(max_decoder_tokens=4096, max_draft=32, max_batch=16, max_prompt_tokens=2048)
    for replica, setting in zip(pool.replicas, settings, strict=True):
        info = pb.InfoResponse(vocab_size=512, role="target", limits=limits, **setting)
        replica.backend.stub.Info = AsyncMock(return_value=info)
    return pool


@pytest.mark.parametrize("field, first, second", [("kv_bits", 0, 8), ("kv_group_size", 64, 32),
                                                   ("dtype", "float32", "bfloat16"),
                                                   ("quantization_bits", 0, 4)])
def test_target_replicas_must_be_one_target(field: str, first: object, second: object) -> None:
    """A failover moves a request to another target replica: one with other numerics or another
    cache setting writes other tokens, so the pool refuses to start with it."""
    with pytest.raises(IncompatibleReplicas, match=f"target t:1 is incompatible .*{field}"):
        start(pool_with_targets({field: first}, {field: second}), OrchestratorLimits())
    start(pool_with_targets({field: first}, {field: first}), OrchestratorLimits())
