"""Hardening of the workers and the orchestrator against requests and states that used to take a
process down or mislead its callers.

- a session's decoder is bounded (``--max-decoder-tokens``) and oversized repeated fields are
  refused before they are converted; the message cap is sized from the limits;
- the cache budget holds while several sessions open at once;
- a worker whose model thread is stuck reports NOT_SERVING (``--watchdog-s``) and recovers; the
  orchestrator takes a replica that timed out out of rotation;
- binding a non-loopback address without TLS or a token warns; a lone worker TLS key or cert is
  refused.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import grpc
import mlx.core as mx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import LoopThread, Worker, position_bytes, start_worker_in
from procs import wait_until

from orchestrator.backend_protocol import ReplicaError, ReplicaFailure
from orchestrator.replicas import ReplicaPool
from orchestrator.server import OrchestratorConfig, WorkerCredentials
from orchestrator.server import build_parser as orchestrator_parser
from specdec_core.checkpoint import load_model
from specdec_core.decoder_state import CHUNK
from specdec_core.engine import DECODE_SLICE, ModelEngine
from specdec_core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from specdec_core.session_host import HostLimits
from specdec_grpc.security import Security, is_loopback
from specdec_grpc.server import DEFAULT_MAX_MESSAGE_MB, create_server
from specdec_grpc.wire import WireLimits, step_from_pb
from specdec_grpc.worker import WorkerConfig, needed_message_mb
from specdec_grpc.worker import build_parser as worker_parser
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

CODE = grpc.StatusCode
PROMPT = [37, 12, 99, 250, 8, 41, 1]  # the tiny checkpoints' vocabulary is 512
BLOCK = [5, 17, 230, 9]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def spare(loop: LoopThread) -> Iterator[Any]:
    """Start a worker of one's own (stopped after the test)."""
    started: list[Worker] = []

    def start(role: str, model_dir: Path, limits: HostLimits | None = None, **config: Any) -> Worker:
        worker = start_worker_in(loop, role, model_dir, limits=limits, **config)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def error_of(call: Any, request: Any, timeout: float = 30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    return info.value


def open_session(stub: Any) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(prompt_ids=PROMPT), timeout=30).session_id


def verify(stub: pb_grpc.TargetStub, session_id: str, length: int, block: list[int],
           k: int | None = None) -> pb.VerifyResponse:
    return stub.Verify(pb.VerifyRequest(session_id=session_id, expected_length=length, append_tokens=block,
                                        num_draft=len(block) if k is None else k), timeout=30)


# -- 1. the decoder is bounded ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["draft", "target"])
def test_worker_flags_set_the_new_limits(role: str) -> None:
    args = worker_parser(role).parse_args(["--max-decoder-tokens", "77", "--watchdog-s", "2.5"])
    config = WorkerConfig.from_args(role, args)
    assert config.limits.max_decoder_tokens == 77 and config.limits.watchdog_s == 2.5
    defaults = WorkerConfig.from_args(role, worker_parser(role).parse_args([]))
    assert defaults.limits.max_decoder_tokens == 4096 and defaults.limits.watchdog_s == 30
    assert defaults.max_message_mb is None  # sized from the limits and the model's vocabulary


def test_a_huge_append_is_refused_at_once_and_the_worker_keeps_serving(spare, target_dir: Path) -> None:
    """200,000 appended tokens used to pass the cache budget (262,144 positions) and then build
    200k x 200k position-bias and score tensors: the process died. Now: INVALID_ARGUMENT."""
    worker = spare("target", target_dir)
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.TargetStub(channel)
        before = open_session(stub)
        expected = list(verify(stub, before, 1, BLOCK).argmax)
        victim = open_session(stub)
        huge = pb.VerifyRequest(session_id=victim, expected_length=1, append_tokens=[5] * 200_000, num_draft=1)
        # A generous deadline: the point is that it is refused before any tensor is built.
        error = error_of(stub.Verify, huge, timeout=10)
        assert error.code() == CODE.INVALID_ARGUMENT, error.details()
        assert "max_decoder_tokens=4096" in error.details()
        # Every session still works, the refused one included (untouched, length 1).
        assert list(verify(stub, victim, 1, BLOCK).argmax) == expected
        assert list(verify(stub, open_session(stub), 1, BLOCK).argmax) == expected
        assert verify(stub, before, 1 + len(BLOCK), [7]).length == 2 + len(BLOCK)


