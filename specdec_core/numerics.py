"""The dtype a model computes in, per device, and the combinations that are slow there.

Weights stay in the dtype they were asked for (memory); activations follow the device. MLX's CPU
kernels are slow in 16-bit: at the T5 shape a bfloat16 matmul costs 2-6x a float32 one, and a
quantized matmul with bfloat16 activations 10x (docs/bench/cpu_numerics.md). With float32
activations MLX widens bfloat16 weights and runs the float32 kernel: a T5-large-shaped bfloat16
target then costs 1.7-1.9x a float32 one, not 2.3-4.5x, and bfloat16 + 8-bit 2.2x, not 14x. So on
a CPU the activations are float32 whatever the weights are; on Metal or CUDA, where 16-bit is the
fast path, they are the weights' dtype. No MLX here: callers pass the device
(``specdec_core.device.compute_device``).
"""

from __future__ import annotations

CPU_ACTIVATIONS = "float32"


def activation_dtype(weights_dtype: str, device: str) -> str:
    """The dtype of a model's activations (and so of its K/V cache): float32 on a CPU, the
    weights' own dtype on a GPU."""
    return CPU_ACTIVATIONS if device == "cpu" else weights_dtype


def slow_combination(weights_dtype: str, quantize_bits: int | None, device: str) -> str | None:
    """A warning naming the faster choice when ``--dtype``/``--quantize`` is slow on ``device``;
    None when it is not. On a CPU quantized weights cost about 2x float32's time a token and 4-5x a
    block of several positions: quantization there buys memory only."""
    if device != "cpu" or quantize_bits is None:
        return None
    return (f"--dtype {weights_dtype} --quantize {quantize_bits} computes about 2x slower a token and 4-5x a "
            "verified block than float32 on the CPU (MLX's CPU quantized matmul; docs/bench/cpu_numerics.md): "
            "where memory allows, leave out --quantize: --dtype float32 is the fastest, --dtype bfloat16 "
            "half its memory and still 2.5-3x faster a block than quantized")
