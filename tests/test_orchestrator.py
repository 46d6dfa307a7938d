"""End-to-end speculative generation through real gRPC servers (draft, target, orchestrator).

References: transformers' own greedy ``generate`` of the target alone, and the target's exact
sampling distribution of the first two tokens (chi-square test).
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from harness import LoopThread, speculative_cluster, start_orchestrator_in, start_worker_in
from scipy import stats as scipy_stats
from transformers import T5ForConditionalGeneration

from orchestrator.client import SpecdecClient
from orchestrator.planner import Planner
from orchestrator.replicas import StartupError
from specdec_core.tokenizer import load_tokenizer
from specdec_tools.tiny_checkpoints import build_t5, corpus_lines

MAX_TOKENS = 24
PROMPTS = corpus_lines()[5:425:21][:20]



@pytest.fixture(scope="module")
def cluster(loop: LoopThread, near_draft_dir: Path, target_dir: Path):
    with speculative_cluster(loop, near_draft_dir, target_dir) as running:
        yield running


@pytest.fixture(scope="module")
def reference(target_dir: Path):
    """Greedy output of the target alone, by transformers."""
    model = T5ForConditionalGeneration.from_pretrained(target_dir).eval()
    tokenizer = load_tokenizer(target_dir)
    cache: dict[str, list[int]] = {}

    def greedy(prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        key = f"{max_tokens}:{prompt}"
        if key not in cache:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, do_sample=False, max_new_tokens=max_tokens)[0].tolist()[1:]
            eos = tokenizer.eos_token_id
            cache[key] = out[: out.index(eos)] if eos in out else out
        return cache[key]

    greedy.model = model  # type: ignore[attr-defined]
    greedy.tokenizer = tokenizer  # type: ignore[attr-defined]
    return greedy


def assert_stats_consistent(response) -> None:
    s = response.stats
    assert 0 <= s.accepted <= s.proposed
    assert s.target_passes == s.steps
    assert s.tokens == s.accepted + s.target_tokens
    assert len(response.token_ids) == s.tokens - (1 if response.finish_reason == "eos" else 0)
    assert s.draft_passes >= s.proposed
    assert s.total_ms >= s.draft_ms + s.verify_ms - 1e-3
    # Per draft position: every block drafts positions 1..n and keeps a prefix of them.
    assert sum(s.proposed_per_position) == s.proposed and sum(s.accepted_per_position) == s.accepted
    assert all(a <= p for a, p in zip(s.accepted_per_position, s.proposed_per_position, strict=True))
    assert list(s.proposed_per_position) == sorted(s.proposed_per_position, reverse=True)
    # One flag per token; the accepted draft tokens among them (an accepted EOS is not shown).
    assert len(response.from_draft) == len(response.token_ids)
    assert s.accepted - 1 <= sum(response.from_draft) <= s.accepted
    assert 0 < s.time_to_first_token_ms <= s.total_ms + 50
    assert 0 < s.target_model_ms <= s.verify_ms and s.draft_model_ms <= s.draft_ms


@pytest.mark.parametrize("num_draft", [1, 3, 5, 8, "auto"])
def test_greedy_speculative_equals_target_alone(cluster, reference, num_draft) -> None:
    client = cluster[0]
    accepted = proposed = 0
    for prompt in PROMPTS:
        response = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=num_draft)
        assert list(response.token_ids) == reference(prompt), prompt
        assert response.finish_reason == ("length" if len(response.token_ids) == MAX_TOKENS else "eos")
        assert_stats_consistent(response)
        accepted += response.stats.accepted
        proposed += response.stats.proposed
    # The noisy draft agrees with the target often but not always: both paths ran (auto k may
    # rightly decide that this draft, as costly per token as the target, is not worth drafting).
    assert accepted < proposed and (accepted > 0 or num_draft == "auto")


def test_concurrent_greedy_requests_are_batched_and_equal_the_target_alone(cluster, reference) -> None:
    """16 clients at once, each with its own prompt length and k (auto k moves per session):
    the workers batch their steps, and every output is transformers' greedy output."""
    client, draft, target = cluster[0], cluster[1], cluster[2]
    ks = [1, 2, 3, 5, "auto"]
    before = [(w.host.metrics.batches, w.host.metrics.batched_steps) for w in (draft, target)]

    def one(i: int):
        return client.generate(PROMPTS[i], max_tokens=MAX_TOKENS, num_draft=ks[i % len(ks)])

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    for i, response in enumerate(responses):
        assert list(response.token_ids) == reference(PROMPTS[i]), PROMPTS[i]
    for (batches, steps), worker in zip(before, (draft, target), strict=True):
        new_batches = worker.host.metrics.batches - batches
        assert (worker.host.metrics.batched_steps - steps) / new_batches > 1.5  # batches really formed


