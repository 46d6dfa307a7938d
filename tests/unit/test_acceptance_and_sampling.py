"""Acceptance rules and sampling, without MLX or servers: each against an independent
computation (exact enumeration, closed forms), so a wrong rule cannot pass."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.acceptance import StepOutcome, accept_greedy, accept_sampled
from specdec_core.sampling import (
    ACCEPT_STREAM,
    DRAFT_STREAM,
    TARGET_STREAM,
    draw_draft,
    draw_residual,
    normalised,
    position_uniforms,
    probabilities,
    residual,
    sample,
)
from specdec_core.steps import Distribution, SamplingParams
from specdec_grpc.wire import distribution_from_pb, distribution_to_pb

# -- acceptance -------------------------------------------------------------------------------------


def test_greedy_keeps_the_matching_prefix_then_takes_the_target_token() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 9, 4]) == StepOutcome(2, 9)
    assert accept_greedy([5, 6, 7], [5, 6, 7, 4]) == StepOutcome(3, 4)  # all kept: the bonus
    assert accept_greedy([], [8]) == StepOutcome(0, 8)  # target alone


def test_greedy_delta_keeps_a_mismatch_with_probability_delta() -> None:
    assert accept_greedy([5, 6], [9, 9, 3], uniforms=[0.2, 0.9], delta=0.5) == StepOutcome(1, 9)
    assert accept_greedy([5, 6], [9, 9, 3], uniforms=[0.2, 0.4], delta=0.5) == StepOutcome(2, 3)


def test_sampled_acceptance_follows_min_one_p_over_q() -> None:
    # ratios 0.5 and 2: the first is kept iff u < 0.5, the second always
    assert accept_sampled([3, 4], [0.4, 0.1], [0.2, 0.2], [7, 8, 9], [0.49, 0.99]) == StepOutcome(2, 9)
    assert accept_sampled([3, 4], [0.4, 0.1], [0.2, 0.2], [7, 8, 9], [0.51, 0.0]) == StepOutcome(0, 7)


@pytest.mark.parametrize("p, q", [(math.nan, 0.5), (0.5, math.nan), (math.inf, 0.5), (math.nan, math.nan)])
def test_a_non_finite_ratio_is_never_accepted(p: float, q: float) -> None:
    for u in (0.0, 0.5, 0.999):
        assert accept_sampled([3], [q], [p], [7, 8], [u]) == StepOutcome(0, 7)
        assert accept_sampled([3], [q], [p], [7, 8], [u], delta=1.0) == StepOutcome(0, 7)


# -- sampling transforms ----------------------------------------------------------------------------


def test_top_k_keeps_ties_at_the_kth_value() -> None:
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0]])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    # The 2nd largest value (2.0) is tied: both copies stay, nothing below them does.
    assert set(np.flatnonzero(probs)) == {0, 2, 3}
    expected = np.exp([3.0, 2.0, 2.0]) / np.exp([3.0, 2.0, 2.0]).sum()
    np.testing.assert_allclose(probs[[0, 2, 3]], expected, rtol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    base = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(base)[None]
    kept = lambda top_p: set(np.flatnonzero(probabilities(logits, SamplingParams(1.0, 0, top_p))[0]))  # noqa: E731
    assert kept(0.49) == {0}
    assert kept(0.51) == {0, 1}
    assert kept(0.79) == {0, 1}
    assert kept(0.94) == {0, 1, 2}
    assert kept(0.96) == {0, 1, 2, 3}
    assert kept(1e-9) == {0}  # the first token always stays
    assert kept(1.0) == {0, 1, 2, 3}


def test_temperature_scales_logits() -> None:
    logits = np.array([[1.0, 2.0, 4.0]])
    probs = probabilities(logits, SamplingParams(temperature=0.5))[0]
    expected = np.exp(logits[0] / 0.5) / np.exp(logits[0] / 0.5).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)


def test_residual_when_p_equals_q_falls_back_to_p() -> None:
    p = np.array([0.2, 0.3, 0.5], np.float32)
    np.testing.assert_array_equal(residual(p, p.copy()), p)


def test_residual_is_the_normalised_positive_part() -> None:
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(residual(p, q), [1.0, 0.0, 0.0])


def test_sample_is_inverse_cdf_and_never_picks_a_zero() -> None:
    probs = np.array([0.0, 0.25, 0.0, 0.75])
    assert sample(probs, 0.0) == 1
    assert sample(probs, 0.2499) == 1
    assert sample(probs, 0.25) == 3
    assert sample(probs, 0.999999999) == 3
    assert sample(np.array([0.5, 0.5, 0.0]), 1.0 - 1e-17) == 1


# -- exactness over the wire -------------------------------------------------------------------------


def implied_output(p: np.ndarray, q_draft: np.ndarray, token_prob: np.ndarray, residual_dist: np.ndarray
                   ) -> np.ndarray:
    """The distribution of one step's first emitted token, enumerated exactly: draft token d
    drawn from q_draft, kept with min(1, p(d)/q(d)) (q(d) as the orchestrator got it),
    otherwise the residual's draw."""
    keep = q_draft * np.minimum(1.0, p / np.where(token_prob > 0, token_prob, 1.0))
    return keep + (1.0 - keep.sum()) * residual_dist


