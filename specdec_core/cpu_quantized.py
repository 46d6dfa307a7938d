"""Quantized linear layers for a CPU, where MLX's quantized matmul costs grow with the rows.

On the CPU a quantized matmul of 6 rows costs about 6x one row (11x a float32 matmul of the same
weights), while a float32 matmul of 6 or 16 rows costs about what one row does: a Verify block of
k + 1 positions, or a batch of sessions, would pay per row. From ``DEQUANTIZE_FROM_ROWS`` rows
the layer dequantizes its weights for the pass instead (a transient float32 copy of this one
matrix) and runs the float32 matmul; below it, the quantized matmul is the cheaper of the two.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

DEQUANTIZE_FROM_ROWS = 3  # measured at the T5 shape: 2.7 ms one row quantized, ~6 ms dequantized at any rows


class CpuQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < DEQUANTIZE_FROM_ROWS:
            return super().__call__(x)
        # scales and biases in the activations' dtype first: bfloat16 ones would round the weights
        biases = self.get("biases")
        weight = mx.dequantize(self["weight"], self["scales"].astype(x.dtype),
                               None if biases is None else biases.astype(x.dtype), self.group_size, self.bits,
                               mode=self.mode)
        out = x @ weight.T
        out = out + self["bias"] if "bias" in self else out
        # Evaluated now, so this matrix's float32 copy is freed before the next layer's is made: left
        # lazy, a pass kept several alive (the 11B-shaped encoder: 2.3 GiB over its weights at once).
        mx.eval(out)
        return out


def use_cpu_kernels(model: nn.Module) -> int:
    """Make every quantized linear layer of ``model`` a ``CpuQuantizedLinear`` (same parameters);
    the number changed."""
    changed = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = CpuQuantizedLinear
            changed += 1
    return changed
