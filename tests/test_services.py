"""Draft and target services over real gRPC: tiny checkpoints, servers on port 0.

Every answer is compared with direct ``ModelEngine`` calls on a locally loaded copy of the
same checkpoint; every row of the error table in docs/architecture.md is produced, and after each error
the session and the service are shown to still work.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from harness import LoopThread, Worker, start_worker_in

from specdec_core.checkpoint import load_model
from specdec_core.engine import ModelEngine
from specdec_core.session_host import HostLimits
from specdec_core.sizes import GIB, format_bytes
from specdec_core.steps import Distribution, SamplingParams
from specdec_grpc.server import shutdown
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc
from specdec_tools.service_process import ServiceProcess

PROMPT = [37, 12, 99, 250, 8, 41, 1]
OTHER_PROMPTS = [[(7 * i + j * 13) % 500 + 3 for j in range(3 + i % 5)] + [1] for i in range(16)]
# The shared servers must outlast every test of this module without hitting a limit.
ROOMY = HostLimits(max_sessions=1024, cache_memory_bytes=GIB)
GREEDY = pb.SamplingParams()
SAMPLED = pb.SamplingParams(temperature=1.0)
SAMPLED_SPARSE = pb.SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
CODE = grpc.StatusCode

pytestmark = pytest.mark.timeout(120)


# -- servers, stubs and local engines ----------------------------------------------------------



@pytest.fixture(scope="module")
def draft(loop: LoopThread, draft_dir: Path) -> Iterator[Worker]:
    worker = start_worker_in(loop, "draft", draft_dir, limits=ROOMY)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def target(loop: LoopThread, target_dir: Path) -> Iterator[Worker]:
    worker = start_worker_in(loop, "target", target_dir, limits=ROOMY)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def draft_stub(draft: Worker) -> Iterator[pb_grpc.DraftStub]:
    with grpc.insecure_channel(draft.address) as channel:
        yield pb_grpc.DraftStub(channel)


@pytest.fixture(scope="module")
def target_stub(target: Worker) -> Iterator[pb_grpc.TargetStub]:
    with grpc.insecure_channel(target.address) as channel:
        yield pb_grpc.TargetStub(channel)


@pytest.fixture(scope="module")
def local_draft(draft_dir: Path) -> ModelEngine:
    return ModelEngine(load_model(str(draft_dir)), max_draft=ROOMY.max_draft)


@pytest.fixture(scope="module")
def local_target(target_dir: Path) -> ModelEngine:
    return ModelEngine(load_model(str(target_dir)), max_draft=ROOMY.max_draft)


@pytest.fixture(scope="module")
def greedy_proposal(local_draft: ModelEngine) -> list[int]:
    """The draft's greedy k=3 proposal for PROMPT: what a healthy fresh session answers."""
    return local_draft.propose(local_draft.start(PROMPT), 3, SamplingParams(), 0).tokens


@pytest.fixture(scope="module")
def greedy_argmax(local_target: ModelEngine, greedy_proposal: list[int]) -> list[int]:
    """The target's argmax after PROMPT + greedy_proposal: what a healthy fresh session answers."""
    state = local_target.start(PROMPT)
    state.tokens.extend(greedy_proposal)
    return local_target.verify(state, 3, SamplingParams(), 0, []).argmax


@pytest.fixture
def spare_worker(loop: LoopThread, draft_dir: Path, target_dir: Path) -> Iterator[Callable[..., Worker]]:
    """Start extra servers with their own limits (a bad state there cannot leak into others)."""
    started: list[Worker] = []

    def start(role: str, limits: HostLimits | None = None) -> Worker:
        worker = start_worker_in(loop, role, draft_dir if role == "draft" else target_dir, limits=limits)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


# -- helpers ------------------------------------------------------------------------------------


def open_session(stub: Any, prompt: list[int] = PROMPT) -> str:
    response = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=prompt, client_tag="test"))
    assert response.length == 1
    return response.session_id