def one_step_over_the_wire(p: np.ndarray, q: np.ndarray, round_first: bool = True) -> np.ndarray:
    """What draft, wire and target do at one position (``round_first=False``: the old code,
    which sampled from q before the wire rounded it to float16)."""
    vocab = len(p)
    if round_first:
        # The draft samples by inverse CDF over the wire weights (see the sample test above);
        # q(d) is what draw_draft reports when it draws d.
        _, _, wire = draw_draft(q.astype(np.float32), 0.0)
        q_draft = normalised(wire)
        token_prob = np.zeros(vocab)
        for d in np.flatnonzero(q_draft > 0):
            token, token_prob[d], _ = draw_draft(q.astype(np.float32), float(q_draft[:d].sum() + q_draft[d] / 2))
            assert token == d
        sent = Distribution.from_dense(wire)
    else:
        q_draft = q.astype(np.float32).astype(np.float64)
        token_prob = q_draft.copy()
        sent = Distribution.from_dense(q.astype(np.float32))
    received = distribution_from_pb(distribution_to_pb(sent)).to_dense(vocab)
    # The target's residual: enumerate its draws by the CDF of what draw_residual samples from.
    target_view = residual(p, normalised(received)) if round_first else residual(p, received)
    token_prob = token_prob.astype(np.float32).astype(np.float64)  # crosses the wire as float
    return implied_output(p, q_draft, token_prob, target_view.astype(np.float64))


CASES = {
    "issue example": (np.array([0.60005, 0.39995]), np.array([0.6, 0.4])),
    "peaked": (np.array([0.7, 0.2, 0.05, 0.05]), np.array([0.69990, 0.20010, 0.05, 0.05])),
    "random 512": tuple(np.random.default_rng(3).dirichlet(np.full(512, 0.3), size=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_emits_exactly_p_over_the_wire(case: str) -> None:
    p, q = CASES[case]
    p = p.astype(np.float32).astype(np.float64)
    assert np.abs(one_step_over_the_wire(p, q) - p).sum() < 1e-6


def test_the_old_rounding_order_is_detected() -> None:
    """Counter-test: sampling from float32 q while the target gets float16 q is caught."""
    p, q = CASES["issue example"]
    p = p.astype(np.float32).astype(np.float64)
    assert np.abs(one_step_over_the_wire(p, q, round_first=False) - p).sum() > 1e-5


def test_draft_and_target_normalise_the_wire_q_identically() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        probs = rng.dirichlet(np.full(1000, 0.05)).astype(np.float32)
        _, prob, wire = draw_draft(probs, 0.3)
        sent = Distribution.from_dense(wire)
        received = distribution_from_pb(distribution_to_pb(sent)).to_dense(1000)
        np.testing.assert_array_equal(normalised(received), normalised(wire))
        # and the residual draw uses exactly that q
        p = rng.dirichlet(np.ones(1000)).astype(np.float32)
        u = float(rng.random())
        assert draw_residual(p, received, u) == sample(residual(p, normalised(wire)), u)


# -- randomness keyed by position ---------------------------------------------------------------------


def test_position_uniforms_do_not_depend_on_how_positions_are_split() -> None:
    whole = position_uniforms(42, DRAFT_STREAM, 5, 12)
    parts = np.concatenate([position_uniforms(42, DRAFT_STREAM, 5, 3), position_uniforms(42, DRAFT_STREAM, 8, 9)])
    np.testing.assert_array_equal(whole, parts)


def test_position_uniforms_differ_by_seed_and_stream_and_look_uniform() -> None:
    a = position_uniforms(1, DRAFT_STREAM, 0, 4000)
    assert not np.array_equal(a, position_uniforms(2, DRAFT_STREAM, 0, 4000))
    assert not np.array_equal(a, position_uniforms(1, TARGET_STREAM, 0, 4000))
    assert ((a >= 0) & (a < 1)).all()
    from scipy import stats

    for stream in (DRAFT_STREAM, ACCEPT_STREAM, TARGET_STREAM):
        values = position_uniforms(7, stream, 0, 4000)
        assert stats.kstest(values, "uniform").pvalue > 1e-3
    # streams are uncorrelated with each other at the same positions
    assert abs(np.corrcoef(a, position_uniforms(1, ACCEPT_STREAM, 0, 4000))[0, 1]) < 0.08
    # and across seeds at one position (what many seeded requests see)
    first = np.array([position_uniforms(s, TARGET_STREAM, 3, 1)[0] for s in range(4000)])
    assert stats.kstest(first, "uniform").pvalue > 1e-3
