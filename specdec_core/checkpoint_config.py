"""A checkpoint's ``config.json``, checked: the type and range of every field the model reads, so a
bad value fails at load with one line naming the file and the field, never deeper down (a
zero-head attention, a 10^12-row embedding, an end-of-sequence id outside the vocabulary).
Needs no MLX: the defaults of absent fields come from the caller (``ModelArgs``'s own).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint_files import is_int, json_kind, show
from .errors import CheckpointError

MAX_VOCAB = 2**24  # 16.7M ids, 500x T5's 32,128: what a config may claim (the weights must then match)
MAX_WIDTH = 2**20  # d_model, d_kv, d_ff, num_heads x d_kv: T5-11B's widest is d_ff 65,536
MAX_LAYERS = 1024  # T5-11B has 24 per stack
MAX_BUCKETS = 2**16  # relative-position buckets (T5: 32)
MAX_DISTANCE = 2**31 - 1  # positions are int32 in MLX
FEED_FORWARD_PROJ = ("relu", "gelu", "gelu_new", "gated-relu", "gated-gelu", "gated-gelu_new")
QUANTIZATION = {"bits": (4, 8), "group_size": (32, 64, 128)}  # what specdec-convert writes


def check_config(config: object, file: Path, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as it is, if every field the model reads is valid; ``defaults`` stand in for
    absent ones where ranges depend on each other (an id must lie inside the vocabulary)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"a JSON {json_kind(config)}, not an object", file=file)

    def fail(field: str, problem: str) -> CheckpointError:
        return CheckpointError(problem, file=file, field=field)

    model_type = config.get("model_type")
    if model_type not in ("t5", None) or (model_type is None and "d_kv" not in config):
        raise fail("model_type", f"describes a {model_type or 'non-T5'} model; specdec serves T5 "
                   "(t5-*, google/t5-v1_1-*, google/flan-t5-*) checkpoints only")

    def integer(field: str, low: int, high: int) -> int:
        value = config.get(field, defaults.get(field))
        if not is_int(value) or not low <= value <= high:
            raise fail(field, f"{show(value)}; expected an integer in [{low:,}, {high:,}]")
        return value

    vocab = integer("vocab_size", 1, MAX_VOCAB)
    heads, d_kv = integer("num_heads", 1, MAX_WIDTH), integer("d_kv", 1, MAX_WIDTH)
    integer("d_model", 1, MAX_WIDTH)
    integer("d_ff", 1, MAX_WIDTH)
    if heads * d_kv > MAX_WIDTH:
        raise fail("num_heads", f"{heads} x d_kv {d_kv} = {heads * d_kv:,} attention columns; at most {MAX_WIDTH:,}")
    integer("num_layers", 1, MAX_LAYERS)
    if config.get("num_decoder_layers") is not None:  # null: as many as the encoder
        integer("num_decoder_layers", 1, MAX_LAYERS)
    # The bucketing divides by log(max_distance / max_exact): max_exact = buckets // 4 (encoder,
    # bidirectional) or buckets // 2 (decoder) must be at least 1 and below max_distance.
    buckets = integer("relative_attention_num_buckets", 4, MAX_BUCKETS)
    integer("relative_attention_max_distance", buckets // 2 + 1, MAX_DISTANCE)

    epsilon = config.get("layer_norm_epsilon", defaults.get("layer_norm_epsilon"))
    if type(epsilon) not in (int, float) or not 0 < epsilon < 1:  # (NaN compares false)
        raise fail("layer_norm_epsilon", f"{show(epsilon)}; expected a number in (0, 1)")
    ffn = config.get("feed_forward_proj", defaults.get("feed_forward_proj"))
    if ffn not in FEED_FORWARD_PROJ:
        raise fail("feed_forward_proj", f"{show(ffn)}; expected one of {', '.join(FEED_FORWARD_PROJ)}")
    for field in ("tie_word_embeddings", "scale_decoder_outputs", "untied_lm_head"):
        if field in config and not isinstance(config[field], bool):
            raise fail(field, f"{show(config[field])}; expected true or false")

    for field in ("decoder_start_token_id", "pad_token_id"):
        value = config.get(field)
        _token_id(fail, field, defaults.get(field) if value is None else value, vocab)  # null: the default
    eos = config.get("eos_token_id", defaults.get("eos_token_id"))
    if isinstance(eos, list):
        if not eos:
            raise fail("eos_token_id", "an empty list; expected a token id or a non-empty list of them")
        for i, value in enumerate(eos):
            _token_id(fail, f"eos_token_id[{i}]", value, vocab)
    else:
        _token_id(fail, "eos_token_id", eos, vocab)
    _check_specdec_section(config.get("specdec"), fail)
    return config


def _token_id(fail: Any, field: str, value: object, vocab: int) -> None:
    if not is_int(value) or not 0 <= value < vocab:  # type: ignore[operator]
        raise fail(field, f"{show(value)}; expected a token id in [0, {vocab:,}) (vocab_size {vocab:,})")


def _check_specdec_section(section: object, fail: Any) -> None:
    """What ``specdec-convert`` recorded: the loader reads the quantization back."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise fail("specdec", f"a JSON {json_kind(section)}; expected the object specdec-convert writes")
    quantization = section.get("quantization")
    if quantization is None:
        return
    if not isinstance(quantization, dict):
        raise fail("specdec.quantization", f"a JSON {json_kind(quantization)}; expected null or "
                   '{"bits": ..., "group_size": ...}')
    for key, allowed in QUANTIZATION.items():
        if quantization.get(key) not in allowed or not is_int(quantization.get(key)):
            raise fail(f"specdec.quantization.{key}",
                       f"{show(quantization.get(key))}; expected one of {', '.join(map(str, allowed))}")