def expect_error(code: grpc.StatusCode, call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Run a call that must fail with ``code``; return the status message."""
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    assert raised.value.code() == code, raised.value.details()
    details = raised.value.details()
    assert details, "a failure must carry a message a person can act on"
    return details


def params_of(message: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(message.temperature, message.top_k, message.top_p or 1.0)


def decode(message: pb.Distribution) -> Distribution:
    """Decode a wire distribution independently of specdec_grpc.wire."""
    probs = np.frombuffer(message.probs_f16, dtype="<f2").astype(np.float32)
    return Distribution(np.array(message.token_ids, dtype=np.int32), probs)


def assert_draft_works(stub: pb_grpc.DraftStub, session_id: str, expected_length: int,
                       reference: list[int], new_session: bool = True) -> None:
    """The session answers a greedy k=3 step from ``expected_length`` with ``reference``; the
    service opens and serves a new session as well."""
    response = stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=expected_length,
                                              rollback_to=1, num_draft=3))
    assert list(response.tokens) == reference
    assert response.length == 1 + len(reference)
    if not new_session:
        return
    fresh = open_session(stub)
    response = stub.Propose(pb.ProposeRequest(session_id=fresh, expected_length=1, num_draft=3))
    assert list(response.tokens) == reference
    stub.CloseSession(pb.CloseSessionRequest(session_id=fresh))


def assert_target_works(stub: pb_grpc.TargetStub, session_id: str, expected_length: int,
                        drafts: list[int], reference: list[int]) -> None:
    response = stub.Verify(pb.VerifyRequest(session_id=session_id, expected_length=expected_length,
                                            rollback_to=1, append_tokens=drafts, num_draft=len(drafts)))
    assert list(response.argmax) == reference
    fresh = open_session(stub)
    response = stub.Verify(pb.VerifyRequest(session_id=fresh, expected_length=1, append_tokens=drafts,
                                            num_draft=len(drafts)))
    assert list(response.argmax) == reference
    stub.CloseSession(pb.CloseSessionRequest(session_id=fresh))


def block_model_thread(worker: Worker) -> threading.Event:
    """Occupy the worker's one MLX thread until the returned event is set."""
    release = threading.Event()
    worker.host._executor.submit(release.wait, 30)
    return release


def wait_until_idle(worker: Worker, session_id: str) -> None:
    """Wait for the MLX thread to drain and the session's lock to be free."""
    worker.host._executor.submit(lambda: None).result(10)
    deadline = time.monotonic() + 10
    while worker.host.store.get(session_id).lock.locked():
        assert time.monotonic() < deadline, "the session stayed locked"
        time.sleep(0.01)


# -- Propose and Verify equal direct engine calls -----------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, SAMPLED_SPARSE], ids=["greedy", "sampled", "top-k-p"])
def test_propose_matches_engine(draft_stub: pb_grpc.DraftStub, local_draft: ModelEngine,
                                sampling: pb.SamplingParams) -> None:
    session_id = open_session(draft_stub)
    state = local_draft.start(PROMPT)
    params = params_of(sampling)
    # Two steps: the second rolls back and appends (the orchestrator's hot path).
    steps = [dict(rollback_to=0, append=[], k=5, seed=11), dict(rollback_to=3, append=[17, 42], k=4, seed=12)]
    for step in steps:
        response = draft_stub.Propose(pb.ProposeRequest(
            session_id=session_id, expected_length=state.length, rollback_to=step["rollback_to"],
            append_tokens=step["append"], num_draft=step["k"], sampling=sampling, seed=step["seed"]))
        if step["rollback_to"]:
            state.rollback_to(step["rollback_to"])
        state.tokens.extend(step["append"])
        proposal = local_draft.propose(state, step["k"], params, step["seed"])

        assert list(response.tokens) == proposal.tokens
        assert np.array_equal(np.array(response.token_probs, np.float32),
                              np.array(proposal.token_probs, np.float32))
        assert response.length == state.length
        if params.greedy:
            assert list(response.token_probs) == [1.0] * len(proposal.tokens)
            assert not response.distributions
            continue
        assert len(response.distributions) == len(proposal.tokens)
        for wire, local, token, prob in zip(response.distributions, proposal.distributions,
                                            response.tokens, response.token_probs, strict=True):
            assert list(wire.token_ids) == local.token_ids.tolist()
            assert wire.probs_f16 == local.probs.astype("<f2").tobytes()
            dense = decode(wire).to_dense(local_draft.vocab_size)
            assert dense.sum() == pytest.approx(1.0, abs=5e-3)
            assert dense[token] == pytest.approx(prob, rel=2e-3, abs=1e-4)  # float16 precision
        if sampling.top_k:
            assert all(0 < len(d.token_ids) <= sampling.top_k for d in response.distributions)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, SAMPLED_SPARSE], ids=["greedy", "sampled", "top-k-p"])
def test_verify_matches_engine(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub,
                               local_target: ModelEngine, sampling: pb.SamplingParams) -> None:
    draft_id, target_id = open_session(draft_stub), open_session(target_stub)
    state = local_target.start(PROMPT)
    params = params_of(sampling)

    def verify(proposal: pb.ProposeResponse, rollback_to: int, accepted: list[int], seed: int) -> pb.VerifyResponse:
        """Verify over the wire and on the local engine; the answers must be identical."""
        drafts = list(proposal.tokens)
        response = target_stub.Verify(pb.VerifyRequest(
            session_id=target_id, expected_length=state.length, rollback_to=rollback_to,
            append_tokens=accepted + drafts, num_draft=len(drafts), sampling=sampling, seed=seed,
            draft_distributions=proposal.distributions))
        if rollback_to:
            state.rollback_to(rollback_to)
        state.tokens.extend(accepted + drafts)
        # q as the target sees it: decoded from the float16 bytes on the wire.
        verdict = local_target.verify(state, len(drafts), params, seed, [decode(d) for d in proposal.distributions])
        assert list(response.argmax) == verdict.argmax
        assert len(response.argmax) == len(drafts) + 1
        assert np.array_equal(np.array(response.draft_probs, np.float32), np.array(verdict.draft_probs, np.float32))
        assert list(response.resampled) == verdict.resampled
        assert response.length == state.length
        if params.greedy:
            assert not response.draft_probs and not response.resampled
        else:
            assert len(response.draft_probs) == len(drafts) and len(response.resampled) == len(drafts) + 1
        return response

    first = draft_stub.Propose(pb.ProposeRequest(session_id=draft_id, expected_length=1, num_draft=5,
                                                 sampling=sampling, seed=5))
    assert len(first.tokens) == 5
    verdict = verify(first, 0, [], seed=21)
    # Keep two drafts and the target's token after them, then score three new drafts.
    correction = [verdict.resampled[2] if params.temperature else verdict.argmax[2]]
    second = draft_stub.Propose(pb.ProposeRequest(session_id=draft_id, expected_length=6, rollback_to=3,
                                                  append_tokens=correction, num_draft=3, sampling=sampling, seed=6))
    verify(second, 3, correction, seed=22)


