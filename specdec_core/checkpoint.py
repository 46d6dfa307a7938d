"""Checkpoint loading and saving: HF directories, hub names, converted MLX directories.

A directory is loadable when it holds ``config.json`` and one of ``model.safetensors``,
sharded safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (needs
torch). Converted directories (``specdec-convert``) use our parameter names, may be
quantized, and record that in ``config.json`` under ``"specdec"``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError
from .t5 import T5, ModelArgs, is_hf_layout

logger = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
QUANT_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64
# Files a service needs from a hub repository: weights, config and tokenizer, nothing else.
HUB_PATTERNS = ["*.json", "*.safetensors", "spiece.model", "*.txt"]
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclass
class LoadedModel:
    model: T5
    args: ModelArgs
    path: Path  # the local directory it came from (tokenizer files live here)
    model_id: str  # what the user asked for: a hub name or a directory
    dtype: str
    quantization: dict[str, int] | None

    @cached_property
    def num_parameters(self) -> int:  # Info reports it on every call; the model never changes
        return sum(v.size for _, v in tree_flatten(self.model.parameters()))


def resolve_model_path(name_or_dir: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a hub repository id, downloaded with a progress bar."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_dir)
    if path.exists():
        raise CheckpointError(f"{text} is a file; --model takes a checkpoint directory or a hub name")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        raise CheckpointError(f"checkpoint directory {text} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise CheckpointError("huggingface_hub is needed to download hub models") from exc
    logger.info("downloading %s from the Hugging Face hub", text)
    try:
        local = snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS)
    except Exception as exc:
        raise CheckpointError(
            f"{text} is not a local directory and could not be downloaded from the hub: {exc}"
        ) from exc
    local_path = Path(local)
    if not any(local_path.glob("*.safetensors")):
        # Older repositories (t5-11b among them) may carry only pytorch_model.bin.
        local_path = Path(
            snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS + ["pytorch_model*.bin"])
        )
    return local_path


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a T5 checkpoint directory?")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc


def safetensors_files(path: Path) -> list[Path]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` names; [] if neither."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    return []


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint directory, by their stored names."""
    torch_bin = path / "pytorch_model.bin"
    try:
        files = safetensors_files(path)
        if files:
            weights: dict[str, mx.array] = {}
            for file in files:
                weights.update(mx.load(str(file)))
            return weights
        if torch_bin.is_file() or any(path.glob("pytorch_model-*.bin")):
            return _read_torch_bins(path)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read the weights in {path}: {exc}") from exc
    raise CheckpointError(
        f"{path} has no weights: expected model.safetensors, model.safetensors.index.json "
        "with its shards, or pytorch_model.bin"
    )


def _read_torch_bins(path: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError as exc:
        raise CheckpointError(
            f"{path} holds only pytorch_model.bin; install torch to read it, or convert it "
            "elsewhere with specdec-convert"
        ) from exc
    weights: dict[str, mx.array] = {}
    for file in sorted(path.glob("pytorch_model*.bin")):
        state = torch.load(file, map_location="cpu", weights_only=True)
        for name, tensor in state.items():
            weights[name] = mx.array(tensor.float().numpy())
    return weights


def _quantize_predicate(group_size: int):
    def predicate(_path: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    return predicate


def load_model(
    name_or_dir: str | os.PathLike[str],
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> LoadedModel:
    """Load a T5 checkpoint into MLX.

    ``dtype`` None keeps the stored dtype (float16 is promoted to float32: T5 overflows in it).
    ``quantize_bits`` 4 or 8 quantizes the linear layers after loading.
    """
    check_dtype(dtype)
    if quantize_bits is not None and quantize_bits not in QUANT_BITS:
        raise CheckpointError(f"quantization must be 4 or 8 bits, not {quantize_bits}")
    path = resolve_model_path(name_or_dir)
    config = read_config(path)
    stored_quant = (config.get("specdec") or {}).get("quantization")
    args = ModelArgs.from_dict(config)
    raw = read_weights(path)
    weights = T5.sanitize(raw) if is_hf_layout(raw.keys()) else raw
    drop_tied_head(weights)
    args.untied_lm_head = "lm_head.weight" in weights
    model = T5(args)

    if stored_quant:
        nn.quantize(
            model,
            group_size=stored_quant["group_size"],
            bits=stored_quant["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    _check_weights(model, weights, path)
    chosen = choose_dtype(weights, dtype)
    weights = {k: cast_floating(v, chosen) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    quantization = stored_quant
    if quantize_bits is not None and stored_quant is None:
        nn.quantize(model, group_size=group_size, bits=quantize_bits,
                    class_predicate=_quantize_predicate(group_size))
        quantization = {"bits": quantize_bits, "group_size": group_size}
    elif quantize_bits is not None and stored_quant["bits"] != quantize_bits:
        raise CheckpointError(
            f"{path} is already quantized to {stored_quant['bits']} bits; convert from the "
            "original checkpoint to change that"
        )
    model.eval()
    mx.eval(model.parameters())
    return LoadedModel(model, args, path, str(name_or_dir), chosen, quantization)


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")


def drop_tied_head(weights: dict[str, mx.array]) -> None:
    """Remove ``lm_head.weight`` when it is a copy of ``shared.weight``."""
    head, shared = weights.get("lm_head.weight"), weights.get("shared.weight")
    if head is not None and shared is not None and head.shape == shared.shape and mx.array_equal(head, shared).item():
        del weights["lm_head.weight"]  # a tied v1.0 head saved as a copy (pytorch_model.bin)


def choose_dtype(weights: dict[str, mx.array], requested: str | None) -> str:
    """The requested dtype, else the stored one of ``shared.weight`` (float16 becomes float32)."""
    shared = weights.get("shared.weight")
    stored = "float32" if shared is None else str(shared.dtype).removeprefix("mlx.core.")
    chosen = requested or ("float32" if stored == "float16" else stored)
    if chosen == "float16":
        logger.warning("T5 overflows in float16 (inf/NaN activations); prefer bfloat16 or float32")
    return chosen


def cast_floating(value: mx.array, dtype: str) -> mx.array:
    """A floating tensor cast to ``dtype``; an integer one (quantized weights) as it is."""
    return value.astype(DTYPES[dtype]) if mx.issubdtype(value.dtype, mx.floating) else value


def _check_weights(model: T5, weights: dict[str, mx.array], path: Path) -> None:
    check_shapes(
        {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())},
        {k: tuple(v.shape) for k, v in weights.items()},
        path,
    )


def check_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path
) -> None:
    """Raise a CheckpointError naming the missing, unexpected and misshapen tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: checkpoint {found[k]} vs config {shape}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(
            f"the weights in {path} do not match its config.json: " + "; ".join(problems)
        )


def save_model(loaded: LoadedModel, out_dir: str | os.PathLike[str]) -> Path:
    """Write an MLX checkpoint directory: model.safetensors (our names), config.json, tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = read_config(loaded.path)
    config["specdec"] = {
        "format": "mlx",
        "source": loaded.model_id,
        "dtype": loaded.dtype,
        "quantization": loaded.quantization,
    }
    # Our own keys are the source of truth for the architecture when we load it back.
    config["scale_decoder_outputs"] = loaded.args.scale_decoder_outputs
    weights = dict(tree_flatten(loaded.model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = 0
    for name in TOKENIZER_FILES:
        source = loaded.path / name
        if source.is_file():
            (out / name).write_bytes(source.read_bytes())
            copied += 1
    if not copied:
        logger.warning("%s has no tokenizer files; %s will need one to serve text", loaded.path, out)
    return out