@pytest.fixture(scope="module")
def twin(loop: LoopThread, target_dir: Path):
    """The target drafting for itself: every draft agrees, so blocks drafted ahead get used."""
    with speculative_cluster(loop, target_dir, target_dir) as running:
        yield running


@pytest.mark.parametrize("num_draft", [3, "auto"])
def test_pipelined_drafting_keeps_greedy_output_and_hits(twin, reference, num_draft,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafting ahead while the target verifies: the output is the target's, with pipelining
    on and off, and blocks drafted ahead were used (hits). Whether drafting ahead pays is the
    planner's call from learned timings (tests/unit/test_planner.py); here it drafts all of the next
    block at every step, so which blocks hit is a matter of the prompts alone, not of the load."""
    monkeypatch.setattr(Planner, "ahead", lambda self, k, k_next, *rest, **named: k_next)
    client = twin[0]
    hits = predrafts = 0
    for prompt in PROMPTS[:8]:
        on = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=num_draft, pipeline=True)
        off = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=num_draft, pipeline=False)
        assert list(on.token_ids) == list(off.token_ids) == reference(prompt), prompt
        assert off.stats.predrafts == 0 and off.stats.wasted_draft_tokens == 0
        assert on.stats.predraft_hits <= on.stats.predrafts
        assert_stats_consistent(on)
        hits += on.stats.predraft_hits
        predrafts += on.stats.predrafts
    assert 0 < hits <= predrafts


def test_seeded_sampling_does_not_depend_on_pipelining(twin, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded request draws the same tokens whether blocks were drafted ahead or not, and
    whether a block drafted ahead was used: 60 seeds, fixed and auto k, T=1 (sampling off the
    pipeline is what the chi-square test checks against the target's own distribution).

    Whether drafting ahead pays is the planner's call from the timings it learns
    (tests/unit/test_planner.py), which a loaded machine can tip against it for a whole run; here it
    drafts ahead at every step, all of the next block (a choice it may make for a seeded request),
    so blocks drafted ahead are used whatever the load: which ones is a matter of the seeds alone."""
    monkeypatch.setattr(Planner, "ahead", lambda self, k, k_next, *rest, **named: k_next)
    client = twin[0]
    hits = 0
    for seed in range(60):
        num_draft = 2 if seed % 2 else "auto"
        options = dict(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, num_draft=num_draft)
        prompt = PROMPTS[seed % len(PROMPTS)]
        on = client.generate(prompt, pipeline=True, **options)
        off = client.generate(prompt, pipeline=False, **options)
        assert list(on.token_ids) == list(off.token_ids), (seed, prompt)
        assert list(on.stats.steps_per_num_draft) == list(off.stats.steps_per_num_draft)
        hits += on.stats.predraft_hits
    assert hits > 0  # blocks drafted ahead were really used


def test_text_and_stream_agree(cluster, reference) -> None:
    client = cluster[0]
    prompt = PROMPTS[0]
    whole = client.generate(prompt, max_tokens=MAX_TOKENS)
    chunks = list(client.stream(prompt, max_tokens=MAX_TOKENS))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert chunks[-1].finish_reason == whole.finish_reason
    assert all(not c.finish_reason for c in chunks[:-1])
    assert whole.text == reference.tokenizer.decode(reference(prompt), skip_special_tokens=True)


def test_no_speculation_is_the_target_alone(cluster, reference) -> None:
    client = cluster[0]
    for prompt in PROMPTS[:5]:
        response = client.generate(prompt, max_tokens=MAX_TOKENS, speculative=False)
        assert list(response.token_ids) == reference(prompt)
        assert response.stats.proposed == 0 and response.stats.draft_passes == 0
        assert response.stats.target_passes == response.stats.tokens


def test_delta_one_accepts_every_draft_token(cluster) -> None:
    client = cluster[0]
    for prompt in PROMPTS[:5]:
        for temperature in (0.0, 1.0):
            response = client.generate(prompt, max_tokens=MAX_TOKENS, delta=1.0, temperature=temperature, seed=1)
            assert response.stats.proposed > 0
            assert response.stats.accepted == response.stats.proposed
            assert_stats_consistent(response)


def test_seeded_sampling_is_reproducible(cluster) -> None:
    client = cluster[0]
    a = client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=1.0, seed=11)
    b = client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=1.0, seed=11)
    assert list(a.token_ids) == list(b.token_ids) and a.stats.seed == 11
    outputs = {tuple(client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=1.0, seed=s).token_ids)
               for s in range(8)}
    assert len(outputs) > 1
    assert_stats_consistent(a)