# -- rollback gives what a fresh session with the same prefix gives -----------------------------


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("how", ["rollback_to", "Rollback"])
def test_rollback_equals_fresh_session(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub,
                                       sampling: pb.SamplingParams, how: str) -> None:
    session_id = open_session(draft_stub)
    first = draft_stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=6,
                                                 sampling=sampling, seed=1))
    assert first.length == 7
    kept, appended = list(first.tokens[:2]), [77]
    if how == "Rollback":
        rolled = draft_stub.Rollback(pb.RollbackRequest(session_id=session_id, expected_length=7, length=3))
        assert rolled.length == 3
        again = draft_stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=3,
                                                     append_tokens=appended, num_draft=4,
                                                     sampling=sampling, seed=2))
    else:
        again = draft_stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=7, rollback_to=3,
                                                     append_tokens=appended, num_draft=4,
                                                     sampling=sampling, seed=2))
    fresh_id = open_session(draft_stub)
    fresh = draft_stub.Propose(pb.ProposeRequest(session_id=fresh_id, expected_length=1,
                                                 append_tokens=kept + appended, num_draft=4,
                                                 sampling=sampling, seed=2))
    assert list(again.tokens) == list(fresh.tokens)
    assert np.allclose(again.token_probs, fresh.token_probs, rtol=1e-4, atol=1e-6)
    assert again.length == fresh.length == 4 + len(fresh.tokens)

    # The target the same way: score, roll back into the block, score again.
    block = [*kept, *appended, *fresh.tokens]
    target_id, fresh_target = open_session(target_stub), open_session(target_stub)
    target_stub.Verify(pb.VerifyRequest(session_id=target_id, expected_length=1, append_tokens=list(first.tokens),
                                        num_draft=6))
    if how == "Rollback":
        target_stub.Rollback(pb.RollbackRequest(session_id=target_id, expected_length=7, length=3))
        request = pb.VerifyRequest(session_id=target_id, expected_length=3, append_tokens=block[2:],
                                   num_draft=len(fresh.tokens))
    else:
        request = pb.VerifyRequest(session_id=target_id, expected_length=7, rollback_to=3,
                                   append_tokens=block[2:], num_draft=len(fresh.tokens))
    rolled_verdict = target_stub.Verify(request)
    fresh_verdict = target_stub.Verify(pb.VerifyRequest(session_id=fresh_target, expected_length=1,
                                                        append_tokens=block, num_draft=len(fresh.tokens)))
    assert list(rolled_verdict.argmax) == list(fresh_verdict.argmax)
    for stub, ids in ((draft_stub, (session_id, fresh_id)), (target_stub, (target_id, fresh_target))):
        for closing in ids:
            assert stub.CloseSession(pb.CloseSessionRequest(session_id=closing)).closed


# -- concurrency -----------------------------------------------------------------------------------


def speculate(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub, prompt: list[int],
              sampling: pb.SamplingParams, seed: int, steps: int = 4, k: int = 4) -> list[Any]:
    """A small propose -> verify -> accept -> roll back loop; returns every answer it got.

    Acceptance is a fixed deterministic rule (the orchestrator owns the real one): keep
    drafts while the target agrees (greedy) or while p >= q / 2 (sampled), then add the
    target's correction.
    """
    draft_id, target_id = open_session(draft_stub, prompt), open_session(target_stub, prompt)
    transcript: list[Any] = []
    draft_length = target_length = 1
    rollback_to, correction = 0, []
    for step in range(steps):
        proposal = draft_stub.Propose(pb.ProposeRequest(
            session_id=draft_id, expected_length=draft_length, rollback_to=rollback_to,
            append_tokens=correction, num_draft=k, sampling=sampling, seed=seed + step))
        verdict = target_stub.Verify(pb.VerifyRequest(
            session_id=target_id, expected_length=target_length, rollback_to=rollback_to,
            append_tokens=correction + list(proposal.tokens), num_draft=len(proposal.tokens),
            sampling=sampling, seed=seed + 100 + step, draft_distributions=proposal.distributions))
        transcript.append((list(proposal.tokens), list(proposal.token_probs),
                           [np.frombuffer(d.probs_f16, "<f2").astype(np.float32) for d in proposal.distributions],
                           list(verdict.argmax), list(verdict.draft_probs), list(verdict.resampled)))
        accepted = 0
        for j, token in enumerate(proposal.tokens):
            keep = (verdict.argmax[j] == token if not sampling.temperature
                    else verdict.draft_probs[j] >= proposal.token_probs[j] / 2)
            if not keep:
                break
            accepted += 1
        rollback_to = verdict.length - len(proposal.tokens) + accepted
        correction = [verdict.resampled[accepted] if sampling.temperature else verdict.argmax[accepted]]
        draft_length, target_length = proposal.length, verdict.length
    for stub, session_id in ((draft_stub, draft_id), (target_stub, target_id)):
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    return transcript