def test_a_session_cannot_grow_past_max_decoder_tokens(spare, target_dir: Path, near_draft_dir: Path) -> None:
    limits = HostLimits(max_decoder_tokens=24, max_draft=8)
    target = spare("target", target_dir, limits)
    draft = spare("draft", near_draft_dir, limits)
    with grpc.insecure_channel(target.address) as tc, grpc.insecure_channel(draft.address) as dc:
        target_stub, draft_stub = pb_grpc.TargetStub(tc), pb_grpc.DraftStub(dc)
        # Target: appends up to 24 tokens in all are fine, one more is refused.
        session = open_session(target_stub)
        assert verify(target_stub, session, 1, [5] * 20, k=2).length == 21
        error = error_of(target_stub.Verify, pb.VerifyRequest(session_id=session, expected_length=21,
                                                              append_tokens=[5] * 4, num_draft=1))
        assert error.code() == CODE.INVALID_ARGUMENT and "max_decoder_tokens is 24" in error.details()
        assert verify(target_stub, session, 21, [5] * 3).length == 24  # untouched; exactly at the cap is fine
        error = error_of(target_stub.Verify, pb.VerifyRequest(session_id=session, expected_length=24,
                                                              append_tokens=[5], num_draft=1))
        assert error.code() == CODE.INVALID_ARGUMENT
        # A rollback makes room again.
        rolled = target_stub.Verify(pb.VerifyRequest(session_id=session, expected_length=24, rollback_to=10,
                                                     append_tokens=[5] * 4, num_draft=2))
        assert rolled.length == 14
        # One call may not append more than a whole session holds, whatever its length.
        error = error_of(target_stub.Verify, pb.VerifyRequest(session_id=open_session(target_stub),
                                                              expected_length=1, append_tokens=[5] * 25,
                                                              num_draft=1))
        assert error.code() == CODE.INVALID_ARGUMENT and "max_decoder_tokens=24" in error.details()
        # Draft: what it would propose counts too.
        session = open_session(draft_stub)
        error = error_of(draft_stub.Propose, pb.ProposeRequest(session_id=session, expected_length=1,
                                                               append_tokens=[5] * 18, num_draft=6))
        assert error.code() == CODE.INVALID_ARGUMENT and "max_decoder_tokens is 24" in error.details()
        response = draft_stub.Propose(pb.ProposeRequest(session_id=session, expected_length=1,
                                                        append_tokens=[5] * 18, num_draft=5), timeout=30)
        assert response.length <= 24


def test_oversized_draft_distributions_are_refused_by_name() -> None:
    limits = WireLimits(max_prompt_tokens=16, max_append_tokens=64, max_draft=4, vocab_size=512)
    one = pb.Distribution(token_ids=[3], probs_f16=np.ones(1, "<f2").tobytes())
    too_many = pb.VerifyRequest(session_id="s", expected_length=1, append_tokens=[5], num_draft=1,
                                draft_distributions=[one] * 5)
    with pytest.raises(InvalidArgument, match="max_draft is 4"):
        step_from_pb(too_many, None, limits)
    # More entries than the vocabulary has tokens (duplicate ids used to be summed into q).
    wide = pb.Distribution(token_ids=[3] * 513, probs_f16=np.full(513, 0.001, "<f2").tobytes())
    with pytest.raises(InvalidArgument, match="vocabulary"):
        step_from_pb(pb.VerifyRequest(session_id="s", expected_length=1, append_tokens=[5], num_draft=1,
                                      draft_distributions=[wide]), None, limits)
    with pytest.raises(InvalidArgument, match="max_prompt_tokens is 16"):
        limits.check_open(pb.OpenSessionRequest(prompt_ids=[5] * 17))
    ok = step_from_pb(pb.VerifyRequest(session_id="s", expected_length=1, append_tokens=[5] * 64, num_draft=1,
                                       draft_distributions=[one]), None, limits)
    assert len(ok.append_tokens) == 64 and len(ok.draft_distributions) == 1


def test_too_wide_q_is_invalid_argument_over_grpc(spare, target_dir: Path) -> None:
    worker = spare("target", target_dir)
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.TargetStub(channel)
        session = open_session(stub)
        wide = pb.Distribution(token_ids=[3] * 600, probs_f16=np.full(600, 0.001, "<f2").tobytes())
        error = error_of(stub.Verify, pb.VerifyRequest(
            session_id=session, expected_length=1, append_tokens=[5], num_draft=1,
            sampling=pb.SamplingParams(temperature=1.0), draft_distributions=[wide]))
        assert error.code() == CODE.INVALID_ARGUMENT and "vocabulary (512)" in error.details()
        assert verify(stub, session, 1, BLOCK).length == 1 + len(BLOCK)


