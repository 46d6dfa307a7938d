"""Limits declared once (HostLimits) and checked where they meet: the workers' flags and Info
follow the declaration, and an orchestrator refuses to start beside a worker whose sessions are
shorter than its longest request."""

from __future__ import annotations

import asyncio
from dataclasses import fields
from unittest.mock import AsyncMock, MagicMock

import pytest

from orchestrator.generation import OrchestratorLimits
from orchestrator.replicas import IncompatibleReplicas, ReplicaPool
from orchestrator.server import decoder_tokens_needed
from specdec_core.host_limits import HostLimits
from specdec_pb import specdec_pb2 as pb


def pool_with_target(max_decoder_tokens: int) -> ReplicaPool:
    def channel(address: str) -> MagicMock:
        made = MagicMock()
        made.close = AsyncMock()
        return made

    pool = ReplicaPool([], ["t:1"], channel_factory=channel)
    info = pb.InfoResponse(vocab_size=512, role="target",
                           limits=pb.Limits(max_decoder_tokens=max_decoder_tokens, max_draft=8))
    pool.replicas[0].backend.stub.Info = AsyncMock(return_value=info)
    return pool


@pytest.mark.parametrize("held, starts", [(2065, True), (2064, False)])
def test_an_orchestrator_refuses_workers_with_sessions_shorter_than_its_longest_request(held: int,
                                                                                       starts: bool) -> None:
    needed = decoder_tokens_needed(OrchestratorLimits(max_tokens_cap=2048, max_num_draft=16))
    assert needed == 2065  # the start token, 2048 tokens and a block of 16 drafts

    async def start() -> None:
        pool = pool_with_target(held)
        try:
            await pool.start(1.0, decoder_tokens_needed=needed)
        finally:
            await pool.close()

    if starts:
        asyncio.run(start())
    else:
        with pytest.raises(IncompatibleReplicas, match="--max-decoder-tokens"):
            asyncio.run(start())


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
