"""Sessions that cannot be orphaned (issue 31): a request cancelled while its sessions open leaves
none behind, an open whose caller's deadline passes while it encodes keeps nothing, the
sessions of an orchestrator that stops renewing its owner lease are freed within the lease, and
a close that failed is asked again while the orchestrator lives.

The churn and the lease run against the bundled demo pair as real processes on loopback, with a
short ``--owner-lease``. The orchestrator runs in the test's process (its health checks, which
renew its lease, every 0.25 s), paced (``procs.Pacer``): every answer it gets from a worker is
10 ms on its way, as over a real network, so a cancel often lands while an OpenSession's answer
is in flight: the worker has opened the session, the request no longer waits for it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import LoopThread, RunningOrchestrator, start_orchestrator_in, start_worker_in
from procs import Pacer, ServiceProcess, start_all, start_worker, wait_until

from orchestrator.client import SpecdecClient, build_request
from orchestrator.replicas import ReplicaPool
from specdec_core.errors import DeadlineExceeded
from specdec_pb import specdec_pb2_grpc as pb_grpc

MODELS = Path(__file__).resolve().parents[1] / "models"
OWNER_LEASE_S = 1.5
HEALTH_INTERVAL_S = 0.25
ANSWER_LATENCY_S = 0.01
CLIENTS, REQUESTS_PER_CLIENT = 4, 20
PROMPT_IDS = [12, 30, 7, 44, 1]  # the demo pair's vocabulary is 65; 1 is EOS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    """A demo draft and target with a short owner lease."""
    log_dir = tmp_path_factory.mktemp("ownership")
    lease = ["--owner-lease", f"{OWNER_LEASE_S:g}"]
    workers = start_all([start_worker(role, MODELS / f"demo-{role}", log_dir, extra=lease, wait=False)
                         for role in ("draft", "target")])
    try:
        yield dict(zip(("draft", "target"), workers, strict=True))
    finally:
        for worker in workers:
            worker.kill()


@pytest.fixture(scope="module")
def orchestrator(demo: dict[str, ServiceProcess], loop: LoopThread) -> Iterator[RunningOrchestrator]:
    """An orchestrator over them that renews often, whose workers' answers are 10 ms on their way."""
    orch = start_orchestrator_in(loop, [demo["draft"].address], [demo["target"].address],
                                 health_interval_s=HEALTH_INTERVAL_S)
    Pacer(orch.pool, delay_s=ANSWER_LATENCY_S)
    try:
        yield orch
    finally:
        orch.stop()


def workers(demo: dict[str, ServiceProcess]) -> list[ServiceProcess]:
    return list(demo.values())


def reclaimed(demo: dict[str, ServiceProcess]) -> int:
    return sum(w.info().metrics.sessions_reclaimed for w in workers(demo))


def test_generations_cancelled_as_they_start_leave_no_session_behind(
        demo: dict[str, ServiceProcess], orchestrator: RunningOrchestrator) -> None:
    """4 clients at a time start a generation and cancel it 0-15 ms later (while its sessions open,
    or just after): afterwards no worker holds a session, though the orchestrator that opened
    them is alive and renewing (so its lease frees nothing), and a new request is served."""
    before = reclaimed(demo)
    address = orchestrator.address

    def client(index: int) -> None:
        rng = random.Random(index)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.OrchestratorStub(channel)
            for _ in range(REQUESTS_PER_CLIENT):
                call = stub.GenerateStream(build_request(f"spell {rng.randrange(10**6)}", max_tokens=32,
                                                         num_draft=3), timeout=30)
                time.sleep(rng.uniform(0, 0.015))
                call.cancel()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Closes run just after each cancel; a session left open would stay for --session-ttl (300 s).
    wait_until(lambda: all(w.live_sessions() == 0 for w in workers(demo)), 5, interval=0.1,
               what="no session left on either worker")
    assert reclaimed(demo) == before  # closed by the orchestrator, not freed by its lease
    with SpecdecClient(address, timeout=30) as api:
        assert api.generate("spell 7", max_tokens=8, num_draft=3).token_ids


