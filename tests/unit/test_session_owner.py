"""The orchestrator's side of session ownership (``orchestrator/replicas.py``): one owner id per
pool (process), sent with every OpenSession and every Info the health watch makes (which renews
the lease), and no start beside a worker whose lease its health checks could not renew."""

from __future__ import annotations

import asyncio
from unittest.mock import AsyncMock, MagicMock

import pytest

from orchestrator.replicas import IncompatibleReplicas, ReplicaPool
from specdec_pb import specdec_pb2 as pb


def pool_with_target(owner_lease_s: float, health_interval_s: float = 1.0) -> ReplicaPool:
    def channel(address: str) -> MagicMock:
        made = MagicMock()
        made.close = AsyncMock()
        return made

    pool = ReplicaPool([], ["t:1"], channel_factory=channel, health_interval_s=health_interval_s)
    limits = pb.Limits(max_decoder_tokens=4096, max_draft=32, max_batch=16, max_prompt_tokens=2048,
                       owner_lease_s=owner_lease_s)
    stub = pool.replicas[0].backend.stub
    stub.Info = AsyncMock(return_value=pb.InfoResponse(vocab_size=512, role="target", limits=limits))
    stub.OpenSession = AsyncMock(return_value=pb.OpenSessionResponse(session_id="s", length=1))
    return pool


def test_the_pool_names_its_owner_on_every_open_and_every_info() -> None:
    pool = pool_with_target(owner_lease_s=10.0)
    assert pool.owner and pool.owner != pool_with_target(owner_lease_s=10.0).owner  # one per process
    replica = pool.replicas[0]

    async def run() -> None:
        try:
            await pool.start(1.0)
            await replica.backend.open([5, 1], "req", 5.0)
            await pool._read_load(replica)  # what the health watch does at every check
        finally:
            await pool.close()

    asyncio.run(run())
    opened = replica.backend.stub.OpenSession.await_args.args[0]
    assert opened.owner == pool.owner and opened.client_tag == "req"
    infos = [call.args[0] for call in replica.backend.stub.Info.await_args_list]
    assert len(infos) == 2 and all(info.owner == pool.owner for info in infos)


@pytest.mark.parametrize("lease, interval, starts", [
    (10.0, 1.0, True), (3.0, 1.0, True), (2.9, 1.0, False), (1.0, 0.25, True), (10.0, 3600.0, False),
    (0.0, 3600.0, True),  # a worker that reports no lease (older) is not checked
])
def test_an_orchestrator_refuses_a_worker_whose_lease_its_health_checks_cannot_renew(
        lease: float, interval: float, starts: bool) -> None:
    pool = pool_with_target(lease, interval)

    async def run() -> None:
        try:
            await pool.start(1.0)
        finally:
            await pool.close()

    if starts:
        asyncio.run(run())
    else:
        with pytest.raises(IncompatibleReplicas, match="--owner-lease.*--health-interval"):
            asyncio.run(run())