def test_message_cap_is_sized_from_the_limits(spare, target_dir: Path) -> None:
    # T5's vocabulary (32128) at max_draft 32: 32 full-support distributions (~5 MB), twice.
    assert needed_message_mb(HostLimits(), 32128) == 10
    assert needed_message_mb(HostLimits(max_draft=8), 32128) < needed_message_mb(HostLimits(), 32128)
    assert DEFAULT_MAX_MESSAGE_MB == 16  # the orchestrator's: text prompts, ~1 MiB of relayed q
    # The tiny model (vocabulary 512) needs under 1 MiB: a 2 MiB request is refused by gRPC.
    worker = spare("target", target_dir)
    with grpc.insecure_channel(worker.address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        stub = pb_grpc.TargetStub(channel)
        error = error_of(stub.OpenSession, pb.OpenSessionRequest(prompt_ids=PROMPT, client_tag="x" * (2 << 20)))
        assert error.code() == CODE.RESOURCE_EXHAUSTED
        assert verify(stub, open_session(stub), 1, BLOCK).length == 1 + len(BLOCK)


def test_a_long_append_is_fed_in_slices_with_the_same_logits(target_dir: Path) -> None:
    """A failover resync appends a whole generation: the decoder is fed DECODE_SLICE positions
    per call (bounded score tensors), and the logits equal one full pass."""
    engine = ModelEngine(load_model(str(target_dir)), max_draft=8)
    state = engine.start(PROMPT)
    rng = np.random.default_rng(0)
    state.tokens.extend(int(t) for t in rng.integers(3, 512, size=2 * DECODE_SLICE + 90))
    fed: list[int] = []
    decode, decode_sessions = engine.model.decode, engine.model.decode_sessions

    def recording(tokens: list[list[int]], *args: Any) -> list[mx.array]:
        fed.extend(len(seq) for seq in tokens)
        return decode_sessions(tokens, *args)

    engine.model.decode_sessions = recording  # type: ignore[method-assign]  (a fresh engine, used once)
    logits = engine.forward(state, 5)
    assert max(fed) <= DECODE_SLICE + 5 and sum(fed) == len(state.tokens)
    assert state.cache.length == len(state.tokens)
    encoder_output = engine.model.encode(mx.array([PROMPT], dtype=mx.int32))
    whole = decode(mx.array([state.tokens], dtype=mx.int32), encoder_output=encoder_output,
                                num_logits=5)
    np.testing.assert_allclose(logits, np.array(whole[0]), rtol=1e-4, atol=1e-4)


# -- 2. the cache budget holds under concurrent opens ------------------------------------------------------


def test_concurrent_opens_never_exceed_the_cache_budget(spare, loop: LoopThread, draft_dir: Path) -> None:
    per_session = (CHUNK + len(PROMPT)) * position_bytes(draft_dir)  # the decoder's first chunk and the encoder
    budget = 2 * per_session + 8
    worker = spare("draft", draft_dir, HostLimits(cache_memory_bytes=budget))
    host = worker.host

    async def open_many(n: int) -> list[Any]:
        return await asyncio.gather(*(host.open(PROMPT) for _ in range(n)), return_exceptions=True)

    results = loop.call(open_many(6))
    opened = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, ResourceExhausted) for r in refused), refused
    assert len(opened) == 2
    assert host.store.bytes_used == 2 * per_session <= budget
    # A failed open gives its reservation back: after closing one, one (and only one) more opens.
    loop.call(host.close(opened[0].id))
    with pytest.raises(DeadlineExceeded):  # the deadline passed while it waited to encode
        loop.call(host.open(PROMPT, deadline=0.0))
    results = loop.call(open_many(3))
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert host.store.bytes_used <= budget


