"""The dtype a model computes in per device, and the start-up warning for slow combinations."""

from __future__ import annotations

from specdec_core.numerics import activation_dtype, slow_combination


def test_a_cpu_computes_in_float32_whatever_the_weights() -> None:
    assert [activation_dtype(d, "cpu") for d in ("float32", "bfloat16", "float16")] == ["float32"] * 3
    assert [activation_dtype(d, "gpu") for d in ("float32", "bfloat16")] == ["float32", "bfloat16"]


def test_only_quantized_weights_on_a_cpu_are_slow() -> None:
    assert slow_combination("bfloat16", None, "cpu") is None
    assert slow_combination("bfloat16", 8, "gpu") is None
    warning = slow_combination("bfloat16", 8, "cpu")
    assert warning is not None and "--dtype bfloat16 --quantize 8" in warning
    assert "leave out --quantize: --dtype float32 is the fastest" in warning