def test_sixteen_interleaved_sessions_match_solo_runs(draft_stub: pb_grpc.DraftStub,
                                                      target_stub: pb_grpc.TargetStub) -> None:
    jobs = [(prompt, SAMPLED if i % 2 else GREEDY, 1000 + i) for i, prompt in enumerate(OTHER_PROMPTS)]
    alone = [speculate(draft_stub, target_stub, *job) for job in jobs]
    start = threading.Barrier(len(jobs))

    def run(job: tuple[list[int], pb.SamplingParams, int]) -> list[Any]:
        start.wait(30)
        return speculate(draft_stub, target_stub, *job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    for batched, solo in zip(together, alone, strict=True):
        assert_same_transcript(batched, solo)
    assert len({str([step[0] for step in t]) for t in alone}) == len(jobs)  # sessions really differ


def assert_same_transcript(batched: list[Any], solo: list[Any]) -> None:
    """Tokens (drafts, argmax, draws) identical; probabilities equal up to float32 rounding: a
    batched matmul sums in another order, so q and p may move by an ulp, never a token."""
    assert len(batched) == len(solo)
    for (tokens, probs, qs, argmax, p, drawn), (tokens1, probs1, qs1, argmax1, p1, drawn1) in zip(
            batched, solo, strict=True):
        assert (tokens, argmax, drawn) == (tokens1, argmax1, drawn1)
        np.testing.assert_allclose(probs, probs1, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p, p1, rtol=1e-4, atol=1e-6)
        assert len(qs) == len(qs1)
        for q, q1 in zip(qs, qs1, strict=True):
            np.testing.assert_allclose(q, q1, rtol=2e-3, atol=1e-6)  # float16 on the wire: an ulp is 2^-11


# -- the error table: INVALID_ARGUMENT ------------------------------------------------------------


@pytest.mark.parametrize("prompt", [[], [512], [-1], [5] * 2049], ids=["empty", "too-big-id", "negative-id", "too-long"])
def test_open_session_rejects_bad_prompts(draft_stub: pb_grpc.DraftStub, greedy_proposal: list[int],
                                          prompt: list[int]) -> None:
    before = draft_stub.Info(pb.InfoRequest()).live_sessions
    message = expect_error(CODE.INVALID_ARGUMENT, draft_stub.OpenSession, pb.OpenSessionRequest(prompt_ids=prompt))
    assert "prompt" in message
    assert draft_stub.Info(pb.InfoRequest()).live_sessions == before
    session_id = open_session(draft_stub)
    assert_draft_works(draft_stub, session_id, 1, greedy_proposal)


BAD_PROPOSALS = {
    "k=0": dict(num_draft=0),
    "k>max_draft": dict(num_draft=ROOMY.max_draft + 1),
    "temperature<0": dict(sampling=pb.SamplingParams(temperature=-0.5)),
    "temperature=nan": dict(sampling=pb.SamplingParams(temperature=float("nan"))),
    "top_p>1": dict(sampling=pb.SamplingParams(temperature=1.0, top_p=1.5)),
    "top_p<0": dict(sampling=pb.SamplingParams(temperature=1.0, top_p=-0.5)),
    "top_k<0": dict(sampling=pb.SamplingParams(temperature=1.0, top_k=-3)),
    "append-id-too-big": dict(append_tokens=[3, 512]),
    "append-id-negative": dict(append_tokens=[-2]),
    "rollback_to>length": dict(rollback_to=2),
    "rollback_to<0": dict(rollback_to=-1),
}


@pytest.mark.parametrize("bad", list(BAD_PROPOSALS.values()), ids=list(BAD_PROPOSALS))
def test_propose_rejects_malformed_requests(draft_stub: pb_grpc.DraftStub, greedy_proposal: list[int],
                                            bad: dict[str, Any]) -> None:
    session_id = open_session(draft_stub)
    request = pb.ProposeRequest(**{"session_id": session_id, "expected_length": 1, "num_draft": 3, **bad})
    expect_error(CODE.INVALID_ARGUMENT, draft_stub.Propose, request)
    assert_draft_works(draft_stub, session_id, 1, greedy_proposal)  # the session was not touched


BAD_VERIFIES = {
    "k>max_draft": dict(append_tokens=[5] * (ROOMY.max_draft + 1), num_draft=ROOMY.max_draft + 1),
    "k>session": dict(append_tokens=[5, 6], num_draft=3),
    "k<0": dict(append_tokens=[5], num_draft=-1),
    "append-id-too-big": dict(append_tokens=[5, 99999], num_draft=2),
    "temperature<0": dict(append_tokens=[5], num_draft=1, sampling=pb.SamplingParams(temperature=-1)),
    "top_p>1": dict(append_tokens=[5], num_draft=1, sampling=pb.SamplingParams(temperature=1, top_p=2)),
    "missing-q": dict(append_tokens=[5], num_draft=1, sampling=pb.SamplingParams(temperature=1)),
    "bad-q-bytes": dict(append_tokens=[5], num_draft=1, sampling=pb.SamplingParams(temperature=1),
                        draft_distributions=[pb.Distribution(probs_f16=b"\x00")]),
    "q-id-too-big": dict(append_tokens=[5], num_draft=1, sampling=pb.SamplingParams(temperature=1),
                         draft_distributions=[pb.Distribution(token_ids=[600],
                                                              probs_f16=np.ones(1, "<f2").tobytes())]),
    "rollback_to>length": dict(rollback_to=3, append_tokens=[5], num_draft=1),
}


@pytest.mark.parametrize("bad", list(BAD_VERIFIES.values()), ids=list(BAD_VERIFIES))
def test_verify_rejects_malformed_requests(target_stub: pb_grpc.TargetStub, greedy_proposal: list[int],
                                           greedy_argmax: list[int], bad: dict[str, Any]) -> None:
    session_id = open_session(target_stub)
    expect_error(CODE.INVALID_ARGUMENT, target_stub.Verify,
                 pb.VerifyRequest(session_id=session_id, expected_length=1, **bad))
    assert_target_works(target_stub, session_id, 1, greedy_proposal, greedy_argmax)


def test_rollback_rpc_rejects_bad_lengths(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub,
                                          greedy_proposal: list[int]) -> None:
    session_id = open_session(draft_stub)
    draft_stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3))
    for length in (5, 0, -1):  # beyond the length (4), and below the start token
        expect_error(CODE.INVALID_ARGUMENT, draft_stub.Rollback,
                     pb.RollbackRequest(session_id=session_id, expected_length=4, length=length))
    assert_draft_works(draft_stub, session_id, 4, greedy_proposal)
    target_id = open_session(target_stub)
    expect_error(CODE.INVALID_ARGUMENT, target_stub.Rollback,
                 pb.RollbackRequest(session_id=target_id, expected_length=1, length=2))
    assert target_stub.Rollback(pb.RollbackRequest(session_id=target_id, expected_length=1, length=1)).length == 1


