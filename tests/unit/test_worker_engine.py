"""Every engine declares what the worker reads of it (``WorkerEngine``): no default stands in for
an attribute an engine lacks. The n-gram engine here (no MLX); the model engines in
tests/test_engine_protocol.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from specdec_core.ngram import ModelConfig, NgramEngine
from specdec_core.worker_engine import WorkerEngine


def test_the_ngram_engine_is_a_worker_engine() -> None:
    args = SimpleNamespace(vocab_size=100, eos_token_id=1, decoder_start_token_id=0, pad_token_id=0)
    ngram = NgramEngine(ModelConfig(args, Path("."), "test"), max_draft=8)  # type: ignore[arg-type]
    assert isinstance(ngram, WorkerEngine)
    assert (ngram.method, ngram.kv_quantization, ngram.tensor_parallel) == ("ngram", None, 1)
    assert ngram.loaded.weight_bytes == 0 and ngram.vocab_size == 100
