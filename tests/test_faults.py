"""Replica failures, cancellation and deadlines, with real service processes.

Two drafts and two targets run as separate processes on fixed ports, so a replica killed with
SIGKILL can be restarted on the same address. The orchestrator runs in this process (the
real server and loop) with a ``Pacer`` that holds each draft/target answer back a little:
tiny models would otherwise finish a 64-token generation before a test could act mid-way.

Reference: transformers' greedy ``generate`` of the target alone. Failover reopens the
session on another replica from the prompt and the committed tokens, so greedy output is
unchanged token for token.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from harness import LoopThread, RunningOrchestrator, start_orchestrator_in
from procs import GreedyReference, Pacer, ServiceProcess, free_port, start_all, start_worker, wait_until

from orchestrator.client import SpecdecClient
from orchestrator.speculative import DEFAULT_CALL_TIMEOUT_S
from specdec_pb import specdec_pb2 as pb
from specdec_tools.tiny_checkpoints import corpus_lines

MAX_TOKENS = 64
NUM_DRAFT = 2
PACE_S = 0.03  # per draft/target answer: a 64-token generation takes ~1.5 s
HEALTH_INTERVAL_S = 0.1
# How long to wait for something that should happen promptly (sessions closed, a replica back):
# only a bound on a hang. What a test proves is in its assertions (sessions closed by the
# orchestrator, not by the replicas' 300 s idle TTL), not in how fast a loaded machine gets there.
FREED_DEADLINE_S = 30.0
CANDIDATES = corpus_lines()[13:1300:13]
PROMPTS: list[str] = []  # 8 candidates the tiny target does not end within 64 tokens (filled below)
CODE = grpc.StatusCode

pytestmark = pytest.mark.timeout(600)


@dataclass
class Cluster:
    loop: LoopThread
    models: dict[str, Path]
    log_dir: Path
    workers: dict[str, list[ServiceProcess]]  # role -> replicas, each on its own fixed port
    orch: RunningOrchestrator
    pacer: Pacer
    client: SpecdecClient

    def addresses(self, role: str) -> list[str]:
        return [w.address for w in self.workers[role]]

    def replica_status(self, address: str) -> pb.ReplicaStatus:
        return next(r for r in self.client.status().replicas if r.address == address)

    def serving(self, role: str) -> ServiceProcess:
        """The replica of ``role`` the one generation in flight is pinned to (orchestrator's Status)."""
        busy = {r.address for r in self.client.status().replicas if r.role == role and r.active_sessions}
        assert len(busy) == 1, busy
        return next(w for w in self.workers[role] if w.address in busy)

    def live_sessions(self) -> dict[str, int]:
        return {w.address: w.live_sessions() for ws in self.workers.values() for w in ws if w.alive()}

    def revive(self) -> None:
        """Restart every dead replica on its old port; wait until the health watch routes to it."""
        restarted = []
        for role, replicas in self.workers.items():
            for i, worker in enumerate(replicas):
                if not worker.alive():
                    replicas[i] = start_worker(role, self.models[role], self.log_dir, port=worker.port, wait=False)
                    restarted.append(replicas[i])
        start_all(restarted)
        for worker in restarted:
            wait_until(lambda w=worker: self.replica_status(w.address).healthy, FREED_DEADLINE_S,
                       what=f"{worker.role} {worker.address} healthy again")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, near_draft_dir: Path, target_dir: Path
            ) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("fault-logs")
    models = {"draft": near_draft_dir, "target": target_dir}
    workers = {role: [start_worker(role, models[role], log_dir, port=free_port(), wait=False) for _ in range(2)]
               for role in ("draft", "target")}
    start_all([w for ws in workers.values() for w in ws])
    loop = LoopThread()
    orch = None
    try:
        orch = start_orchestrator_in(loop, [w.address for w in workers["draft"]],
                                     [w.address for w in workers["target"]],
                                     health_interval_s=HEALTH_INTERVAL_S, connect_timeout_s=30)
        pacer = Pacer(orch.pool, PACE_S)
        with SpecdecClient(orch.address, timeout=60) as client:
            yield Cluster(loop, models, log_dir, workers, orch, pacer, client)
    finally:
        if orch is not None:
            orch.stop()
        loop.close()
        for ws in workers.values():
            for w in ws:
                w.kill()


@pytest.fixture
def fresh(cluster: Cluster) -> Cluster:
    """The cluster with every replica up and routed to, the pacer on, its log empty."""
    cluster.revive()
    cluster.pacer.delay_s = PACE_S
    cluster.pacer.calls.clear()
    wait_until(lambda: not any(cluster.live_sessions().values()), FREED_DEADLINE_S,
               what="no sessions left from before")
    return cluster