# -- NOT_FOUND ------------------------------------------------------------------------------------


def test_unknown_and_closed_sessions_are_not_found(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub,
                                                   greedy_proposal: list[int], greedy_argmax: list[int]) -> None:
    for session_id in ("no-such-session", ""):
        expect_error(CODE.NOT_FOUND, draft_stub.Propose,
                     pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=2))
        expect_error(CODE.NOT_FOUND, target_stub.Verify,
                     pb.VerifyRequest(session_id=session_id, expected_length=1, append_tokens=[5], num_draft=1))
        expect_error(CODE.NOT_FOUND, draft_stub.Rollback,
                     pb.RollbackRequest(session_id=session_id, expected_length=1, length=1))
    session_id = open_session(draft_stub)
    assert draft_stub.CloseSession(pb.CloseSessionRequest(session_id=session_id)).closed
    message = expect_error(CODE.NOT_FOUND, draft_stub.Propose,
                           pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=2))
    assert "unknown, closed or expired" in message
    assert_draft_works(draft_stub, open_session(draft_stub), 1, greedy_proposal)
    assert_target_works(target_stub, open_session(target_stub), 1, greedy_proposal, greedy_argmax)


def test_close_session_is_idempotent(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub) -> None:
    for stub in (draft_stub, target_stub):
        session_id = open_session(stub)
        live = stub.Info(pb.InfoRequest()).live_sessions
        assert stub.CloseSession(pb.CloseSessionRequest(session_id=session_id)).closed is True
        assert stub.CloseSession(pb.CloseSessionRequest(session_id=session_id)).closed is False
        assert stub.CloseSession(pb.CloseSessionRequest(session_id="never-opened")).closed is False
        assert stub.Info(pb.InfoRequest()).live_sessions == live - 1


def test_expired_sessions_are_not_found(spare_worker: Callable[..., Worker], greedy_proposal: list[int]) -> None:
    """An idle session expires once the TTL passed since its last use (not before); an older
    session whose calls keep coming stays alive; an expired one is NOT_FOUND, naming the TTL.

    Event-driven in real time: the busy session is used until the service reports an expiry.
    What the busy session proves needs every gap between its uses to be shorter than the TTL;
    an attempt in which this process stalled longer than that (a loaded machine) proves nothing
    about it and is repeated with new sessions."""
    ttl_s = 1.0
    worker = spare_worker("draft", HostLimits(session_ttl_s=ttl_s))
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        for _attempt in range(3):
            expired_before = stub.Info(pb.InfoRequest()).metrics.sessions_expired
            # The busy session is opened first: were it not kept alive by its calls, it would
            # expire no later than the idle one.
            last_use = time.monotonic()  # the busy session's last use is after this
            busy = open_session(stub)
            idle_opened = time.monotonic()  # the idle session's last use is after this
            idle = open_session(stub)
            longest_gap = 0.0
            give_up = time.monotonic() + 60
            while True:
                sent = time.monotonic()
                stub.Rollback(pb.RollbackRequest(session_id=busy, expected_length=1, length=1))
                longest_gap = max(longest_gap, time.monotonic() - last_use)
                last_use = sent
                info = stub.Info(pb.InfoRequest())  # Info uses no session
                answered = time.monotonic()
                longest_gap = max(longest_gap, answered - last_use)
                if info.metrics.sessions_expired > expired_before:
                    break
                assert answered < give_up, f"no session expired within 60 s (TTL {ttl_s} s)"
                time.sleep(0.02)
            assert answered >= idle_opened + ttl_s, "a session expired before its TTL passed"
            if longest_gap < ttl_s:
                break
            stub.CloseSession(pb.CloseSessionRequest(session_id=busy))  # stalled: inconclusive, again
        else:
            pytest.fail(f"this process stalled longer than the {ttl_s} s TTL in every attempt")
        assert info.metrics.sessions_expired == expired_before + 1 and info.live_sessions == 1
        message = expect_error(CODE.NOT_FOUND, stub.Propose,
                               pb.ProposeRequest(session_id=idle, expected_length=1, num_draft=2))
        assert "TTL" in message
        assert_draft_works(stub, busy, 1, greedy_proposal)


# -- ABORTED ----------------------------------------------------------------------------------------


