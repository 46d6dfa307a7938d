"""The n-gram index and engine of model-free drafting (specdec_core.ngram), without MLX.

References: a brute-force scan that states the rule directly (longest match of the output's
last n tokens, most recent earlier occurrence within one segment, the tokens that followed
it), and the exact speculative-sampling output distribution for a point-mass q.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec_core.errors import InvalidArgument
from specdec_core.ngram import MAX_NGRAM, ModelConfig, NgramEngine, NgramIndex, point_mass
from specdec_core.sampling import normalised, residual
from specdec_core.steps import SamplingParams

EOS = 1


def brute_force(prompt: list[int], output: list[int], k: int, low: int, high: int) -> list[int]:
    """The rule, by scanning every position (no index)."""
    seq = prompt + output
    segments = [(0, len(prompt)), (len(prompt), len(seq))]
    for n in range(min(high, len(output)), low - 1, -1):
        suffix = seq[len(seq) - n :]
        best = None
        for start, stop in segments:
            for end in range(start + n - 1, stop):
                if seq[end - n + 1 : end + 1] == suffix and end != len(seq) - 1 and end != len(prompt) - 1:
                    best = end if best is None else max(best, end)
        if best is None:
            continue
        if best < len(prompt):
            return seq[best + 1 : min(best + 1 + k, len(prompt))]
        tokens: list[int] = []
        for j in range(k):
            i = best + 1 + j
            tokens.append(seq[i] if i < len(seq) else tokens[i - len(seq)])
        return tokens
    return []


def test_longest_match_wins_over_a_more_recent_shorter_one() -> None:
    #         0  1  2  3  4   5  6  7  8
    prompt = [5, 6, 7, 8, 9, 40, 7, 8, 3, EOS]
    index = NgramIndex(prompt, 1, 4)
    index.extend([6, 7, 8])  # [7, 8] occurs twice; [6, 7, 8] only at 1..3
    assert index.propose(2) == [9, 40]
    match = index.lookup(2)
    assert match is not None and (match.size, match.end) == (3, 3)


def test_most_recent_occurrence_wins() -> None:
    prompt = [5, 6, 7, 5, 6, 8, EOS]
    index = NgramIndex(prompt, 1, 4)
    index.extend([5, 6])
    assert index.propose(3) == [8, EOS]  # the later [5, 6] of the prompt; the continuation stops at its end
    index.extend([9, 5, 6])  # now [5, 6] occurred in the output too: more recent than the prompt
    assert index.propose(2) == [9, 5]


def test_nothing_matches_gives_nothing() -> None:
    index = NgramIndex([5, 6, 7, EOS], 1, 3)
    assert index.propose(4) == []  # no output yet: nothing to match
    index.extend([50])
    assert index.propose(4) == [] and index.lookup(4) is None
    index = NgramIndex([5, 6, 7, EOS], 2, 3)
    index.extend([6])  # a unigram match exists, but the shortest n-gram used is 2
    assert index.propose(4) == []
    index.extend([7])
    assert index.propose(4) == [EOS]


def test_limits_k_prompt_end_and_longest_size() -> None:
    prompt = [5, 6, 7, 8, 9, EOS]
    index = NgramIndex(prompt, 1, 2)
    index.extend([5])
    assert index.propose(1) == [6] and index.propose(3) == [6, 7, 8]
    assert index.propose(50) == [6, 7, 8, 9, EOS]  # never past the prompt's end into the output
    assert index.propose(0) == [] and index.lookup(0) is None
    # ngram_max bounds the match considered: with 2, [30, 5, 6] and [31, 5, 6] tie on [5, 6]
    # and the most recent wins, although the older one matches 3 tokens.
    index = NgramIndex([30, 5, 6, 70, 31, 5, 6, 71, EOS], 1, 2)
    index.extend([30, 5, 6])
    assert index.propose(1) == [71]
    index = NgramIndex([30, 5, 6, 70, 31, 5, 6, 71, EOS], 1, 3)
    index.extend([30, 5, 6])
    assert index.propose(1) == [70]
    # Nothing follows the prompt's last token: a match there is skipped for an older one.
    index = NgramIndex([4, 9, 4], 1, 1)
    index.extend([4])
    assert index.propose(2) == [9, 4]


def test_a_repeating_output_is_continued_as_an_overlapping_copy() -> None:
    index = NgramIndex([5, EOS], 1, 4)
    index.extend([3, 4, 3, 4])
    assert index.propose(5) == [3, 4, 3, 4, 3]
    index.extend([7])
    assert index.propose(3) == []


@pytest.mark.parametrize("sizes", [(0, 2), (3, 2), (1, MAX_NGRAM + 1)])
def test_bad_ngram_sizes_are_refused(sizes: tuple[int, int]) -> None:
    with pytest.raises(InvalidArgument, match="ngram"):
        NgramIndex([5, EOS], *sizes)


def test_truncate_checks_its_length() -> None:
    index = NgramIndex([5, EOS], 1, 2)
    index.extend([3, 4])
    with pytest.raises(InvalidArgument):
        index.truncate(3)
    index.truncate(0)
    assert index.output == [] and index.positions == 2


tokens = st.lists(st.integers(3, 8), max_size=24)  # a small alphabet: many repeats


@settings(max_examples=300, deadline=None)
@given(prompt=tokens, steps=st.lists(st.tuples(tokens, st.integers(0, 30)), min_size=1, max_size=6),
       k=st.integers(1, 9), low=st.integers(1, 3), extra=st.integers(0, 3))
def test_matches_the_brute_force_rule_through_appends_and_rollbacks(prompt, steps, k, low, extra) -> None:
    """Any history of appends and rollbacks (``sync``) proposes what the rule says for the
    output it ends with, and what a fresh index of that output proposes."""
    high = low + extra
    prompt = prompt + [EOS]
    index = NgramIndex(prompt, low, high)
    output: list[int] = []
    for appended, keep in steps:
        output = output[: min(keep, len(output))] + appended
        index.sync(output)
        assert index.output == output
        assert index.propose(k) == brute_force(prompt, output, k, low, high)
        fresh = NgramIndex(prompt, low, high)
        fresh.extend(output)
        assert fresh.positions == index.positions and fresh.lookup(k) == index.lookup(k)  # no stale state


# -- the engine ---------------------------------------------------------------------------------


def engine(max_draft: int = 8, low: int = 1, high: int = 4) -> NgramEngine:
    args = SimpleNamespace(vocab_size=100, eos_token_id=EOS, decoder_start_token_id=0, pad_token_id=0)
    return NgramEngine(ModelConfig(args, Path("."), "test"), max_draft, low, high)


def test_engine_proposes_point_masses_and_stops_after_eos() -> None:
    eng = engine()
    state = eng.start([5, 6, 7, 8, EOS])
    state.tokens.extend([5, 6])  # what SessionHost appends
    greedy = eng.propose(state, 8, SamplingParams(), seed=0)
    assert greedy.tokens == [7, 8, EOS] and greedy.token_probs == [1.0] * 3 and not greedy.distributions
    assert state.tokens == [0, 5, 6, 7, 8, EOS]
    state.rollback_to(3)
    sampled = eng.propose(state, 2, SamplingParams(temperature=0.7, top_k=3), seed=5)
    assert sampled.tokens == [7, 8] and sampled.token_probs == [1.0, 1.0]
    for token, q in zip(sampled.tokens, sampled.distributions, strict=True):
        dense = q.to_dense(100)
        assert q.probs.dtype == np.float16 and dense[token] == 1.0 and dense.sum() == 1.0
        assert normalised(q.probs)[0] == 1.0
    assert eng.forward_passes == 0


def test_engine_empty_proposal_and_checks() -> None:
    eng = engine(max_draft=4)
    state = eng.start([5, 6, EOS])
    assert eng.propose(state, 4, SamplingParams(), 0).tokens == []  # nothing generated yet
    state.tokens.append(60)
    proposal = eng.propose(state, 4, SamplingParams(temperature=1.0), 0)
    assert (proposal.tokens, proposal.token_probs, list(proposal.distributions)) == ([], [], [])
    assert state.tokens == [0, 60]
    # The checks the engine declares (SessionHost runs them before a request changes a session).
    with pytest.raises(InvalidArgument, match="num_draft"):
        eng.check_k(5)
    with pytest.raises(InvalidArgument, match="vocabulary"):
        eng.check_prompt([5, 100])
    with pytest.raises(InvalidArgument, match="empty"):
        eng.check_prompt([])
    with pytest.raises(InvalidArgument, match="drafts only"):
        eng.check_verify(state.length, 0, SamplingParams(), [])


@pytest.mark.parametrize("seed", range(5))
def test_a_point_mass_q_keeps_speculative_sampling_exact(seed: int) -> None:
    """Accept d with probability min(1, p(d)/1) = p(d), else draw from norm(max(0, p - onehot(d))):
    the token emitted is distributed exactly as p (the target's own), for any d."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(50, 0.3)).astype(np.float32)
    for d in (int(np.argmax(p)), int(np.argmin(p)), 7):
        q = normalised(point_mass(d).to_dense(50).astype(np.float16))
        accept = min(1.0, p[d] / q[d])
        emitted = accept * np.eye(50)[d] + (1 - accept) * residual(p, q)
        np.testing.assert_allclose(emitted, p, rtol=1e-5, atol=1e-7)


def test_the_ngram_module_needs_no_mlx() -> None:
    probe = ("import sys, specdec_core.ngram; "
             "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("ngram_max", [4, 16])
def test_the_index_costs_a_few_bytes_per_position(ngram_max: int) -> None:
    """README: an n-gram session costs a few bytes per token. The index itself holds its ids in
    one int32 array (4 bytes a position, up to 2x spare room): measured by what building it
    allocates, with ids that rarely repeat (the worst case for a table of n-grams)."""
    import random
    import tracemalloc

    rng = random.Random(0)
    prompt = [rng.randrange(300, 32000) for _ in range(3000)]
    output = [rng.randrange(300, 32000) for _ in range(3000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = NgramIndex(prompt, 1, ngram_max)
        index.extend(output)
        per_position = (tracemalloc.get_traced_memory()[0] - before) / index.positions
    finally:
        tracemalloc.stop()
    assert per_position <= 16, f"{per_position:.0f} bytes per position"
