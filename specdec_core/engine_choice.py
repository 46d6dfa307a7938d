"""Which engine a worker runs: the T5 model (``ModelEngine``), n-gram lookup with no weights
(``NgramEngine``) or both (``HybridEngine``), built from the worker's flags."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import blas
from .checkpoint import load_model, read_config, resolve_model_path
from .engine import ModelEngine
from .errors import CheckpointError
from .kv_cache import KVQuantization
from .worker_engine import WorkerEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    """What picks and builds the engine (a slice of the worker's config)."""

    role: str
    model: str  # checkpoint directory or hub name (the n-gram draft reads only its config and tokenizer)
    method: str = "model"  # "model", "ngram" or "hybrid" (drafts only)
    dtype: str | None = None
    quantize: int | None = None
    max_draft: int = 32
    ngram_min: int = 1
    ngram_max: int = 4
    hybrid_min_match: int = 3
    kv_bits: int | None = None  # the K/V cache's bits (None: the model's dtype)


def build_engine(config: EngineChoice) -> tuple[WorkerEngine, Path]:
    """The engine for the configured method, and the directory its tokenizer files are in."""
    if config.method == "ngram" and config.kv_bits is not None:
        raise CheckpointError("--kv-bits quantizes a model's K/V cache; the ngram draft has none: leave it out")
    if config.method == "ngram":  # no model: the config and tokenizer of --model for Info, no weights
        from .ngram import ModelConfig, NgramEngine
        from .t5 import ModelArgs

        path = resolve_model_path(config.model)
        config_only = ModelConfig(ModelArgs.from_dict(read_config(path)), path, config.model)
        logger.info("%s drafts by n-gram lookup (matches of %d..%d tokens); config and tokenizer from %s, "
                    "no model loaded", config.role, config.ngram_min, config.ngram_max, config.model)
        return NgramEngine(config_only, config.max_draft, config.ngram_min, config.ngram_max), path
    if config.method not in ("model", "hybrid"):
        raise CheckpointError(f"unknown draft method {config.method!r}: model, ngram or hybrid")
    loaded = load_model(config.model, dtype=config.dtype, quantize_bits=config.quantize)
    if config.method == "hybrid":
        from .hybrid import HybridEngine

        engine: ModelEngine = HybridEngine(loaded, config.max_draft, config.hybrid_min_match,
                                           config.ngram_max, config.kv_bits)
        logger.info("%s drafts with n-gram matches of %d..%d tokens, the model elsewhere", config.role,
                    config.hybrid_min_match, config.ngram_max)
    else:
        engine = ModelEngine(loaded, max_draft=config.max_draft, kv_bits=config.kv_bits)
    logger.info(
        "%s loaded %s (%s weights, %.1fM parameters, quantization %s, K/V cache %s); BLAS: %s",
        config.role, config.model, loaded.dtype, loaded.num_parameters / 1e6,
        loaded.quantization or "none", cache_storage(loaded.activation_dtype, engine.kv_quantization),
        blas.active_blas,
    )
    return engine, loaded.path


def cache_storage(activation_dtype: str, kv: KVQuantization | None) -> str:
    """How the sessions' K/V cache is stored, in words: in the dtype the model computes in (float32 on
    a CPU whatever the weights, ``numerics``), or as ``--kv-bits`` quantizes it."""
    return activation_dtype if kv is None else f"{kv.bits}-bit in groups of {kv.group_size}"