def test_wrong_expected_length_is_aborted(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub,
                                          greedy_proposal: list[int], greedy_argmax: list[int]) -> None:
    session_id = open_session(draft_stub)
    for expected in (0, 2, 7):
        message = expect_error(CODE.ABORTED, draft_stub.Propose,
                               pb.ProposeRequest(session_id=session_id, expected_length=expected, num_draft=2))
        assert "has length 1" in message
    expect_error(CODE.ABORTED, draft_stub.Rollback,
                 pb.RollbackRequest(session_id=session_id, expected_length=3, length=1))
    assert_draft_works(draft_stub, session_id, 1, greedy_proposal)
    target_id = open_session(target_stub)
    expect_error(CODE.ABORTED, target_stub.Verify,
                 pb.VerifyRequest(session_id=target_id, expected_length=4, append_tokens=[5], num_draft=1))
    assert_target_works(target_stub, target_id, 1, greedy_proposal, greedy_argmax)


def test_duplicated_step_is_aborted(draft_stub: pb_grpc.DraftStub, target_stub: pb_grpc.TargetStub,
                                    greedy_proposal: list[int], greedy_argmax: list[int]) -> None:
    session_id = open_session(draft_stub)
    request = pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3)
    assert list(draft_stub.Propose(request).tokens) == greedy_proposal
    expect_error(CODE.ABORTED, draft_stub.Propose, request)  # the same message again
    assert_draft_works(draft_stub, session_id, 4, greedy_proposal)

    # Two copies in flight at once: exactly one runs.
    session_id = open_session(draft_stub)
    request = pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3)
    futures = [draft_stub.Propose.future(request) for _ in range(2)]
    codes = sorted(f.code().name for f in futures)
    assert codes == ["ABORTED", "OK"]
    assert_draft_works(draft_stub, session_id, 4, greedy_proposal)

    target_id = open_session(target_stub)
    verify = pb.VerifyRequest(session_id=target_id, expected_length=1, append_tokens=greedy_proposal, num_draft=3)
    assert list(target_stub.Verify(verify).argmax) == greedy_argmax
    expect_error(CODE.ABORTED, target_stub.Verify, verify)
    assert_target_works(target_stub, target_id, 4, greedy_proposal, greedy_argmax)


# -- RESOURCE_EXHAUSTED ----------------------------------------------------------------------------


def test_session_limit_is_resource_exhausted(spare_worker: Callable[..., Worker],
                                             greedy_proposal: list[int]) -> None:
    worker = spare_worker("draft", HostLimits(max_sessions=2))
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        first, second = open_session(stub), open_session(stub)
        message = expect_error(CODE.RESOURCE_EXHAUSTED, stub.OpenSession, pb.OpenSessionRequest(prompt_ids=PROMPT))
        assert "max_sessions=2" in message
        assert stub.Info(pb.InfoRequest()).live_sessions == 2
        for session_id in (first, second):
            response = stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3))
            assert list(response.tokens) == greedy_proposal
        stub.CloseSession(pb.CloseSessionRequest(session_id=second))
        assert_draft_works(stub, first, 4, greedy_proposal)


def test_cache_budget_is_resource_exhausted(spare_worker: Callable[..., Worker], local_draft: ModelEngine,
                                            greedy_proposal: list[int]) -> None:
    args = local_draft.args  # float32: per decoder layer and head, d_kv keys and d_kv values of 4 bytes
    position = 2 * args.num_decoder_layers * args.num_heads * args.d_kv * 4
    per_session = (len(PROMPT) + 256) * position  # the prompt plus one chunk of decoder positions
    budget = 2 * per_session + 8 * position
    worker = spare_worker("draft", HostLimits(cache_memory_bytes=budget))
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        first, second = open_session(stub), open_session(stub)
        for session_id in (first, second):
            stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3))
        info = stub.Info(pb.InfoRequest())
        assert (info.cache_bytes_used, info.limits.cache_memory_bytes) == (2 * per_session, budget)
        assert (info.cache_bytes_per_position, info.typical_sessions_free) == (position, 0)
        message = expect_error(CODE.RESOURCE_EXHAUSTED, stub.OpenSession, pb.OpenSessionRequest(prompt_ids=PROMPT))
        assert (f"needs {format_bytes(per_session)}, {format_bytes(8 * position)} free of {format_bytes(budget)} "
                "(--cache-memory)") in message
        # Growing a session past its first chunk needs another 256 positions: refused, untouched.
        message = expect_error(CODE.RESOURCE_EXHAUSTED, stub.Propose, pb.ProposeRequest(
            session_id=first, expected_length=4, append_tokens=[5] * 260, num_draft=1))
        assert f"needs {format_bytes(256 * position)}, {format_bytes(8 * position)} free" in message
        assert stub.Info(pb.InfoRequest()).cache_bytes_used == 2 * per_session
        assert_draft_works(stub, first, 4, greedy_proposal, new_session=False)
        stub.CloseSession(pb.CloseSessionRequest(session_id=second))
        assert_draft_works(stub, first, 4, greedy_proposal)


# -- UNAVAILABLE --------------------------------------------------------------------------------------


