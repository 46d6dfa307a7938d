"""Property-based fuzzing of every rpc of Draft, Target and Orchestrator (hypothesis).

Requests carry random session ids, lengths, token ids (negative, huge, valid), k, sampling
parameters (NaN, inf, huge), draft distributions with odd byte lengths and out-of-range ids,
and prompts of random unicode; every rpc also gets random bytes as its request body. Only
the designed status codes may come back (never INTERNAL or UNKNOWN), and afterwards every
service is healthy, holds no session, and a normal generation still works.

Servers run in-process (port 0) with small limits, so the limits are fuzzed too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import LoopThread, RunningOrchestrator, Worker, start_orchestrator_in, start_worker_in
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.generation import OrchestratorLimits
from specdec_core.session_host import HostLimits
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

EXAMPLES = 150  # per rpc and kind of fuzzing
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
VOCAB = 512  # the tiny checkpoints' vocabulary
PROMPT = [37, 12, 99, 250, 8, 41, 1]
# 4 MiB of cache: 4096 positions of the tiny models (2 decoder layers x 4 heads x 16 x K and V x 4 bytes).
WORKER_LIMITS = HostLimits(max_sessions=8, cache_memory_bytes=4 * 2**20, max_prompt_tokens=256, max_draft=16)
ORCHESTRATOR_LIMITS = OrchestratorLimits(max_prompt_tokens=64, max_tokens_cap=8, max_num_draft=8,
                                         max_generations=4)
FUZZED: Counter[str] = Counter()  # requests sent per rpc
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (rpc, status code name)

pytestmark = pytest.mark.timeout(300)


# -- servers ----------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def workers(loop: LoopThread, near_draft_dir: Path, target_dir: Path) -> Iterator[dict[str, Worker]]:
    started = {"draft": start_worker_in(loop, "draft", near_draft_dir, limits=WORKER_LIMITS),
               "target": start_worker_in(loop, "target", target_dir, limits=WORKER_LIMITS)}
    yield started
    for worker in started.values():
        worker.stop()


@pytest.fixture(scope="module")
def orch(loop: LoopThread, workers: dict[str, Worker]) -> Iterator[RunningOrchestrator]:
    running = start_orchestrator_in(loop, [workers["draft"].address], [workers["target"].address],
                                    limits=ORCHESTRATOR_LIMITS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channels(workers: dict[str, Worker], orch: RunningOrchestrator) -> Iterator[dict[str, grpc.Channel]]:
    opened = {"draft": grpc.insecure_channel(workers["draft"].address),
              "target": grpc.insecure_channel(workers["target"].address),
              "orchestrator": grpc.insecure_channel(orch.address)}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module")
def draft(channels: dict[str, grpc.Channel]) -> pb_grpc.DraftStub:
    return pb_grpc.DraftStub(channels["draft"])


@pytest.fixture(scope="module")
def target(channels: dict[str, grpc.Channel]) -> pb_grpc.TargetStub:
    return pb_grpc.TargetStub(channels["target"])


@pytest.fixture(scope="module")
def orchestrator(channels: dict[str, grpc.Channel]) -> pb_grpc.OrchestratorStub:
    return pb_grpc.OrchestratorStub(channels["orchestrator"])


def send(name: str, fn: Callable[..., object], request: object, allowed: set = ALLOWED) -> object | None:  # type: ignore[type-arg]
    """Send one fuzzed request; only designed codes may come back. Returns the response or None."""
    FUZZED[name] += 1
    try:
        response = fn(request, timeout=30)
        if hasattr(response, "__next__"):  # a stream: read it to the end
            response = list(response)
        OUTCOMES[name, "OK"] += 1
        return response
    except grpc.RpcError as error:
        OUTCOMES[name, error.code().name] += 1
        assert error.code() in allowed, f"{name} -> {error.code().name}: {error.details()}\nrequest: {request!r}"
        return None


def send_step(name: str, unary: Callable[..., object], stream: Callable[..., object], request: object,
              over_stream: bool) -> object | None:
    """A fuzzed step by its unary call, or as the one message of a step stream: the same codes
    may come back, and a stream answers with exactly one message or an error. A step whose own
    timeout_ms is under a second may also have run out of it (DEADLINE_EXCEEDED)."""
    allowed = ALLOWED | {grpc.StatusCode.DEADLINE_EXCEEDED} if 0 < request.timeout_ms < 1000 else ALLOWED  # type: ignore[attr-defined]
    if not over_stream:
        return send(name, unary, request, allowed)
    responses = send(name + "Stream", lambda r, timeout: stream(iter([r]), timeout=timeout), request, allowed)
    if responses is None:
        return None
    assert len(responses) == 1, f"{name}Stream answered one step with {len(responses)} messages"
    return responses[0]


# -- strategies ---------------------------------------------------------------------------------------
#
# Each request is mostly well-formed: every field comes from its "good" strategy except up to
# three, chosen per example, that come from their "wild" one. So requests get past the first
# check and reach the deep paths (the step itself, budgets, rollback), and every field is
# also fuzzed on its own and in combination.

int32 = st.integers(-(2**31), 2**31 - 1)
some_int = st.one_of(st.integers(-3, 40), int32)
uint64 = st.integers(0, 2**64 - 1)
float32 = st.floats(width=32)  # NaN, +-inf, subnormals, huge
good_token = st.integers(0, VOCAB - 1)
token = st.one_of(good_token, int32)
wild_tokens = st.one_of(
    st.lists(token, max_size=40),
    st.builds(lambda n, t: [t] * n, st.one_of(st.integers(0, 300), st.integers(4000, 6000)), good_token),
)
good_sampling = st.one_of(
    st.just(pb.SamplingParams()),
    st.builds(pb.SamplingParams, temperature=st.floats(0.05, 4.0), top_k=st.integers(0, 60),
              top_p=st.one_of(st.just(0.0), st.floats(0.05, 1.0))),
)
wild_sampling = st.builds(
    pb.SamplingParams,
    temperature=st.one_of(st.sampled_from([0.0, 1.0, -1.0]), float32),
    top_k=st.one_of(st.sampled_from([0, 5, -1]), int32),
    top_p=st.one_of(st.sampled_from([0.0, 1.0, 1.5]), float32),
)


def _f16(values) -> bytes:  # type: ignore[no-untyped-def]
    return np.asarray(values, dtype="<f2").tobytes()


good_distribution = st.one_of(
    st.builds(  # sparse, plausible probabilities
        lambda ids, p: pb.Distribution(token_ids=sorted(set(ids)), probs_f16=_f16([p] * len(set(ids)))),
        st.lists(good_token, min_size=1, max_size=12), st.floats(0, 1),
    ),
    st.builds(  # dense
        lambda seed: pb.Distribution(probs_f16=_f16(np.random.default_rng(seed).dirichlet(np.ones(VOCAB)))),
        st.integers(0, 2**32 - 1),
    ),
)
wild_distribution = st.one_of(
    st.builds(pb.Distribution, token_ids=st.lists(token, max_size=12), probs_f16=st.binary(max_size=25)),
    st.builds(lambda b: pb.Distribution(probs_f16=b), st.binary(min_size=2 * VOCAB - 3, max_size=2 * VOCAB + 3)),
    good_distribution,
)
random_id = st.text(max_size=48)
good_prompt = st.sampled_from(["spell 1234", "Return a new dictionary", "Split the string at the last sep",
                               "héllo wörld ✓ 日本語"])
wild_prompt = st.one_of(st.text(max_size=120), st.text(alphabet=st.characters(codec="utf-8"), max_size=400),
                        st.sampled_from(["   ", "", "\x00", "\u200b"]), st.just("word " * 100))


class Fields:
    """Draws each field from its good strategy, or from its wild one if chosen to be corrupted."""

    def __init__(self, draw, names: list[str]):  # type: ignore[no-untyped-def]
        self.draw = draw
        self.corrupt = draw(st.sets(st.sampled_from(names), max_size=3))

    def __call__(self, name: str, good, wild):  # type: ignore[no-untyped-def]
        return self.draw(wild if name in self.corrupt else good)


@st.composite
def step_case(draw, role: str) -> dict:  # type: ignore[no-untyped-def]
    """A Propose (draft) or Verify (target) on a live, closed or made-up session."""
    f = Fields(draw, ["session", "expected_length", "rollback_to", "append", "num_draft", "sampling",
                      "distributions", "timeout_ms"])
    case = {
        "session": f("session", st.just("live"), st.sampled_from(["closed", "random"])),
        "made_up": draw(random_id),
        "advance": draw(st.booleans()),  # the live session is 1 or 4 tokens long
        "expected_length": f("expected_length", st.none(), some_int),  # None: the true length
        "rollback_to": f("rollback_to", st.integers(0, 4), some_int),
        "append": f("append", st.lists(good_token, max_size=6), wild_tokens),
        "sampling": f("sampling", good_sampling, wild_sampling),
        "seed": draw(uint64),
        "timeout_ms": f("timeout_ms", st.sampled_from([0.0, 30_000.0]), float32),
        "stream": draw(st.booleans()),  # over ProposeStream/VerifyStream instead of the unary call
    }
    if role == "draft":
        case["num_draft"] = f("num_draft", st.integers(1, 8), some_int)
        return case
    case["num_draft"] = f("num_draft", st.integers(0, len(case["append"])), some_int)
    n = case["num_draft"] if 0 <= case["num_draft"] <= 8 else 2
    needed = n if case["sampling"].temperature != 0 else 0
    case["distributions"] = f("distributions", st.lists(good_distribution, min_size=needed, max_size=needed),
                              st.lists(wild_distribution, max_size=6))
    return case


@st.composite
def rollback_case(draw) -> dict:  # type: ignore[no-untyped-def]
    f = Fields(draw, ["session", "expected_length", "length"])
    return {
        "session": f("session", st.just("live"), st.sampled_from(["closed", "random"])),
        "made_up": draw(random_id),
        "advance": draw(st.booleans()),
        "expected_length": f("expected_length", st.none(), some_int),
        "length": f("length", st.integers(1, 4), some_int),
    }


@st.composite
def generate_request(draw) -> pb.GenerateRequest:  # type: ignore[no-untyped-def]
    f = Fields(draw, ["prompt", "max_tokens", "num_draft", "temperature", "top_k", "top_p", "delta"])
    request = pb.GenerateRequest(
        prompt=f("prompt", good_prompt, wild_prompt),
        max_tokens=f("max_tokens", st.integers(0, 8), some_int),
        num_draft=f("num_draft", st.integers(0, 8), some_int),
        num_draft_auto=draw(st.booleans()),
        temperature=f("temperature", st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0]), float32),
        top_k=f("top_k", st.integers(0, 60), int32),
        top_p=f("top_p", st.one_of(st.just(0.0), st.floats(0.05, 1.0)), float32),
        delta=f("delta", st.sampled_from([0.0, 0.0, 0.3, 1.0]), float32),
    )
    seed = draw(st.one_of(st.none(), uint64))
    if seed is not None:
        request.seed = seed
    speculative = draw(st.one_of(st.none(), st.booleans()))
    if speculative is not None:
        request.speculative = speculative
    return request


def open_live(stub, role: str, advance: bool) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    """A fresh session (1 token long, or 4 after a first step) and its length."""
    session = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=PROMPT), timeout=30)
    if not advance:
        return session.session_id, 1
    if role == "draft":
        length = stub.Propose(pb.ProposeRequest(session_id=session.session_id, expected_length=1, num_draft=3),
                              timeout=30).length
    else:
        length = stub.Verify(pb.VerifyRequest(session_id=session.session_id, expected_length=1,
                                              append_tokens=[5, 6, 7], num_draft=2), timeout=30).length
    return session.session_id, length


def pick_session(stub, role: str, case: dict) -> tuple[str, int, str | None]:  # type: ignore[no-untyped-def]
    """(session id to name, its true length, id to close afterwards)."""
    if case["session"] == "random":
        return case["made_up"], 1, None
    session_id, length = open_live(stub, role, case["advance"])
    if case["session"] == "closed":
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=30)
        return session_id, length, None
    return session_id, length, session_id


def expected_length(case: dict, true_length: int) -> int:
    return true_length if case["expected_length"] is None else case["expected_length"]


# -- draft and target ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["draft", "target"])
def test_fuzz_open_session(role: str, draft, target) -> None:  # type: ignore[no-untyped-def]
    stub = draft if role == "draft" else target

    @FUZZ
    @given(prompt_ids=st.one_of(st.lists(good_token, min_size=1, max_size=30), wild_tokens),
           tag=st.text(max_size=40))
    def run(prompt_ids: list[int], tag: str) -> None:
        response = send(f"{role}.OpenSession", stub.OpenSession,
                        pb.OpenSessionRequest(prompt_ids=prompt_ids, client_tag=tag))
        if response is not None:
            assert response.length == 1 and len(response.session_id) >= 22
            stub.CloseSession(pb.CloseSessionRequest(session_id=response.session_id), timeout=30)

    run()


def fuzz_propose(draft, case: dict) -> None:  # type: ignore[no-untyped-def]
    session_id, length, to_close = pick_session(draft, "draft", case)
    request = pb.ProposeRequest(
        session_id=session_id, expected_length=expected_length(case, length),
        rollback_to=case["rollback_to"], append_tokens=case["append"], num_draft=case["num_draft"],
        sampling=case["sampling"], seed=case["seed"], timeout_ms=case["timeout_ms"],
    )
    response = send_step("draft.Propose", draft.Propose, draft.ProposeStream, request, case["stream"])
    if response is not None:
        assert 1 <= len(response.tokens) <= request.num_draft
        assert all(0 <= t < VOCAB for t in response.tokens)
        assert len(response.distributions) == (len(response.tokens) if request.sampling.temperature else 0)
    if to_close:
        draft.CloseSession(pb.CloseSessionRequest(session_id=to_close), timeout=30)


def test_fuzz_propose(draft) -> None:  # type: ignore[no-untyped-def]
    @FUZZ
    @given(case=step_case("draft"))
    def run(case: dict) -> None:
        fuzz_propose(draft, case)

    run()


def fuzz_verify(target, case: dict) -> None:  # type: ignore[no-untyped-def]
    session_id, length, to_close = pick_session(target, "target", case)
    request = pb.VerifyRequest(
        session_id=session_id, expected_length=expected_length(case, length),
        rollback_to=case["rollback_to"], append_tokens=case["append"], num_draft=case["num_draft"],
        sampling=case["sampling"], seed=case["seed"], draft_distributions=case["distributions"],
        timeout_ms=case["timeout_ms"],
    )
    response = send_step("target.Verify", target.Verify, target.VerifyStream, request, case["stream"])
    if response is not None:
        k = request.num_draft
        assert len(response.argmax) == k + 1
        if request.sampling.temperature:
            assert len(response.draft_probs) == k and len(response.resampled) == k + 1
            assert all(0 <= t < VOCAB for t in response.resampled)
    if to_close:
        target.CloseSession(pb.CloseSessionRequest(session_id=to_close), timeout=30)


def test_fuzz_verify(target) -> None:  # type: ignore[no-untyped-def]
    @FUZZ
    @given(case=step_case("target"))
    def run(case: dict) -> None:
        fuzz_verify(target, case)

    run()


def fuzz_rollback(stub, role: str, case: dict) -> None:  # type: ignore[no-untyped-def]
    session_id, length, to_close = pick_session(stub, role, case)
    request = pb.RollbackRequest(session_id=session_id, expected_length=expected_length(case, length),
                                 length=case["length"])
    response = send(f"{role}.Rollback", stub.Rollback, request)
    if response is not None:
        assert response.length == request.length
    if to_close:
        stub.CloseSession(pb.CloseSessionRequest(session_id=to_close), timeout=30)


@pytest.mark.parametrize("role", ["draft", "target"])
def test_fuzz_rollback(role: str, draft, target) -> None:  # type: ignore[no-untyped-def]
    stub = draft if role == "draft" else target

    @FUZZ
    @given(case=rollback_case())
    def run(case: dict) -> None:
        fuzz_rollback(stub, role, case)

    run()


@pytest.mark.parametrize("role", ["draft", "target"])
def test_fuzz_close_session(role: str, draft, target) -> None:  # type: ignore[no-untyped-def]
    stub = draft if role == "draft" else target

    @FUZZ
    @given(session=st.sampled_from(["live", "closed", "random"]), made_up=random_id, twice=st.booleans())
    def run(session: str, made_up: str, twice: bool) -> None:
        session_id, _, to_close = pick_session(stub, role, {"session": session, "made_up": made_up,
                                                            "advance": False})
        response = send(f"{role}.CloseSession", stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
        assert response is not None and response.closed == (to_close is not None)
        if twice:
            again = send(f"{role}.CloseSession", stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
            assert again is not None and not again.closed

    run()


# -- orchestrator --------------------------------------------------------------------------------------


def fuzz_generate(orchestrator, rpc: str, request: pb.GenerateRequest) -> None:  # type: ignore[no-untyped-def]
    response = send(f"orchestrator.{rpc}", getattr(orchestrator, rpc), request)
    if response is None:
        return
    chunks = response if isinstance(response, list) else [response]
    generated = sum(len(c.token_ids) for c in chunks)
    assert chunks[-1].finish_reason in ("eos", "length")
    assert generated <= (request.max_tokens or ORCHESTRATOR_LIMITS.max_tokens_cap)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_fuzz_generate(rpc: str, orchestrator) -> None:  # type: ignore[no-untyped-def]
    @FUZZ
    @given(request=generate_request())
    def run(request: pb.GenerateRequest) -> None:
        fuzz_generate(orchestrator, rpc, request)

    run()


# -- random bytes as the request body of every rpc ----------------------------------------------------

RPCS = [("draft", "Draft", m) for m in ("OpenSession", "Propose", "ProposeStream", "Rollback", "CloseSession",
                                         "Info")]
RPCS += [("target", "Target", m) for m in ("OpenSession", "Verify", "VerifyStream", "Rollback", "CloseSession",
                                           "Info")]
RPCS += [("orchestrator", "Orchestrator", m) for m in ("Generate", "GenerateStream", "Status")]


def fuzz_raw_bytes(channels, stubs, name: str, service: str, method: str, body: bytes) -> None:  # type: ignore[no-untyped-def]
    channel = channels[name]
    path = f"/specdec.v1.{service}/{method}"
    if method.endswith("Stream") and method != "GenerateStream":  # a step stream: the body, then the body again
        bidi = channel.stream_stream(path)
        response = send(f"{name}.{method}", lambda b, timeout: bidi(iter([b, b]), timeout=timeout), body)
    else:
        call = (channel.unary_stream if method == "GenerateStream" else channel.unary_unary)(path)
        response = send(f"{name}.{method}", call, body)
    if response is not None and method == "OpenSession":
        session_id = pb.OpenSessionResponse.FromString(response).session_id
        stubs[name].CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=30)


@pytest.mark.parametrize("name, service, method", RPCS, ids=[f"{s}.{m}" for _, s, m in RPCS])
def test_fuzz_raw_bytes(name: str, service: str, method: str, channels, draft, target) -> None:  # type: ignore[no-untyped-def]
    @FUZZ
    @given(body=st.one_of(st.binary(max_size=64), st.binary(min_size=200, max_size=2000)))
    def run(body: bytes) -> None:
        fuzz_raw_bytes(channels, {"draft": draft, "target": target}, name, service, method, body)

    run()


# -- afterwards -----------------------------------------------------------------------------------------


def test_services_healthy_and_clean_after_fuzzing(channels, workers, orchestrator, draft, target) -> None:  # type: ignore[no-untyped-def]
    """Fuzzes every service itself first (a shorter run of the cases above, and random bytes at
    every rpc), so it holds whichever tests ran before it, in whatever order; then every
    service must be healthy, hold no session, and still generate."""
    examples = []

    @settings(FUZZ, max_examples=30)
    @given(propose=step_case("draft"), verify=step_case("target"), rollback=rollback_case(),
           role=st.sampled_from(["draft", "target"]), rpc=st.sampled_from(["Generate", "GenerateStream"]),
           request=generate_request(), raw=st.sampled_from(RPCS), body=st.binary(max_size=64))
    def burst(propose: dict, verify: dict, rollback: dict, role: str, rpc: str, request: pb.GenerateRequest,
              raw: tuple[str, str, str], body: bytes) -> None:
        examples.append(1)
        fuzz_propose(draft, propose)
        fuzz_verify(target, verify)
        fuzz_rollback(draft if role == "draft" else target, role, rollback)
        fuzz_generate(orchestrator, rpc, request)
        fuzz_raw_bytes(channels, {"draft": draft, "target": target}, *raw, body)

    burst()
    assert examples, "the burst sent nothing"
    for channel in channels.values():
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    response = orchestrator.Generate(pb.GenerateRequest(prompt="Return a new dictionary", max_tokens=8,
                                                        num_draft=3), timeout=30)
    assert len(response.token_ids) == 8 and response.finish_reason == "length"
    status = orchestrator.Status(pb.StatusRequest(), timeout=5)
    assert status.active_generations == 0 and all(r.healthy and r.active_sessions == 0 for r in status.replicas)
    for worker in workers.values():
        assert worker.host.snapshot()["live_sessions"] == 0  # nothing leaked, by the orchestrator or the errors
    print("\nrequests fuzzed per rpc: " + ", ".join(f"{k} {v}" for k, v in sorted(FUZZED.items())))
    print(f"total: {sum(FUZZED.values())}")
    for rpc in sorted(FUZZED):
        print(f"  {rpc}: " + ", ".join(f"{code} {n}" for (r, code), n in sorted(OUTCOMES.items()) if r == rpc))