def test_seeded_sampling_does_not_depend_on_concurrency(cluster) -> None:
    """The same seeded request alone and beside 8 others (steps interleaved on both workers)."""
    client = cluster[0]
    options = dict(max_tokens=MAX_TOKENS, temperature=1.0, top_k=40, num_draft="auto")
    alone = [list(client.generate(PROMPTS[i], seed=100 + i, **options).token_ids) for i in range(3)]
    with ThreadPoolExecutor(9) as pool:
        crowd = list(pool.map(lambda i: list(client.generate(PROMPTS[i % 9], seed=100 + i % 9, **options).token_ids),
                              range(18)))
    for i in range(3):
        assert crowd[i] == alone[i] and crowd[i + 9] == alone[i]


def test_auto_num_draft_chooses_per_step(cluster) -> None:
    """Auto k is chosen every step: the stats' histogram of k covers every step, and across the
    prompts the policy both drafted and ran steps without drafting (k = 0) or with another k."""
    client = cluster[0]
    histograms = []
    for p in PROMPTS:
        stats = client.generate(p, max_tokens=MAX_TOKENS, num_draft="auto").stats
        assert sum(stats.steps_per_num_draft) == stats.steps
        assert sum(k * n for k, n in enumerate(stats.steps_per_num_draft)) >= stats.proposed
        histograms.append(list(stats.steps_per_num_draft))
    used = {k for h in histograms for k, n in enumerate(h) if n}
    assert any(k > 0 for k in used) and len(used) > 1


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(max_tokens=10**6), "max_tokens"),
        (dict(num_draft=1000), "num_draft"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(delta=1.5), "delta"),
    ],
)
def test_bad_requests_are_invalid_argument(cluster, options, fragment) -> None:
    client = cluster[0]
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPTS[0], **options)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    assert client.generate(PROMPTS[0], max_tokens=4).stats.tokens >= 1  # still serving


def test_empty_prompt_is_invalid_argument(cluster) -> None:
    with pytest.raises(grpc.RpcError) as info:
        cluster[0].generate("   ")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_json(cluster, reference, capsys) -> None:
    from orchestrator import cli

    orch = cluster[3]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", PROMPTS[2], "--max-tokens", str(MAX_TOKENS), "--num-draft", "3", "--json",
                  "--address", orch.address])
    assert exit_info.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == reference(PROMPTS[2])
    assert result["stats"]["steps"] == result["stats"]["target_passes"]


def test_cli_streams_text_and_stats(cluster, reference, capsys) -> None:
    from orchestrator import cli

    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPTS[3], "--max-tokens", "8", "--address", cluster[3].address])
    out = capsys.readouterr().out
    expected = reference.tokenizer.decode(reference(PROMPTS[3], 8), skip_special_tokens=True)
    assert out.startswith(expected)
    assert "accepted" in out and "target passes" in out


def test_sessions_closed_after_requests(cluster) -> None:
    client, draft, target, _ = cluster
    client.generate(PROMPTS[0], max_tokens=8)
    list(client.stream(PROMPTS[0], max_tokens=8))
    assert draft.host.snapshot()["live_sessions"] == 0
    assert target.host.snapshot()["live_sessions"] == 0


# -- distribution: speculative sampling equals the target's own ------------------------------------

N_SAMPLES = 2000
SAMPLE_PROMPT_INDEX = 4


def _exact_two_token_distribution(reference, prompt: str) -> dict[tuple[int, int], float]:
    """P(t1, t2) of the target sampling at temperature 1 (t2 = -1 after EOS)."""
    model, tokenizer = reference.model, reference.tokenizer
    eos = tokenizer.eos_token_id
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        first = model(input_ids=ids, decoder_input_ids=torch.tensor([[0]])).logits[0, -1].softmax(-1)
        vocab = first.shape[0]
        pairs = torch.stack([torch.zeros(vocab, dtype=torch.long), torch.arange(vocab)], dim=1)
        second = model(input_ids=ids.expand(vocab, -1), decoder_input_ids=pairs).logits[:, -1].softmax(-1)
    joint = (first[:, None] * second).double().numpy()
    dist: dict[tuple[int, int], float] = {}
    for t1 in range(vocab):
        if t1 == eos:
            dist[(t1, -1)] = float(first[t1])
            continue
        for t2 in np.flatnonzero(joint[t1] > 1e-7):
            dist[(t1, int(t2))] = float(joint[t1, t2])
    return dist


