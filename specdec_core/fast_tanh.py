"""tanh for gelu_new on the CPU: MLX's CPU tanh is scalar, so big arrays (a batched pass, a
prompt's encoding) use a rational approximation to float32 rounding instead."""

from __future__ import annotations

import mlx.core as mx

# tanh(u) ~ u P(u^2) / Q(u^2) on [-9, 9] (and +-1 beyond, where tanh is within 3e-8 of it):
# a rational fit made for this file (iterated weighted least squares against float64 tanh);
# evaluated in float32 it is within 3.4e-7 of tanh, float32 tanh's own rounding being 6e-8.
_TANH_P = (9.99999991e-01, 1.33963001e-01, 3.51362236e-03, 2.09016637e-05, 1.37523710e-08)
_TANH_Q = (1.0, 4.67296238e-01, 2.59458664e-02, 3.31494606e-04, 7.94095581e-07)
# From this many elements on, on the CPU, the rational form is the faster one: MLX's CPU tanh
# is scalar (~17 ns per element here), the form's 20 multiply/add/divide ops are vectorised
# but cost ~4 us each however small the array (measured: 64 x 1024 elements 1.33 -> 0.44 ms,
# 8 x 1024 0.19 -> 0.17 ms, 1 x 1024 0.12 -> 0.15 ms).
RATIONAL_TANH_MIN_ELEMENTS = 8192


def tanh(u: mx.array) -> mx.array:
    """tanh for gelu_new: MLX's own, except for big arrays on the CPU (a batched pass or a
    prompt's encoding), where a rational approximation to float32 rounding is 3x faster. On a
    GPU tanh is one fast kernel, so it is used there whatever the size."""
    if u.size < RATIONAL_TANH_MIN_ELEMENTS or mx.default_device() != mx.cpu:
        return mx.tanh(u)
    dtype = u.dtype
    u = mx.clip(u.astype(mx.float32), -9.0, 9.0)  # in bfloat16 the sums would round at every step
    z = u * u
    p = _TANH_P[-1]
    for c in _TANH_P[-2::-1]:
        p = p * z + c
    q = _TANH_Q[-1] * z + _TANH_Q[-2]
    for c in _TANH_Q[-3::-1]:
        q = q * z + c
    return (u * p / q).astype(dtype)
