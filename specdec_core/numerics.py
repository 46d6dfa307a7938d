"""The dtype a model computes in, per device, and the combinations that are slow there.

Weights stay in the dtype they were asked for (memory); activations follow the device. MLX's CPU
kernels are slow in 16-bit: at the T5 shape a bfloat16 matmul costs 2-6x a float32 one, and a
quantized matmul with bfloat16 activations 10x (docs/bench/cpu_numerics.md). The same matmul
with float32 activations over bfloat16 weights (MLX promotes the weights, then runs the float32
kernel) costs about as much as float32 weights. So on a CPU the activations are float32 whatever
the weights are; on Metal or CUDA, where 16-bit is the fast path, they are the weights' dtype.
No MLX here: callers pass the device (``specdec_core.device.compute_device``).
"""

from __future__ import annotations

CPU_ACTIVATIONS = "float32"


def activation_dtype(weights_dtype: str, device: str) -> str:
    """The dtype of a model's activations (and so of its K/V cache): float32 on a CPU, the
    weights' own dtype on a GPU."""
    return CPU_ACTIVATIONS if device == "cpu" else weights_dtype


def slow_combination(weights_dtype: str, quantize_bits: int | None, device: str) -> str | None:
    """A warning naming the faster choice when ``--dtype``/``--quantize`` is slow on ``device``;
    None when it is not. On a CPU, MLX's quantized matmul runs a step 2-4x slower than unquantized
    weights (and more for blocks of several positions): quantization there buys memory only."""
    if device != "cpu" or quantize_bits is None:
        return None
    return (f"{quantize_bits}-bit weights compute several times slower than unquantized ones on the CPU "
            "(MLX's CPU quantized matmul; docs/bench/cpu_numerics.md): where memory allows, serve "
            f"--dtype bfloat16 without --quantize (it computes in float32 at half float32's memory) "
            f"instead of --dtype {weights_dtype} --quantize {quantize_bits}")
