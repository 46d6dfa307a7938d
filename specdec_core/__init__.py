"""The MLX T5 core shared by the draft and target services: model, cache, checkpoints,
tokenizer, sampling and the session store. No gRPC and no CLI live here.

Importing the package has no side effects. ``errors`` and ``steps`` import neither MLX nor
anything heavy (the orchestrator uses them); a process that runs a model calls
``blas.preload()`` before it imports MLX (see ``blas``).
"""
