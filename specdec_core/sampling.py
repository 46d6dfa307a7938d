"""Turning logits into the distributions both acceptance and sampling use.

Temperature, top-k and top-p are applied by this one function to the target's p and the
draft's q alike, as exact speculative sampling requires. Sampling is inverse-CDF with a
uniform keyed by (request seed, stream, decoder position), so a seeded request draws the same
numbers at the same output position however its steps are cut (k, batching, failover).

The draft's q travels as float16. So that draft, acceptance and the target's residual all use
one q, the draft rounds q to float16 *before* sampling (``wire_q``) and every side normalises
those float16 weights the same way (``normalised``): their float64 sum is exact, hence the
same on both sides whatever the order or sparsity of the support.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgument
from .steps import SamplingParams


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """(n, V) logits -> (n, V) float32 probabilities after temperature, top-k and top-p."""
    if params.greedy:
        raise InvalidArgument("greedy decoding has no sampling distribution")
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs.astype(np.float32)


def sample(probs: np.ndarray, uniform: float) -> int:
    """Inverse-CDF draw from one (V,) distribution with a uniform in [0, 1)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    index = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    index = min(index, len(probs) - 1)
    while probs[index] <= 0 and index > 0:  # rounding at the top end: step back to support
        index -= 1
    return index


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): where to resample after rejecting a draft token. Falls back to p
    when p <= q everywhere (then rejection had probability ~0 and only rounding got here)."""
    r = np.maximum(p.astype(np.float64) - q.astype(np.float64), 0.0)
    total = r.sum()
    if total <= 1e-12:
        return p
    return (r / total).astype(np.float32)


def wire_q(probs: np.ndarray) -> np.ndarray:
    """The draft's q as it crosses the wire: float16 weights, the q everyone uses."""
    return probs.astype(np.float16)


def normalised(weights: np.ndarray) -> np.ndarray:
    """float16 weights -> float64 probabilities. Every float16 is a multiple of 2^-24, so the
    float64 sum of up to 2^29 of them (each <= 1) is exact: both sides get identical values."""
    w = weights.astype(np.float64)
    return w / w.sum()


def token_probability(token_ids: np.ndarray, weights: np.ndarray, token: int) -> float:
    """q(token) from a wire q (float16 ``weights``, dense when ``token_ids`` is empty), normalised
    exactly as the target normalises it for the residual (so acceptance uses the same q)."""
    q = normalised(weights)
    if len(token_ids) == 0:
        return float(q[token]) if 0 <= token < len(q) else 0.0
    found = np.flatnonzero(token_ids == token)
    return float(q[found[-1]]) if len(found) else 0.0  # (the last, as ``Distribution.to_dense`` keeps it)


def draw_draft(probs: np.ndarray, uniform: float) -> tuple[int, float, np.ndarray]:
    """The draft's choice at one position: (token, q(token), the wire q it was drawn from)."""
    q = wire_q(probs)
    token = sample(q, uniform)
    return token, float(normalised(q)[token]), q


def draw_residual(p: np.ndarray, wire_weights: np.ndarray, uniform: float) -> int:
    """The target's draw after rejecting a draft token: from norm(max(0, p - q)), with q the
    draft's wire weights normalised exactly as the draft normalised them."""
    return sample(residual(p, normalised(wire_weights)), uniform)


# Streams of position-keyed randomness: each use gets its own, so draws are independent.
DRAFT_STREAM = 1  # the draft's sample at a position
ACCEPT_STREAM = 2  # the orchestrator's accept/reject uniform for the draft token at a position
TARGET_STREAM = 3  # the target's residual or bonus draw at a position

_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64 that scatters nearby inputs."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def position_uniforms(seed: int, stream: int, first_position: int, n: int) -> np.ndarray:
    """n uniforms in [0, 1) for decoder positions first_position.. of one stream.

    The value at (seed, stream, position) never depends on how the generation was cut into
    steps, so a seeded request's tokens do not depend on k, timing, batching or failover.
    Reusing a position's draw after a rejection is safe: only the draws at committed positions
    were ever observed, and those positions are never drawn again.
    """
    if first_position < 0 or first_position + n >= 1 << 32:
        raise InvalidArgument(f"decoder positions must be in [0, 2^32), got {first_position}..+{n}")
    positions = np.arange(first_position, first_position + n, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        keys = _mix64((np.uint64(stream) << np.uint64(32)) | positions)
        bits = _mix64(keys ^ np.uint64(seed & _MASK64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