# -- 3. a wedged worker stops taking new sessions -------------------------------------------------------------


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_stuck_model_thread_turns_health_not_serving_until_it_recovers(spare, draft_dir: Path) -> None:
    worker = spare("draft", draft_dir, HostLimits(watchdog_s=0.5))
    release = threading.Event()
    start_batch = worker.host.engine.start_batch

    def stuck_start(prompts: list[list[int]]) -> Any:
        release.wait(60)  # a model thread stuck in a forward pass
        return start_batch(prompts)

    worker.host.engine.start_batch = stuck_start  # type: ignore[method-assign]
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        assert health_of(worker.address) == SERVING
        blocked = stub.OpenSession.future(pb.OpenSessionRequest(prompt_ids=PROMPT), timeout=60)
        wait_until(lambda: health_of(worker.address) == NOT_SERVING, 10, what="NOT_SERVING while stuck")
        error = error_of(stub.OpenSession, pb.OpenSessionRequest(prompt_ids=PROMPT))
        assert error.code() == CODE.UNAVAILABLE and "watchdog" in error.details()
        release.set()
        assert blocked.result(30).session_id  # the stuck call finishes normally
        wait_until(lambda: health_of(worker.address) == SERVING, 10, what="SERVING after recovery")
        del worker.host.engine.start_batch
        session = open_session(stub)
        assert stub.Propose(pb.ProposeRequest(session_id=session, expected_length=1, num_draft=2),
                            timeout=30).length == 3


def test_idle_workers_stay_serving_and_draining_ones_do_not_come_back(spare, loop: LoopThread, draft_dir: Path) -> None:
    worker = spare("draft", draft_dir, HostLimits(watchdog_s=0.2))
    assert worker.host.stalled_s() == 0  # idle is not stalled, however long
    loop.call(asyncio.sleep(0.6))
    assert health_of(worker.address) == SERVING
    # A draining server stays NOT_SERVING whatever the watchdog says.
    worker.running.draining = True
    loop.call(worker.running.set_serving(False))
    loop.call(worker.running.set_wedged(False))
    assert health_of(worker.address) == NOT_SERVING


def _pool(*targets: str) -> ReplicaPool:
    pool = ReplicaPool([], list(targets), channel_factory=lambda address: MagicMock())
    for replica in pool.replicas:
        replica.healthy = True
    return pool


def test_a_replica_that_timed_out_is_out_of_rotation_until_health_says_serving() -> None:
    pool = _pool("a:1", "b:1")
    slow, other = pool.replicas
    other.active_sessions = 3  # the least-loaded choice would be the slow one
    pool.report_failure(slow.backend, ReplicaError("a:1", ReplicaFailure.TIMED_OUT, "DEADLINE_EXCEEDED: no answer in 60s"))
    assert not slow.healthy and "DEADLINE_EXCEEDED" in slow.last_error
    assert pool.acquire("target", set()) is other.backend
    # Busy or confused about one session is not a placement signal.
    pool.report_failure(other.backend, ReplicaError("b:1", ReplicaFailure.SESSION_LOST, "ABORTED: stale step"))
    assert other.healthy
    # The health watch puts it back once it answers SERVING (a stuck worker says NOT_SERVING).
    # (with the limits every worker reports, an Info without them is garbage and refused; and room)
    limits = pb.Limits(max_decoder_tokens=4096, max_draft=32, max_batch=16, max_prompt_tokens=2048)
    info = pb.InfoResponse(vocab_size=512, role="target", limits=limits, typical_sessions_free=8)
    pool.reference = info
    slow.backend.stub.Info = AsyncMock(return_value=info)
    slow.health.Check = AsyncMock(return_value=health_pb2.HealthCheckResponse(status=NOT_SERVING))
    asyncio.run(pool._check(slow))
    assert not slow.healthy
    slow.health.Check = AsyncMock(return_value=health_pb2.HealthCheckResponse(status=SERVING))
    asyncio.run(pool._check(slow))
    assert slow.healthy
    assert pool.acquire("target", set()) is slow.backend


# -- 4. secure multi-host by default ----------------------------------------------------------------------


def _bind(loop: LoopThread, host: str, security: Security | None = None) -> None:
    async def start_and_stop() -> None:
        running = await create_server(lambda server: None, [], host=host, port=0, security=security)
        await running.server.stop(0)

    loop.call(start_and_stop())


def test_binding_the_network_without_tls_or_token_warns(loop: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="specdec_grpc.server")
    _bind(loop, "0.0.0.0")
    warnings = [r.getMessage() for r in caplog.records if "neither TLS nor a bearer token" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0]
    caplog.clear()
    _bind(loop, "0.0.0.0", Security(token="s3cret"))
    _bind(loop, "127.0.0.1")
    assert not [r for r in caplog.records if "neither TLS nor a bearer token" in r.getMessage()]


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "[::]", "", "10.0.0.5", "hostA"))