@pytest.fixture(scope="module")
def reference(target_dir: Path) -> GreedyReference:
    return GreedyReference(target_dir)


@pytest.fixture(scope="module", autouse=True)
def _long_prompts(reference: GreedyReference) -> None:
    """Kills must land mid-stream: keep prompts whose reference runs the full MAX_TOKENS."""
    PROMPTS[:] = [p for p in CANDIDATES if len(reference(p, MAX_TOKENS)) == MAX_TOKENS][:8]
    assert len(PROMPTS) == 8


def stream_and_act(cluster: Cluster, prompt: str, act: Callable[[], None], after_chunks: int = 3
                   ) -> tuple[list[pb.GenerateStreamResponse], float]:
    """Stream a greedy generation; call ``act`` once ``after_chunks`` chunks arrived (mid-stream).
    Returns the chunks and when ``act`` returned."""
    chunks: list[pb.GenerateStreamResponse] = []
    acted_at = 0.0
    for chunk in cluster.client.stream(prompt, max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT):
        chunks.append(chunk)
        if len(chunks) == after_chunks:
            assert not chunk.finish_reason, "the generation ended before the test could act"
            act()
            acted_at = time.monotonic()
    assert acted_at, "the stream ended before the test could act"
    return chunks, acted_at


def tokens_of(chunks: list[pb.GenerateStreamResponse]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def expired_counts(cluster: Cluster) -> dict[str, int]:
    """Sessions each live replica has dropped at its idle TTL so far."""
    return {w.address: w.info().metrics.sessions_expired for ws in cluster.workers.values() for w in ws
            if w.alive()}


def wait_sessions_closed(cluster: Cluster, expired_before: dict[str, int], what: str) -> float:
    """Wait (event-driven, generous deadline) until no replica holds a session, and check they
    were closed by the orchestrator, not dropped at the replicas' idle TTL (300 s, far beyond
    the deadline). Returns how long it took."""
    started = time.monotonic()
    wait_until(lambda: not any(cluster.live_sessions().values()), FREED_DEADLINE_S, what=what)
    freed_s = time.monotonic() - started
    after = expired_counts(cluster)
    assert all(after[address] == expired_before.get(address, 0) for address in after), (expired_before, after)
    return freed_s


def concurrent_generations(cluster: Cluster, n: int) -> list[pb.GenerateResponse]:
    """n generations at once: the least-loaded choice spreads them over the replicas."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(
            lambda i: cluster.client.generate(PROMPTS[i], max_tokens=16, num_draft=NUM_DRAFT), range(n)
        ))


# -- cancellation and deadlines --------------------------------------------------------------------


def test_cancelled_stream_closes_both_sessions(fresh: Cluster) -> None:
    """A cancelled stream stops its generation and closes its draft and target sessions (not left
    to the replicas' TTL)."""
    started = time.monotonic()
    call = fresh.client.stream(PROMPTS[0], max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT)
    next(call), next(call)
    assert sorted(fresh.live_sessions().values()) == [0, 0, 1, 1]  # one on a draft, one on a target
    expired_before = expired_counts(fresh)
    call.cancel()
    freed_s = wait_sessions_closed(fresh, expired_before, "sessions freed after cancel")
    wait_until(lambda: fresh.client.status().active_generations == 0, FREED_DEADLINE_S,
               what="the cancelled generation ended")
    status = fresh.client.status()
    assert all(r.active_sessions == 0 and r.healthy for r in status.replicas)
    # The generation stopped at the cancel instead of running on: a full one needs at least
    # MAX_TOKENS / (k + 1) target passes, and no session was opened again after it.
    verifies = fresh.pacer.since(started, "Verify")
    assert len(verifies) < MAX_TOKENS // (NUM_DRAFT + 1), f"{len(verifies)} target passes after a cancel"
    assert len(fresh.pacer.since(started, "OpenSession")) == 2
    print(f"cancel: sessions freed in {freed_s * 1e3:.0f} ms")


def test_deadline_frees_sessions_and_is_passed_downstream(fresh: Cluster) -> None:
    timeout = 0.8  # the paced generation needs ~1.5 s (at least 2 * 22 paced calls of 0.03 s)
    expired_before = expired_counts(fresh)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(fresh.client.stream(PROMPTS[1], max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT, timeout=timeout))
    assert info.value.code() == CODE.DEADLINE_EXCEEDED
    freed_s = wait_sessions_closed(fresh, expired_before, "sessions freed after the deadline")
    wait_until(lambda: fresh.client.status().active_generations == 0, FREED_DEADLINE_S,
               what="the generation ended")
    # Every Propose/Verify carried the time the client had left, no more. The server's deadline
    # is at most ``timeout`` after the request arrived, which is before the first call was sent.
    # Draft and target calls overlap (pipelining), but a session's calls do not: each later call
    # to a replica was prepared after its previous one was answered and paced. An OpenSession
    # carries the per-call limit instead: the request's deadline bounds only the wait for it, so
    # a session made as the deadline passes still reaches the loop, which closes it.
    calls = fresh.pacer.since(started)
    assert {c.method for c in calls} == {"OpenSession", "Propose", "Verify"}
    opens = [c for c in calls if c.method == "OpenSession"]
    assert all(c.timeout == pytest.approx(DEFAULT_CALL_TIMEOUT_S) for c in opens), opens
    steps = [c for c in calls if c.method != "OpenSession"]
    wire_rounding = 0.001  # gRPC sends the remaining time rounded up to its unit
    deadline_at_most = calls[0].time + timeout + wire_rounding
    for call in steps:
        assert call.timeout is not None and 0 < call.timeout <= timeout + wire_rounding, call
    for address in {c.address for c in steps}:
        mine = [c for c in steps if c.address == address]
        for previous, call in zip(mine, mine[1:], strict=False):
            prepared_after = previous.time + fresh.pacer.delay_s
            assert call.timeout <= deadline_at_most - prepared_after, call
    assert all(a.timeout > b.timeout for a, b in zip(steps, steps[1:], strict=False)), "the time left must shrink"
    print(f"deadline: sessions freed {freed_s * 1e3:.0f} ms after the client gave up")


def test_unary_deadline_frees_sessions(fresh: Cluster) -> None:
    expired_before = expired_counts(fresh)
    with pytest.raises(grpc.RpcError) as info:
        fresh.client.generate(PROMPTS[2], max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT, timeout=0.5)
    assert info.value.code() == CODE.DEADLINE_EXCEEDED
    wait_sessions_closed(fresh, expired_before, "sessions freed after the deadline")


def test_sampled_failover_keeps_a_seeded_requests_tokens(fresh: Cluster) -> None:
    """T=1 with a seed: kill -9 the serving draft, then the serving target, mid-stream; every
    replica draws the same numbers at the same positions, so the tokens are those of the same
    request without failures."""
    options = dict(max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT, temperature=1.0)
    # A seed whose generation runs long enough to act twice mid-stream.
    seed, calm = next((s, list(r.token_ids)) for s in range(50)
                      if len((r := fresh.client.generate(PROMPTS[5], seed=s, **options)).token_ids) >= 40)
    acts = {3: "draft", 7: "target"}
    killed: dict[str, str] = {}
    chunks: list[pb.GenerateStreamResponse] = []
    for chunk in fresh.client.stream(PROMPTS[5], seed=seed, **options):
        chunks.append(chunk)
        if len(chunks) in acts:
            assert not chunk.finish_reason, "the generation ended before the test could act"
            victim = fresh.serving(acts[len(chunks)])
            killed[victim.role] = victim.address
            victim.kill()
    assert len(chunks) > max(acts)
    assert [t for c in chunks for t in c.token_ids] == calm
    stats = chunks[-1].stats
    assert stats.seed == seed and stats.proposed > 0
    assert stats.draft_replica not in ("", killed["draft"]) and stats.target_replica != killed["target"]


def test_killed_ngram_draft_fails_over_like_a_model_draft(fresh: Cluster, reference) -> None:
    """kill -9 of the serving n-gram draft (``--method ngram``) mid-stream: the request fails
    over to the other n-gram draft and the greedy output stays the target's."""
    drafts = [start_worker("draft", fresh.models["draft"], fresh.log_dir, extra=["--method", "ngram"], wait=False)
              for _ in range(2)]
    start_all(drafts)
    orch = start_orchestrator_in(fresh.loop, [d.address for d in drafts], fresh.addresses("target"),
                                 health_interval_s=HEALTH_INTERVAL_S, connect_timeout_s=30)
    try:
        pacer = Pacer(orch.pool, PACE_S)
        with SpecdecClient(orch.address, timeout=60) as client:
            prompt = PROMPTS[6]
            chunks: list[pb.GenerateStreamResponse] = []
            killed = ""
            for chunk in client.stream(prompt, max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT):
                chunks.append(chunk)
                if len(chunks) == 3:
                    assert not chunk.finish_reason, "the generation ended before the test could act"
                    busy = {r.address for r in client.status().replicas if r.role == "draft" and r.active_sessions}
                    victim = next(d for d in drafts if d.address in busy)
                    killed = victim.address
                    victim.kill()
            assert tokens_of(chunks) == reference(prompt, MAX_TOKENS)
            survivor = next(d.address for d in drafts if d.address != killed)
            assert chunks[-1].stats.draft_replica == survivor
            assert pacer.since(0, "Propose") and {c.address for c in pacer.calls if c.method == "Propose"} == {
                killed, survivor}
    finally:
        orch.stop()
        for d in drafts:
            d.kill()


# -- replica failure ----------------------------------------------------------------------------------


def test_killed_draft_fails_over_then_comes_back_after_restart(fresh: Cluster, reference) -> None:
    prompt = PROMPTS[3]
    victims: list[ServiceProcess] = []

    def kill_serving_draft() -> None:
        victims.append(fresh.serving("draft"))
        victims[0].kill()

    chunks, killed_at = stream_and_act(fresh, prompt, kill_serving_draft)
    victim = victims[0]
    survivor = next(a for a in fresh.addresses("draft") if a != victim.address)
    assert tokens_of(chunks) == reference(prompt, MAX_TOKENS)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].stats.draft_replica == survivor
    # From the first Propose on the survivor on, every Propose went there.
    failed_over = [c for c in fresh.pacer.since(killed_at, "Propose") if c.address == survivor]
    assert failed_over, "drafting stopped after the failover"
    assert {c.address for c in fresh.pacer.since(failed_over[0].time, "Propose")} == {survivor}
    assert not fresh.replica_status(victim.address).healthy

    # A new process on the same port: the health watch brings it back and it gets sessions again.
    fresh.revive()
    used = {r.stats.draft_replica for r in concurrent_generations(fresh, 2)}
    assert used == set(fresh.addresses("draft"))


def test_killed_target_fails_over_then_comes_back_after_restart(fresh: Cluster, reference) -> None:
    prompt = PROMPTS[4]
    victims: list[ServiceProcess] = []

    def kill_serving_target() -> None:
        victims.append(fresh.serving("target"))
        victims[0].kill()

    chunks, killed_at = stream_and_act(fresh, prompt, kill_serving_target)
    victim = victims[0]
    survivor = next(a for a in fresh.addresses("target") if a != victim.address)
    assert tokens_of(chunks) == reference(prompt, MAX_TOKENS)
    assert chunks[-1].stats.target_replica == survivor
    assert chunks[-1].stats.proposed > 0
    failed_over = [c for c in fresh.pacer.since(killed_at, "Verify") if c.address == survivor]
    assert failed_over, "verification stopped after the failover"
    assert {c.address for c in fresh.pacer.since(failed_over[0].time, "Verify")} == {survivor}
    assert not fresh.replica_status(victim.address).healthy

    fresh.revive()
    used = {r.stats.target_replica for r in concurrent_generations(fresh, 2)}
    assert used == set(fresh.addresses("target"))


def test_hung_draft_is_failed_over_after_the_call_timeout(fresh: Cluster, reference, monkeypatch) -> None:
    """SIGSTOP, not SIGKILL: the call hangs instead of failing. With no client deadline each call
    has the orchestrator's per-call timeout; past it the loop fails over, the health watch takes
    the replica out, and once it runs again its abandoned session is closed and it comes back."""
    call_timeout_s = 1.0
    monkeypatch.setattr(fresh.orch.orchestrator.limits, "call_timeout_s", call_timeout_s)  # --call-timeout
    prompt = PROMPTS[6]
    victims: list[ServiceProcess] = []
    chunks: list[pb.GenerateStreamResponse] = []

    def survivor_proposals() -> list:  # type: ignore[type-arg]
        return [c for c in fresh.pacer.since(stopped_at, "Propose") if c.address != victims[0].address]

    try:
        for chunk in fresh.client.stream(prompt, max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT):
            chunks.append(chunk)
            if len(chunks) == 3:
                victims.append(fresh.serving("draft"))
                os.kill(victims[0].pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
            elif len(victims) == 1 and survivor_proposals():  # the loop failed over
                assert not fresh.replica_status(victims[0].address).healthy  # taken out of rotation
                os.kill(victims[0].pid, signal.SIGCONT)
                victims.append(victims[0])
    finally:
        for victim in victims[:1]:
            os.kill(victim.pid, signal.SIGCONT)
    assert len(victims) == 2, "no failover seen"
    survivor = next(a for a in fresh.addresses("draft") if a != victims[0].address)
    assert tokens_of(chunks) == reference(prompt, MAX_TOKENS)
    assert chunks[-1].stats.draft_replica == survivor
    # The call that hung had the per-call limit (the client set no deadline), and the loop moved
    # to the survivor only once that limit had run out: the call timeout is what failed it over.
    hung = [c for c in fresh.pacer.calls if c.method == "Propose" and c.address == victims[0].address][-1]
    assert hung.timeout is not None and hung.timeout <= call_timeout_s
    failed_over = survivor_proposals()[0]
    clock_slack = 0.01  # gRPC turns the timeout into a wall-clock deadline; this file uses the monotonic clock
    assert failed_over.time >= hung.time + hung.timeout - clock_slack
    wait_until(lambda: fresh.replica_status(victims[0].address).healthy, FREED_DEADLINE_S,
               what="the resumed draft back")
    wait_until(lambda: not any(fresh.live_sessions().values()), FREED_DEADLINE_S,
               what="the abandoned session closed")
    print(f"hung draft: failed over {(failed_over.time - hung.time) * 1e3:.0f} ms after the hung call was sent")


def test_no_draft_left_finishes_with_the_target_alone(fresh: Cluster, reference) -> None:
    prompt = PROMPTS[5]

    def kill_both_drafts() -> None:
        first = fresh.serving("draft")
        first.kill()
        for worker in fresh.workers["draft"]:
            worker.kill()

    chunks, killed_at = stream_and_act(fresh, prompt, kill_both_drafts)
    assert tokens_of(chunks) == reference(prompt, MAX_TOKENS)
    assert chunks[-1].finish_reason == "length"
    # After the kill each draft was tried at most once (the call in flight, a failover open),
    # then the target went on alone.
    tried = [c.address for c in fresh.pacer.since(killed_at) if c.method in ("OpenSession", "Propose")]
    assert len(tried) == len(set(tried)) and set(tried) <= set(fresh.addresses("draft")), tried
    assert fresh.pacer.since(killed_at, "Verify")
    # New requests while no draft is up decode with the target alone, still the same output.
    response = fresh.client.generate(PROMPTS[6], max_tokens=24, num_draft=NUM_DRAFT)
    assert list(response.token_ids) == reference(PROMPTS[6], 24)
    assert response.stats.proposed == 0 and response.stats.target_passes == 24
    assert not any(fresh.live_sessions().values())


def test_no_target_left_is_unavailable_at_once(fresh: Cluster) -> None:
    """With every target dead the request fails with UNAVAILABLE as soon as the calls are refused,
    not after a call timeout; a new request is refused without calling any replica."""
    import orchestrator.speculative as speculative

    killed: list[float] = []

    def kill_both_targets() -> None:
        for worker in [fresh.serving("target"), *fresh.workers["target"]]:
            worker.kill()
        killed.append(time.monotonic())

    expired_before = expired_counts(fresh)
    with pytest.raises(grpc.RpcError) as info:
        stream_and_act(fresh, PROMPTS[7], kill_both_targets)
    mid_stream_s = time.monotonic() - killed[0]
    assert info.value.code() == CODE.UNAVAILABLE
    assert "no target replica is available" in info.value.details()
    # A refused connection fails a call at once; a hang would last the per-call limit (60 s).
    assert mid_stream_s < speculative.DEFAULT_CALL_TIMEOUT_S / 4, f"UNAVAILABLE only after {mid_stream_s:.1f} s"
    # Each target was tried at most once after the kill (the call in flight, a failover open).
    tried = [c.address for c in fresh.pacer.since(killed[0]) if c.method in ("OpenSession", "Verify")]
    assert len(tried) == len(set(tried)) and set(tried) <= set(fresh.addresses("target")), tried

    calls_before = len(fresh.pacer.calls)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        fresh.client.generate(PROMPTS[0], max_tokens=8)
    new_request_s = time.monotonic() - started
    assert info.value.code() == CODE.UNAVAILABLE and "no target replica" in info.value.details()
    assert len(fresh.pacer.calls) == calls_before, "a new request called a replica known to be down"
    # The draft session of the failed generation was closed, not left to the TTL.
    wait_sessions_closed(fresh, expired_before, "draft sessions freed")
    print(f"no target: UNAVAILABLE {mid_stream_s * 1e3:.0f} ms after the kill mid-stream, "
          f"{new_request_s * 1e3:.0f} ms for a new request")
