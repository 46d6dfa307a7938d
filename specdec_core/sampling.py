"""Turning logits into the distributions both acceptance and sampling use.

Temperature, top-k and top-p are applied by this one function to the target's p and the
draft's q alike, as exact speculative sampling requires. Sampling is inverse-CDF with a
uniform drawn from the caller's seed, so a seeded request is reproducible anywhere.
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


def uniforms(seed: int, n: int) -> np.ndarray:
    """n uniforms in [0, 1) from a seed: the only source of randomness in draft and target."""
    return np.random.default_rng(seed).random(n)