def test_draining_service_is_unavailable(spare_worker: Callable[..., Worker], greedy_proposal: list[int]) -> None:
    worker = spare_worker("draft")
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        session_id = open_session(stub)
        worker.host.draining = True
        message = expect_error(CODE.UNAVAILABLE, stub.OpenSession, pb.OpenSessionRequest(prompt_ids=PROMPT))
        assert "draining" in message
        expect_error(CODE.UNAVAILABLE, stub.Propose,
                     pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3))
        expect_error(CODE.UNAVAILABLE, stub.Rollback,
                     pb.RollbackRequest(session_id=session_id, expected_length=1, length=1))
        assert stub.Info(pb.InfoRequest()).live_sessions == 1  # Info still answers
        worker.host.draining = False
        assert_draft_works(stub, session_id, 1, greedy_proposal)


def test_shutdown_finishes_calls_in_flight_and_refuses_new_ones(spare_worker: Callable[..., Worker],
                                                                greedy_proposal: list[int]) -> None:
    """The SIGTERM path (``shutdown`` with the host's drain hook) on an in-process server."""
    worker = spare_worker("draft")
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        session_id = open_session(stub)
        release = block_model_thread(worker)
        in_flight = stub.Propose.future(pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3))
        time.sleep(0.2)  # the call is queued on the MLX thread
        stopping = asyncio.run_coroutine_threadsafe(shutdown(worker.running, 10.0, worker.host.drain),
                                                    worker.loop.loop)
        time.sleep(0.2)
        assert worker.host.draining
        expect_error(CODE.UNAVAILABLE, stub.OpenSession, pb.OpenSessionRequest(prompt_ids=PROMPT), timeout=5)
        release.set()
        assert list(in_flight.result(10).tokens) == greedy_proposal
        stopping.result(10)
        expect_error(CODE.UNAVAILABLE, stub.Info, pb.InfoRequest(), timeout=5)


# -- DEADLINE_EXCEEDED ---------------------------------------------------------------------------


def test_tiny_deadline_is_deadline_exceeded(draft: Worker, target: Worker, draft_stub: pb_grpc.DraftStub,
                                            target_stub: pb_grpc.TargetStub, greedy_proposal: list[int],
                                            greedy_argmax: list[int]) -> None:
    session_id, target_id = open_session(draft_stub), open_session(target_stub)
    for worker in (draft, target):  # keep each model thread busy well past the deadlines below
        worker.host._executor.submit(time.sleep, 0.6)
    expect_error(CODE.DEADLINE_EXCEEDED, draft_stub.Propose,
                 pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3), timeout=0.1)
    expect_error(CODE.DEADLINE_EXCEEDED, target_stub.Verify,
                 pb.VerifyRequest(session_id=target_id, expected_length=1, append_tokens=greedy_proposal,
                                  num_draft=3), timeout=0.1)
    wait_until_idle(draft, session_id)  # a call that reached the server may still be unwinding
    wait_until_idle(target, target_id)
    assert_draft_works(draft_stub, session_id, 1, greedy_proposal)
    assert_target_works(target_stub, target_id, 1, greedy_proposal, greedy_argmax)


def test_deadline_passed_in_queue_does_not_run_the_step(spare_worker: Callable[..., Worker],
                                                        greedy_proposal: list[int]) -> None:
    """A step whose deadline passes while it waits for the MLX thread is not run, and the
    session is left as it was (the caller retries with the same expected_length)."""
    worker = spare_worker("draft")
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        session_id = open_session(stub)
        before = stub.Info(pb.InfoRequest()).metrics
        release = block_model_thread(worker)
        try:
            expect_error(CODE.DEADLINE_EXCEEDED, stub.Propose,
                         pb.ProposeRequest(session_id=session_id, expected_length=1, append_tokens=[9, 9],
                                           num_draft=3), timeout=0.3)
            expect_error(CODE.DEADLINE_EXCEEDED, stub.OpenSession, pb.OpenSessionRequest(prompt_ids=PROMPT),
                         timeout=0.3)
        finally:
            release.set()
        wait_until_idle(worker, session_id)
        info = stub.Info(pb.InfoRequest())
        assert info.metrics.forward_passes == before.forward_passes  # the work never ran
        assert info.metrics.steps == before.steps
        assert info.live_sessions == 1
        assert_draft_works(stub, session_id, 1, greedy_proposal)


# -- Info, health, reflection -----------------------------------------------------------------------