def _sample_pairs(client: SpecdecClient, prompt: str, n: int = N_SAMPLES, **options) -> Counter:
    """First two tokens of n seeded generations. max_tokens=3 with k=2 drafts both positions in
    one step, so the residual is exercised at both and the bonus after them."""
    eos = 1

    def one(seed: int) -> tuple[int, int]:
        response = client.generate(prompt, max_tokens=3, temperature=1.0, seed=seed, **options)
        tokens = list(response.token_ids) + ([eos] if response.finish_reason == "eos" else [])
        return (tokens[0], tokens[1] if tokens[0] != eos else -1)

    with ThreadPoolExecutor(16) as pool:  # 16 clients: the workers batch the steps
        return Counter(pool.map(one, range(n)))


def _chi_square_p(observed: Counter, expected_probs: dict[tuple[int, int], float]) -> float:
    """Pearson chi-square over categories expecting >= 5 samples; the rest pooled as one."""
    total = sum(observed.values())
    big = [c for c, p in expected_probs.items() if p * total >= 5]
    obs = [observed.get(c, 0) for c in big]
    exp = [expected_probs[c] * total for c in big]
    obs.append(total - sum(obs))
    exp.append(total - sum(exp))
    if exp[-1] < 5:  # fold a tiny remainder into the last category
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    return float(scipy_stats.chisquare(obs, exp).pvalue)


@pytest.fixture(scope="module")
def exact_pairs(reference):
    return _exact_two_token_distribution(reference, PROMPTS[SAMPLE_PROMPT_INDEX])


def test_speculative_sampling_matches_target_distribution(cluster, exact_pairs) -> None:
    client = cluster[0]
    prompt = PROMPTS[SAMPLE_PROMPT_INDEX]
    target = cluster[2]
    batches, steps = target.host.metrics.batches, target.host.metrics.batched_steps
    speculative = _sample_pairs(client, prompt, num_draft=2)
    assert (target.host.metrics.batched_steps - steps) / (target.host.metrics.batches - batches) > 1.5
    target_alone = _sample_pairs(client, prompt, n=1000, speculative=False)
    assert _chi_square_p(speculative, exact_pairs) > 1e-3
    assert _chi_square_p(target_alone, exact_pairs) > 1e-3


def test_chi_square_detects_a_wrong_rule(cluster, exact_pairs, monkeypatch) -> None:
    """Skipping the residual (resampling from p after a rejection) must be caught."""
    import specdec_core.sampling as sampling

    monkeypatch.setattr(sampling, "residual", lambda p, q: p)
    wrong = _sample_pairs(cluster[0], PROMPTS[SAMPLE_PROMPT_INDEX], n=1000, num_draft=2)
    assert _chi_square_p(wrong, exact_pairs) < 1e-4


# -- replicas ----------------------------------------------------------------------------------------


def test_two_by_two_replicas_with_concurrent_clients(loop, near_draft_dir, target_dir, reference) -> None:
    drafts = [start_worker_in(loop, "draft", near_draft_dir) for _ in range(2)]
    targets = [start_worker_in(loop, "target", target_dir) for _ in range(2)]
    orch = start_orchestrator_in(loop, [d.address for d in drafts], [t.address for t in targets])
    try:
        def run(i: int):
            with SpecdecClient(orch.address, timeout=60) as client:
                return [client.generate(PROMPTS[(i + j) % len(PROMPTS)], max_tokens=MAX_TOKENS, num_draft=3)
                        for j in range(3)]

        with ThreadPoolExecutor(8) as pool:
            results = [r for batch in pool.map(run, range(8)) for r in batch]
        for i, batch_start in enumerate(range(0, len(results), 3)):
            for j, response in enumerate(results[batch_start : batch_start + 3]):
                assert list(response.token_ids) == reference(PROMPTS[(i + j) % len(PROMPTS)])
        assert {r.stats.draft_replica for r in results} == {d.address for d in drafts}
        assert {r.stats.target_replica for r in results} == {t.address for t in targets}
        for worker in (*drafts, *targets):
            assert worker.host.snapshot()["live_sessions"] == 0
    finally:
        orch.stop()
        for worker in (*drafts, *targets):
            worker.stop()


def test_incompatible_draft_is_refused(loop, tmp_path, tokenizer_dir, target_dir) -> None:
    other = build_t5(tmp_path / "other", tokenizer_dir, "v1_1", seed=5, vocab_size=600)
    draft = start_worker_in(loop, "draft", other)
    target = start_worker_in(loop, "target", target_dir)
    try:
        with pytest.raises(StartupError, match="vocab_size"):
            start_orchestrator_in(loop, [draft.address], [target.address], connect_timeout_s=5)
    finally:
        draft.stop()
        target.stop()
