"""Every engine declares what the worker reads of it (``WorkerEngine``): no default stands in for
an attribute an engine lacks. The n-gram engine here (no MLX); the model engines in
tests/test_engine_protocol.py."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest

from specdec_core.ngram import ModelConfig, NgramEngine
from specdec_core.request_checks import RequestChecks
from specdec_core.worker_engine import WorkerEngine


def test_the_ngram_engine_is_a_worker_engine() -> None:
    args = SimpleNamespace(vocab_size=100, eos_token_id=1, decoder_start_token_id=0, pad_token_id=0)
    ngram = NgramEngine(ModelConfig(args, Path("."), "test"), max_draft=8)  # type: ignore[arg-type]
    assert isinstance(ngram, WorkerEngine)
    assert (ngram.method, ngram.kv_quantization, ngram.tensor_parallel) == ("ngram", None, 1)
    assert ngram.loaded.weight_bytes == 0 and ngram.vocab_size == 100


@pytest.mark.parametrize("engine", [RequestChecks, NgramEngine])
def test_each_method_an_engine_defines_takes_what_the_protocol_declares(engine: type) -> None:
    """The protocol's parameters (names and annotations) are what the implementations take, and
    so what ``SessionHost`` may pass. (RequestChecks: the checks of the model, hybrid and
    tensor-parallel engines.)"""
    declared = {name: inspect.signature(member) for name, member in vars(WorkerEngine).items()
                if inspect.isfunction(member) and not name.startswith("_")}
    compared = 0
    for name, signature in declared.items():
        if name in vars(engine):
            mine = inspect.signature(vars(engine)[name])
            assert [(p.name, p.annotation) for p in mine.parameters.values()] == \
                   [(p.name, p.annotation) for p in signature.parameters.values()], (engine.__name__, name)
            compared += 1
    assert compared >= 3
