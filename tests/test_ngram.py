"""Model-free and hybrid drafting (``specdec-draft --method ngram|hybrid``) end to end, over gRPC.

References: transformers' greedy ``generate`` of the target alone, and the target's exact
distribution of its first two tokens (chi-square, as tests/test_orchestrator.py). Two
targets: the copy pair's (``specdec_tools.copy_pair``: it writes its prompt back with some
tokens swapped, so n-gram drafts are often right) and a random tiny T5 (they are mostly wrong,
and often there is nothing to propose).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from harness import LoopThread, Worker, start_orchestrator_in, start_worker_in
from test_orchestrator import _chi_square_p, _exact_two_token_distribution, _sample_pairs
from transformers import T5ForConditionalGeneration

from orchestrator.client import SpecdecClient
from specdec_core.cache_bytes import NGRAM_BYTES_PER_POSITION
from specdec_core.decoder_state import CHUNK
from specdec_core.session_host import HostLimits
from specdec_core.tokenizer import load_tokenizer
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc
from specdec_tools.copy_pair import CopyPair, CopyRecipe, build_copy_pair, copy_lines
from specdec_tools.tiny_checkpoints import corpus_lines

MAX_TOKENS = 40
COPY_PROMPTS = copy_lines(6)
OTHER_PROMPTS = corpus_lines()[5:425:21][:6]
CODE = grpc.StatusCode

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def copy_pair(tmp_path_factory: pytest.TempPathFactory) -> CopyPair:
    # A flatter target than the benchmark's (margin 5: the copied token has p ~ 0.37 at T=1), so
    # that sampling rejects n-gram drafts as well as accepting them.
    recipe = CopyRecipe(target_extra_layers=1, target_margin=5.0, draft_margin=5.0)
    return build_copy_pair(tmp_path_factory.mktemp("copy_pair"), recipe)


def reference_of(target: Path):  # a callable with .model and .tokenizer, as test_orchestrator's
    model = T5ForConditionalGeneration.from_pretrained(target).eval()
    tokenizer = load_tokenizer(target)

    def greedy(prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=max_tokens)[0].tolist()[1:]
        eos = tokenizer.eos_token_id
        return out[: out.index(eos)] if eos in out else out

    return SimpleNamespace(greedy=greedy, model=model, tokenizer=tokenizer)


class Cluster:
    """A target, drafts of each method, and one orchestrator per draft."""

    def __init__(self, loop: LoopThread, target: Path, model_draft: Path, **hybrid: int):
        self.target = start_worker_in(loop, "target", target)
        self.drafts: dict[str, Worker] = {
            "ngram": start_worker_in(loop, "draft", model_draft, method="ngram"),
            "hybrid": start_worker_in(loop, "draft", model_draft, method="hybrid", **hybrid),
        }
        self.orchestrators = {m: start_orchestrator_in(loop, [d.address], [self.target.address])
                              for m, d in self.drafts.items()}
        self.clients = {m: SpecdecClient(o.address, timeout=120) for m, o in self.orchestrators.items()}

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        for orchestrator in self.orchestrators.values():
            orchestrator.stop()
        for worker in (*self.drafts.values(), self.target):
            worker.stop()


@pytest.fixture(scope="module")
def copy_cluster(loop: LoopThread, copy_pair: CopyPair) -> Iterator[Cluster]:
    cluster = Cluster(loop, copy_pair.target, copy_pair.draft)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def random_cluster(loop: LoopThread, target_dir: Path, near_draft_dir: Path) -> Iterator[Cluster]:
    cluster = Cluster(loop, target_dir, near_draft_dir)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def copy_reference(copy_pair: CopyPair):
    return reference_of(copy_pair.target)


@pytest.fixture(scope="module")
def random_reference(target_dir: Path):
    return reference_of(target_dir)


def assert_stats_consistent(response) -> None:
    s = response.stats
    assert 0 <= s.accepted <= s.proposed and s.target_passes == s.steps
    assert s.tokens == s.accepted + s.target_tokens
    assert sum(s.proposed_per_position) == s.proposed and sum(s.accepted_per_position) == s.accepted


# -- greedy: the target's own output ---------------------------------------------------------------


@pytest.mark.parametrize("num_draft", [1, 4, "auto"])
@pytest.mark.parametrize("method", ["ngram", "hybrid"])
def test_greedy_equals_target_alone_on_copy_prompts(copy_cluster: Cluster, copy_reference, method: str,
                                                    num_draft) -> None:
    client = copy_cluster.clients[method]
    proposed = accepted = steps = tokens = drafting_steps = 0
    for prompt in COPY_PROMPTS:
        response = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=num_draft)
        assert list(response.token_ids) == copy_reference.greedy(prompt), prompt
        assert_stats_consistent(response)
        s = response.stats
        proposed, accepted, steps, tokens = proposed + s.proposed, accepted + s.accepted, steps + s.steps, tokens + s.tokens
        drafting_steps += s.proposed_per_position[0] if s.proposed_per_position else 0
    # Drafts saved target passes, and some were wrong (the swapped tokens) and rejected. (Auto k
    # chooses by measured time, not passes: on a loaded machine it drafts less, so a lower bar.)
    assert tokens / steps > (1.4 if num_draft != "auto" else 1.2) and 0 < accepted < proposed
    if method == "ngram":
        assert drafting_steps < steps  # the first step of each request has nothing to match: target alone


@pytest.mark.parametrize("method", ["ngram", "hybrid"])
def test_greedy_equals_target_alone_on_other_prompts(random_cluster: Cluster, random_reference,
                                                     method: str) -> None:
    client = random_cluster.clients[method]
    proposed = accepted = 0
    for prompt in OTHER_PROMPTS:
        for num_draft in (3, "auto"):
            response = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=num_draft)
            assert list(response.token_ids) == random_reference.greedy(prompt), prompt
            assert_stats_consistent(response)
            proposed, accepted = proposed + response.stats.proposed, accepted + response.stats.accepted
    assert proposed > accepted  # wrong drafts were made and rejected


# -- the draft's contract: empty proposals, rollback, expected lengths, limits, Info ----------------


def open_session(stub: pb_grpc.DraftStub, prompt: list[int]) -> str:
    response = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=prompt, client_tag="test"))
    assert response.length == 1
    return response.session_id


def expect_error(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    assert raised.value.code() == code, raised.value.details()
    return raised.value.details()


def test_an_empty_proposal_is_a_step_of_the_target_alone(copy_cluster: Cluster, copy_pair: CopyPair) -> None:
    prompt = load_tokenizer(copy_pair.target)(COPY_PROMPTS[0]).input_ids
    with grpc.insecure_channel(copy_cluster.drafts["ngram"].address) as d, \
            grpc.insecure_channel(copy_cluster.target.address) as t:
        draft, target = pb_grpc.DraftStub(d), pb_grpc.TargetStub(t)
        session_id = open_session(draft, prompt)
        for sampling in (pb.SamplingParams(), pb.SamplingParams(temperature=1.0)):
            empty = draft.Propose(pb.ProposeRequest(session_id=session_id, expected_length=1, rollback_to=1,
                                                    append_tokens=[250, 251], num_draft=4, sampling=sampling))
            assert (list(empty.tokens), list(empty.token_probs), len(empty.distributions)) == ([], [], 0)
            assert empty.length == 3
            target_id = open_session(target, prompt)
            verdict = target.Verify(pb.VerifyRequest(session_id=target_id, expected_length=1,
                                                     append_tokens=[250, 251], num_draft=0, sampling=sampling))
            assert len(verdict.argmax) == 1 and verdict.length == 3
            assert len(verdict.resampled) == (1 if sampling.temperature else 0)
            draft.Rollback(pb.RollbackRequest(session_id=session_id, expected_length=3, length=1))


@pytest.mark.parametrize("method", ["ngram", "hybrid"])
@pytest.mark.parametrize("sampling", [pb.SamplingParams(), pb.SamplingParams(temperature=1.0)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("how", ["rollback_to", "Rollback"])
def test_rollback_equals_fresh_session(copy_cluster: Cluster, copy_pair: CopyPair, method: str,
                                       sampling: pb.SamplingParams, how: str) -> None:
    tokenizer = load_tokenizer(copy_pair.target)
    prompt = tokenizer(COPY_PROMPTS[1]).input_ids
    output = [copy_pair.sigma.get(t, t) for t in prompt[2:6]]  # the target's first four tokens
    with grpc.insecure_channel(copy_cluster.drafts[method].address) as channel:
        stub = pb_grpc.DraftStub(channel)
        session_id = open_session(stub, prompt)
        first = stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=1, append_tokens=output,
                                               num_draft=6, sampling=sampling, seed=1))
        assert len(first.tokens) == 6 and first.length == 11
        kept, appended = [*output, *first.tokens[:2]], [77]
        if how == "Rollback":
            assert stub.Rollback(pb.RollbackRequest(session_id=session_id, expected_length=11,
                                                    length=7)).length == 7
            again = stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=7, append_tokens=appended,
                                                   num_draft=5, sampling=sampling, seed=2))
        else:
            again = stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=11, rollback_to=7,
                                                   append_tokens=appended, num_draft=5, sampling=sampling, seed=2))
        fresh_id = open_session(stub, prompt)
        fresh = stub.Propose(pb.ProposeRequest(session_id=fresh_id, expected_length=1, append_tokens=kept + appended,
                                               num_draft=5, sampling=sampling, seed=2))
        assert list(again.tokens) == list(fresh.tokens)
        np.testing.assert_allclose(again.token_probs, fresh.token_probs, rtol=1e-4, atol=1e-6)
        assert [bytes(d.probs_f16) for d in again.distributions] == [bytes(d.probs_f16) for d in fresh.distributions]
        assert again.length == fresh.length == 8 + len(fresh.tokens)
        for closing in (session_id, fresh_id):
            assert stub.CloseSession(pb.CloseSessionRequest(session_id=closing)).closed


def test_ngram_draft_keeps_the_session_contract(loop: LoopThread, copy_pair: CopyPair) -> None:
    prompt = load_tokenizer(copy_pair.target)(COPY_PROMPTS[2]).input_ids
    session_bytes = (len(prompt) + CHUNK) * NGRAM_BYTES_PER_POSITION  # its prompt and a chunk, no K/V
    limits = HostLimits(max_sessions=4, cache_memory_bytes=3 * session_bytes, max_draft=6, max_decoder_tokens=300)
    worker = start_worker_in(loop, "draft", copy_pair.draft, limits=limits, method="ngram")
    try:
        with grpc.insecure_channel(worker.address) as channel:
            stub = pb_grpc.DraftStub(channel)
            session_id = open_session(stub, prompt)
            step = pb.ProposeRequest(session_id=session_id, expected_length=1, append_tokens=prompt[2:5], num_draft=4)
            assert stub.Propose(step).length == 8
            assert "expected" in expect_error(CODE.ABORTED, stub.Propose, step)  # a repeated step
            expect_error(CODE.INVALID_ARGUMENT, stub.Propose, pb.ProposeRequest(
                session_id=session_id, expected_length=8, rollback_to=9, num_draft=2))
            expect_error(CODE.INVALID_ARGUMENT, stub.Propose, pb.ProposeRequest(
                session_id=session_id, expected_length=8, num_draft=7))  # over --max-draft
            expect_error(CODE.INVALID_ARGUMENT, stub.Propose, pb.ProposeRequest(
                session_id=session_id, expected_length=8, append_tokens=[10**6], num_draft=2))
            expect_error(CODE.INVALID_ARGUMENT, stub.Propose, pb.ProposeRequest(
                session_id=session_id, expected_length=8, append_tokens=[5] * 300, num_draft=2))
            expect_error(CODE.NOT_FOUND, stub.Propose, pb.ProposeRequest(session_id="nope", expected_length=1,
                                                                         num_draft=2))
            # Still serving the session after every refusal, from where it was.
            assert stub.Propose(pb.ProposeRequest(session_id=session_id, expected_length=8, rollback_to=4,
                                                  num_draft=4)).length == 8
            # Budget: each session counts its prompt and a chunk of decoder positions, as a model's.
            info = stub.Info(pb.InfoRequest())
            assert (info.live_sessions, info.cached_tokens, info.cache_bytes_used) == (1, len(prompt) + CHUNK,
                                                                                    session_bytes)
            others = [open_session(stub, prompt) for _ in range(2)]
            assert "(--cache-memory)" in expect_error(CODE.RESOURCE_EXHAUSTED, stub.OpenSession,
                                                      pb.OpenSessionRequest(prompt_ids=prompt))
            for other in others:
                stub.CloseSession(pb.CloseSessionRequest(session_id=other))
            assert stub.Info(pb.InfoRequest()).cache_bytes_used == session_bytes
    finally:
        worker.stop()


def test_info_reports_the_draft_method(copy_cluster: Cluster, copy_pair: CopyPair, loop: LoopThread) -> None:
    model = start_worker_in(loop, "draft", copy_pair.draft)
    try:
        infos = {}
        for name, worker in (("model", model), *copy_cluster.drafts.items(), ("target", copy_cluster.target)):
            with grpc.insecure_channel(worker.address) as channel:
                stub = (pb_grpc.TargetStub if name == "target" else pb_grpc.DraftStub)(channel)
                infos[name] = stub.Info(pb.InfoRequest())
        assert {name: info.draft_method for name, info in infos.items()} == {
            "model": "model", "ngram": "ngram", "hybrid": "hybrid", "target": ""}
        ngram, target = infos["ngram"], infos["target"]
        for field in ("vocab_size", "eos_token_id", "pad_token_id", "decoder_start_token_id", "tokenizer_fingerprint"):
            assert getattr(ngram, field) == getattr(target, field), field
        assert (ngram.dtype, ngram.num_parameters, ngram.quantization_bits) == ("", 0, 0)
        assert ngram.metrics.forward_passes == 0  # it has proposed (the tests above), with no model
        assert infos["hybrid"].num_parameters == infos["model"].num_parameters > 0
    finally:
        model.stop()


def test_method_flags_are_refused_where_they_cannot_work(copy_pair: CopyPair) -> None:
    from specdec_core.errors import CheckpointError, InvalidArgument
    from specdec_grpc.worker import WorkerConfig, build_host

    with pytest.raises(CheckpointError, match="for drafts"):
        build_host(WorkerConfig(role="target", model=str(copy_pair.target), method="ngram"))
    with pytest.raises(InvalidArgument, match="hybrid-min-match"):
        build_host(WorkerConfig(role="draft", model=str(copy_pair.draft), method="hybrid", hybrid_min_match=5))
    with pytest.raises(InvalidArgument, match="ngram_min"):
        build_host(WorkerConfig(role="draft", model=str(copy_pair.draft), method="ngram", ngram_min=3, ngram_max=2))


# -- sampling: the target's own distribution --------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_cluster(loop: LoopThread, copy_pair: CopyPair) -> Iterator[Cluster]:
    # hybrid with matches of one token: within one block, n-gram and model tokens alternate.
    cluster = Cluster(loop, copy_pair.target, copy_pair.draft, hybrid_min_match=1)
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("method", ["ngram", "hybrid"])
def test_sampling_matches_the_target_distribution(sampling_cluster: Cluster, copy_reference, method: str) -> None:
    client = sampling_cluster.clients[method]
    prompt = COPY_PROMPTS[3]
    exact = _exact_two_token_distribution(copy_reference, prompt)
    # Not vacuous: drafts are proposed, and both accepted and rejected. (The n-gram draft can only
    # draft the second token, and only when the first occurs in the prompt: ~40% of requests.)
    stats = [client.generate(prompt, max_tokens=3, temperature=1.0, seed=s, num_draft=2).stats for s in range(40)]
    assert sum(s.proposed for s in stats) >= 8
    assert 0 < sum(s.accepted for s in stats) < sum(s.proposed for s in stats)
    observed = _sample_pairs(client, prompt, num_draft=2)
    assert _chi_square_p(observed, exact) > 1e-3


# -- the benchmark's draft-method comparison ----------------------------------------------------------


def test_drafting_bench_compares_methods_against_the_target_alone(tmp_path: Path) -> None:
    import json

    from specdec_tools.bench import main

    out = tmp_path / "bench"
    code = main(["--drafting", "--draft-methods", "ngram,hybrid", "--tiny", "--workloads", "copy", "--out", str(out),
                 "--ks", "3", "--temperatures", "0", "--prompts", "2", "--repeats", "1", "--max-tokens", "16",
                 "--log-level", "WARNING"])
    assert code == 0
    report = json.loads((out / "drafting.json").read_text())
    (workload,) = report["workloads"]
    cells = {(c["method"], c["k"]): c for c in workload["results"]["cells"]}
    assert set(cells) == {("target", None), ("ngram", "3"), ("hybrid", "3")}
    for method in ("ngram", "hybrid"):
        cell = cells[(method, "3")]
        assert cell["exact"] == 1.0  # greedy: the target's own output, through the services
        assert cell["tokens_per_target_pass"] > 1.0 and 0.0 < cell["alpha"] <= 1.0 and cell["speedup"] > 0
    # The n-gram draft has nothing to propose at each request's first step.
    assert 0.0 < cells[("ngram", "3")]["drafting_steps"] < 1.0
    assert cells[("target", None)]["tokens_per_target_pass"] == 1.0
    assert "| ngram | 3 |" in (out / "drafting.md").read_text()
