"""The MLX T5 core shared by the draft and target services: model, cache, checkpoints,
tokenizer, sampling and the session store. No gRPC and no CLI live here.

Importing this package first loads OpenBLAS on Linux (see ``blas``) before MLX is imported.
"""

from . import blas

blas.preload()
