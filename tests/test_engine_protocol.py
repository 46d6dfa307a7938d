"""The model engines declare what the worker reads of them (``WorkerEngine``), as the n-gram one
does (tests/unit/test_worker_engine.py)."""

from __future__ import annotations

from pathlib import Path

from specdec_core.checkpoint import load_model
from specdec_core.engine import ModelEngine
from specdec_core.hybrid import HybridEngine
from specdec_core.worker_engine import WorkerEngine


def test_the_model_and_hybrid_engines_are_worker_engines(target_dir: Path) -> None:
    loaded = load_model(str(target_dir))
    model, hybrid = ModelEngine(loaded, max_draft=8, kv_bits=8), HybridEngine(loaded, max_draft=8)
    for engine, method in ((model, "model"), (hybrid, "hybrid")):
        assert isinstance(engine, WorkerEngine)
        assert (engine.method, engine.tensor_parallel) == (method, 1)
        assert engine.loaded.weight_bytes > 0
    assert model.kv_quantization is not None and model.kv_quantization.bits == 8
    assert hybrid.kv_quantization is None