def test_info_reports_model_load_and_metrics(spare_worker: Callable[..., Worker], target_dir: Path,
                                             local_target: ModelEngine, greedy_proposal: list[int]) -> None:
    worker = spare_worker("target", HostLimits(max_sessions=7, max_draft=9))
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.TargetStub(channel)
        info = stub.Info(pb.InfoRequest())
        assert info.role == "target"
        assert Path(info.model_path) == Path(target_dir).resolve()
        assert info.vocab_size == local_target.vocab_size
        assert info.eos_token_id == local_target.args.eos_token_id
        assert info.decoder_start_token_id == local_target.args.decoder_start_token_id
        assert info.tokenizer_fingerprint and info.dtype == "float32" and info.num_parameters > 0
        assert 0 < info.load_seconds < 600  # measured around the load at start
        # where it computes: MLX's default device (the CPU on this Linux machine), on this host
        import socket

        import mlx.core as mx

        assert info.device == ("gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu")
        assert info.hostname == socket.gethostname()
        assert (info.limits.max_sessions, info.limits.max_draft) == (7, 9)
        assert (info.live_sessions, info.cached_tokens, info.cache_bytes_used, info.metrics.steps) == (0, 0, 0, 0)

        session_id = open_session(stub)
        # The encoder plus the first decoder chunk, reserved at open so the budget holds.
        opened = stub.Info(pb.InfoRequest())
        assert opened.cached_tokens == len(PROMPT) + 256
        assert opened.cache_bytes_used == (len(PROMPT) + 256) * info.cache_bytes_per_position
        sampled = pb.SamplingParams(temperature=1.0)
        q = pb.Distribution(probs_f16=np.full(info.vocab_size, 1 / info.vocab_size, "<f2").tobytes())
        sizes = []
        for request in (
            pb.VerifyRequest(session_id=session_id, expected_length=1, append_tokens=greedy_proposal, num_draft=3),
            pb.VerifyRequest(session_id=session_id, expected_length=4, rollback_to=1, append_tokens=greedy_proposal,
                             num_draft=3, sampling=sampled, seed=3, draft_distributions=[q] * 3),
        ):
            response = stub.Verify(request)
            sizes.append(request.ByteSize() + response.ByteSize())
        info = stub.Info(pb.InfoRequest())
        assert info.live_sessions == 1
        assert info.cached_tokens == 256 + len(PROMPT)
        assert info.metrics.sessions_opened == 1
        assert info.metrics.steps == 2 and info.metrics.forward_passes == 2
        assert info.metrics.request_bytes + info.metrics.response_bytes == sum(sizes)
        assert info.metrics.response_bytes > 0 and info.metrics.request_bytes > 0
        assert sizes[1] > sizes[0] + 3 * 2 * info.vocab_size  # sampling carries q: 2 bytes per token id
        stub.Rollback(pb.RollbackRequest(session_id=session_id, expected_length=4, length=1))
        assert stub.Info(pb.InfoRequest()).metrics.steps == 2  # a Rollback is not a step


@pytest.mark.parametrize("role", ["draft", "target"])
def test_health_is_serving(draft: Worker, target: Worker, role: str) -> None:
    worker = draft if role == "draft" else target
    with grpc.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", f"specdec.v1.{role.capitalize()}"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as raised:  # grpc's own servicer: no message to check
            health.Check(health_pb2.HealthCheckRequest(service="specdec.v1.Nope"))
        assert raised.value.code() == CODE.NOT_FOUND


def test_a_draining_worker_ends_idle_step_streams_instead_of_waiting_out_its_grace(
        spare_worker: Callable[..., Worker]) -> None:
    """A step stream whose session is idle (a draft at k = 0) holds no work: SIGTERM's drain ends
    it at once, with OK, rather than after the whole grace period."""
    import queue as queues

    worker = spare_worker("draft")
    grace = 20.0
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        session = open_session(stub)
        outgoing: queues.Queue[pb.ProposeRequest | None] = queues.Queue()
        responses = stub.ProposeStream(iter(outgoing.get, None))
        outgoing.put(pb.ProposeRequest(session_id=session, expected_length=1, num_draft=2))
        assert len(next(responses).tokens) == 2
        started = time.monotonic()
        worker.loop.call(shutdown(worker.running, grace, worker.host.drain))
        took = time.monotonic() - started
        assert list(responses) == []  # the stream ended OK, with no answer pending
        outgoing.put(None)
    assert took < grace / 4, f"shutdown waited {took:.1f} s for an idle stream"


def test_health_goes_not_serving_on_drain(spare_worker: Callable[..., Worker]) -> None:
    worker = spare_worker("target")
    with grpc.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        worker.loop.call(worker.running.set_serving(False))
        for service in ("", "specdec.v1.Target"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("role", ["draft", "target"])
def test_reflection_lists_and_resolves_every_rpc(draft: Worker, target: Worker, role: str) -> None:
    worker = draft if role == "draft" else target
    name = f"specdec.v1.{role.capitalize()}"
    expected = {
        "draft": {"OpenSession", "Propose", "ProposeStream", "Rollback", "CloseSession", "Info"},
        "target": {"OpenSession", "Verify", "VerifyStream", "Rollback", "CloseSession", "Info"},
    }[role]
    with grpc.insecure_channel(worker.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {name, "grpc.health.v1.Health"} <= services
        other = "specdec.v1.Target" if role == "draft" else "specdec.v1.Draft"
        assert other not in services  # each process serves its own model service only
        pool = DescriptorPool(database)
        service = pool.FindServiceByName(name)
        assert {method.name for method in service.methods} == expected
        local = pb.DESCRIPTOR.services_by_name[role.capitalize()]
        for method in service.methods:
            resolved = pool.FindMethodByName(f"{name}.{method.name}")
            mine = local.methods_by_name[method.name]
            assert resolved.input_type.full_name == mine.input_type.full_name
            assert resolved.output_type.full_name == mine.output_type.full_name
            assert [f.name for f in resolved.output_type.fields] == [f.name for f in mine.output_type.fields]


# -- a real process drains on SIGTERM -------------------------------------------------------------


def test_draft_process_exits_cleanly_on_sigterm(tmp_path: Path, draft_dir: Path, greedy_proposal: list[int]
                                                ) -> None:
    with ServiceProcess("draft", ["--model", str(draft_dir), "--port", "0"], tmp_path / "draft.log") as process:
        process.wait_port(60)
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.DraftStub(channel)
            assert stub.Info(pb.InfoRequest(), timeout=10).role == "draft"
            session_id = open_session(stub)
            response = stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=1, num_draft=3),
                                    timeout=10)
            assert list(response.tokens) == greedy_proposal
        assert process.stop(grace=15) == 0  # SIGTERM: drained and exited by itself