@pytest.mark.parametrize("flag, missing", [("--worker-tls-key", "--worker-tls-cert"),
                                           ("--worker-tls-cert", "--worker-tls-key")])
def test_a_lone_worker_tls_key_or_cert_is_refused(flag: str, missing: str, capsys: pytest.CaptureFixture) -> None:
    args = orchestrator_parser().parse_args(["--target", "127.0.0.1:1", "--worker-tls-ca", "ca.pem",
                                             flag, "some.pem"])
    with pytest.raises(SystemExit) as info:
        OrchestratorConfig.from_args(args)
    assert info.value.code == 2
    assert f"{flag} needs {missing}" in capsys.readouterr().err
    both = orchestrator_parser().parse_args(["--target", "127.0.0.1:1", "--worker-tls-ca", "ca.pem",
                                             "--worker-tls-cert", "c.pem", "--worker-tls-key", "k.pem"])
    assert OrchestratorConfig.from_args(both).workers == WorkerCredentials("ca.pem", "c.pem", "k.pem", None)


# -- an empty token never turns authentication off ------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n", "  \t\n"])
@pytest.mark.parametrize("service", ["draft", "target", "orchestrator", "orchestrator-to-workers"])
def test_an_empty_token_file_refuses_to_start(service: str, content: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(content)
    if service in ("draft", "target"):
        args = worker_parser(service).parse_args(["--auth-token-file", str(token_file)])
        start = lambda: WorkerConfig.from_args(service, args)  # noqa: E731
    else:
        flag = "--auth-token-file" if service == "orchestrator" else "--worker-token-file"
        args = orchestrator_parser().parse_args(["--target", "127.0.0.1:1", flag, str(token_file)])
        start = lambda: OrchestratorConfig.from_args(args)  # noqa: E731
    with pytest.raises(SystemExit) as info:
        start()
    assert info.value.code not in (0, None)
    assert str(token_file) in str(info.value.code) and "no token" in str(info.value.code)


@pytest.mark.parametrize("flag", ["--auth-token", "--worker-token"])
def test_an_empty_token_flag_refuses_to_start(flag: str) -> None:
    args = orchestrator_parser().parse_args(["--target", "127.0.0.1:1", flag, " "])
    with pytest.raises(SystemExit) as info:
        OrchestratorConfig.from_args(args)
    assert f"{flag} is empty" in str(info.value.code)
    given = orchestrator_parser().parse_args(["--target", "127.0.0.1:1", flag, "s3cret"])
    config = OrchestratorConfig.from_args(given)
    assert "s3cret" in (config.security.token, config.workers.token)


def test_a_worker_with_an_empty_token_file_exits_non_zero_naming_the_file(tmp_path: Path) -> None:
    """The entry point itself: a non-zero exit and the message on stderr, before any model loads."""
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    done = subprocess.run([sys.executable, "-c", "from target_service.server import main; main()",
                           "--port", "0", "--auth-token-file", str(token_file)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert str(token_file) in done.stderr and "authentication off" in done.stderr


def test_a_worker_token_sent_in_cleartext_off_loopback_warns(loop: LoopThread, caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    from orchestrator.server import start_orchestrator

    def warnings_for(targets: list[str], **workers: Any) -> list[str]:
        caplog.clear()
        config = OrchestratorConfig(drafts=[], targets=targets, connect_timeout_s=0.2,
                                    workers=WorkerCredentials(**workers))
        with pytest.raises(Exception):  # noqa: B017, PT011 - nothing serves there; only the warning matters
            loop.call(start_orchestrator(config))
        return [r.getMessage() for r in caplog.records if "cleartext" in r.getMessage()]

    caplog.set_level(logging.WARNING, logger="orchestrator.server")
    found = warnings_for(["10.255.255.1:50071", "127.0.0.1:1"], token="s3cret")
    assert len(found) == 1 and "10.255.255.1:50071" in found[0] and "127.0.0.1:1" not in found[0]
    assert not warnings_for(["127.0.0.1:1", "localhost:2", "[::1]:3"], token="s3cret")
    assert not warnings_for(["10.255.255.1:50071"])  # no token: nothing to leak
    assert not warnings_for(["10.255.255.1:50071"], token="s3cret", ca="ca.pem")  # TLS