def test_a_pool_that_stops_renewing_loses_its_sessions_within_the_lease(
        demo: dict[str, ServiceProcess], orchestrator: RunningOrchestrator, loop: LoopThread) -> None:
    """An orchestrator's sessions outlive several leases while its health checks renew them, and
    are freed within the lease (+ one sweep) once it stops (here: its pool closed without closing
    them, as a killed orchestrator leaves them); the other orchestrator's are untouched."""
    async def start_pool() -> ReplicaPool:  # its channels belong to the loop it runs on
        pool = ReplicaPool([demo["draft"].address], [demo["target"].address], grpc.aio.insecure_channel,
                           health_interval_s=HEALTH_INTERVAL_S)
        await pool.start(30)
        return pool

    pool = loop.call(start_pool())
    try:
        opened = 0
        for role in ("draft", "target"):
            backend = pool.acquire(role, set())
            for _ in range(3):
                loop.call(backend.open(PROMPT_IDS, "owned", 30))
                opened += 1
        before = reclaimed(demo)
        time.sleep(3 * OWNER_LEASE_S)  # idle sessions, renewed by the pool's health checks alone
        assert sum(w.live_sessions() for w in workers(demo)) == opened
    finally:
        loop.call(pool.close())
    # Freed after the lease and one sweep (1.8 s here); without it they would stay --session-ttl (300 s).
    wait_until(lambda: sum(w.live_sessions() for w in workers(demo)) == 0, OWNER_LEASE_S + 2, interval=0.05,
               what="the silent owner's sessions freed")
    assert reclaimed(demo) == before + opened
    with SpecdecClient(orchestrator.address, timeout=30) as api:  # the live orchestrator is served
        assert api.generate("spell 42", max_tokens=8, num_draft=3).token_ids


class _DropsFirstClose:
    """A replica's stub whose first CloseSession never reaches the worker (UNAVAILABLE, as when the
    connection drops under it); every other call goes through."""

    def __init__(self, stub: object):
        self._stub = stub
        self.dropped = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._stub, name)

    async def CloseSession(self, request: object, timeout: float | None = None, metadata: object = ()) -> object:
        if not self.dropped:
            self.dropped += 1
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "connection dropped (test)")
        return await self._stub.CloseSession(request, timeout=timeout, metadata=metadata)


def test_a_close_that_failed_is_asked_again_while_the_owner_lives(
        demo: dict[str, ServiceProcess], loop: LoopThread) -> None:
    """Each worker's close of a finished request's session fails once, while the orchestrator lives
    and renews its lease: its health checks ask again, and both workers are back to no session
    within seconds (without that, --session-ttl: 300 s), closed by it, not freed by the lease."""
    orch = start_orchestrator_in(loop, [demo["draft"].address], [demo["target"].address],
                                 health_interval_s=HEALTH_INTERVAL_S, metrics_port=0)
    try:
        stubs = []
        for replica in orch.pool.replicas:
            replica.backend.stub = _DropsFirstClose(replica.backend.stub)
            stubs.append(replica.backend.stub)
        wait_until(lambda: sum(w.live_sessions() for w in workers(demo)) == 0, 5, what="no session left before")
        before = reclaimed(demo)
        with SpecdecClient(orch.address, timeout=30) as api:
            assert api.generate("spell 7", max_tokens=8, num_draft=3).token_ids
        assert [stub.dropped for stub in stubs] == [1, 1]  # both closes failed
        wait_until(lambda: sum(w.live_sessions() for w in workers(demo)) == 0, 3 * OWNER_LEASE_S, interval=0.05,
                   what="the sessions whose close failed closed")
        assert reclaimed(demo) == before  # closed by the orchestrator, not freed by a lease
        registry = orch.orchestrator.metrics.registry
        for role in ("draft", "target"):
            for event, count in (("failed", 1), ("closed", 1), ("dropped", 0)):
                assert registry.get_sample_value("specdec_unfinished_closes_total",
                                                 {"role": role, "event": event}) == count, (role, event)
        assert all(len(replica.unclosed) == 0 for replica in orch.pool.replicas)
    finally:
        orch.stop()
        orch.running.metrics.close()


def test_an_open_whose_deadline_passes_while_it_encodes_keeps_no_session(loop: LoopThread, draft_dir: Path) -> None:
    """The caller has given up (DEADLINE_EXCEEDED) by the time its prompt is encoded: the session is
    not kept, and its reservation is given back (a later open on a full worker fits)."""
    from specdec_core.session_host import HostLimits

    worker = start_worker_in(loop, "draft", draft_dir, HostLimits(max_sessions=1))
    try:
        host = worker.host
        start_batch = host.engine.start_batch

        def slow_start(prompts: list[list[int]]) -> object:
            time.sleep(0.3)  # encoding outlasts the caller's deadline
            return start_batch(prompts)

        host.engine.start_batch = slow_start  # type: ignore[method-assign]
        with pytest.raises(DeadlineExceeded):
            loop.call(host.open(PROMPT_IDS, "late", deadline=time.monotonic() + 0.1))
        assert len(host.store) == 0
        del host.engine.start_batch
        session = loop.call(host.open(PROMPT_IDS, "next"))  # the one session the limit allows
        assert loop.call(host.close(session.id))
        loop.call(asyncio.sleep(0))
    finally:
        worker.stop()
