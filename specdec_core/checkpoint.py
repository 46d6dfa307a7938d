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
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from . import numerics, tensor_files
from .checkpoint_config import check_config
from .checkpoint_files import read_json
from .cpu_quantized import use_cpu_kernels
from .device import compute_device
from .errors import CheckpointError
from .model_names import missing_model
from .t5 import T5, ModelArgs, is_hf_layout

logger = logging.getLogger(__name__)
_CONFIG_DEFAULTS = {f.name: f.default for f in fields(ModelArgs)}  # what an absent config field means

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
QUANT_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64
LOAD_PROGRESS_DELAY_S = 3.0  # a load's progress bar appears only when it takes longer
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
    load_seconds: float = 0.0  # reading, casting and quantizing the weights

    @cached_property
    def num_parameters(self) -> int:  # Info reports it on every call; the model never changes
        return sum(v.size for _, v in tree_flatten(self.model.parameters()))

    @property
    def activation_dtype(self) -> str:
        """What it computes in, and so its K/V cache's dtype: float32 on a CPU (``numerics``)."""
        chosen = self.model.activation_dtype
        return self.dtype if chosen is None else str(chosen).removeprefix("mlx.core.")

    @cached_property
    def weight_bytes(self) -> int:  # the default cache budget counts them as in use
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))


def resolve_model_path(name_or_dir: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a hub repository id, downloaded with a progress bar."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    problem = missing_model(name_or_dir)  # a file, or a local-looking path that is not there
    if problem is not None:
        raise CheckpointError(problem)
    text = str(name_or_dir)
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
    """``config.json`` of checkpoint directory ``path``, every field the model reads checked."""
    config_file = path / "config.json"
    if not os.path.lexists(config_file):
        raise CheckpointError(f"{path} has no config.json; is it a T5 checkpoint directory?")
    return check_config(read_json(config_file), config_file, _CONFIG_DEFAULTS)


def open_tensors(path: Path) -> tensor_files.TensorSource:
    """The weights of a checkpoint directory, to be read tensor by tensor."""
    try:
        safetensors = tensor_files.open_safetensors(path)
        if safetensors is not None:
            return safetensors
        bins = tensor_files.torch_bin_files(path)
        if bins:
            return tensor_files.TorchBins(bins)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read the weights in {path}: {exc}") from exc
    raise CheckpointError(
        f"{path} has no weights: expected model.safetensors, model.safetensors.index.json "
        "with its shards, or pytorch_model.bin"
    )


def _quantize_predicate(group_size: int):
    def predicate(_path: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    return predicate


class CheckpointStream:
    """A checkpoint opened for reading one tensor at a time, as it will be served.

    Opening reads the headers, the embedding and the head (tied or not, and the stored dtype),
    and checks every stored shape against the config. ``tensors`` then yields each parameter
    under our name, cast to ``dtype`` and, with ``quantize_bits``, quantized (weight, scales,
    biases) exactly as ``nn.quantize`` would, each evaluated before the next is read, so memory
    holds what was yielded plus about one source tensor.
    """

    def __init__(
        self,
        name_or_dir: str | os.PathLike[str],
        dtype: str | None = None,
        quantize_bits: int | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        check_dtype(dtype)
        if quantize_bits is not None and quantize_bits not in QUANT_BITS:
            raise CheckpointError(f"quantization must be 4 or 8 bits, not {quantize_bits}")
        self.model_id = str(name_or_dir)
        self.path = resolve_model_path(name_or_dir)
        self.config = read_config(self.path)
        stored_quant = (self.config.get("specdec") or {}).get("quantization")
        if quantize_bits is not None and stored_quant and stored_quant["bits"] != quantize_bits:
            raise CheckpointError(
                f"{self.path} is already quantized to {stored_quant['bits']} bits; convert from the "
                "original checkpoint to change that"
            )
        self.args = ModelArgs.from_dict(self.config)
        self.source = open_tensors(self.path)
        self._stored = our_names(self.source.names())  # ours -> stored name

        # The embedding and head first: whether the head is tied, and the stored dtype.
        self._first = {n: self.source.read(self._stored[n]) for n in ("shared.weight", "lm_head.weight")
                       if n in self._stored}
        drop_tied_head(self._first)
        self.args.untied_lm_head = "lm_head.weight" in self._first
        if not self.args.untied_lm_head and "lm_head.weight" in self._stored:
            self.source.release(self._stored.pop("lm_head.weight"))
        self.dtype = choose_dtype(self._first, dtype)

        self._stored_quant = stored_quant
        self.quantization = stored_quant
        self._group_size, self._bits = group_size, quantize_bits
        self._quantize_now: set[str] = set()  # our names of the weights to quantize as read
        model = self._skeleton()
        check_shapes(
            {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())},
            {ours: self.source.shape(theirs) for ours, theirs in self._stored.items()},
            self.path,
        )
        check_dtypes(model, self._stored, self.source, self.path)
        if quantize_bits is not None and stored_quant is None:
            qualifies = _quantize_predicate(group_size)
            self._quantize_now = {f"{p}.weight" for p, m in model.named_modules() if qualifies(p, m)}
            self.quantization = {"bits": quantize_bits, "group_size": group_size}

    def _skeleton(self) -> T5:
        """A T5 of the checkpoint's shape (lazy: its random initial weights are never computed),
        quantized where the checkpoint is."""
        model = T5(self.args)
        if self._stored_quant:
            nn.quantize(model, group_size=self._stored_quant["group_size"], bits=self._stored_quant["bits"],
                        class_predicate=lambda p, m: f"{p}.scales" in self._stored)
        return model

    def new_model(self) -> T5:
        """The skeleton the yielded tensors load into (quantized layers where they are)."""
        model = self._skeleton()
        if self._quantize_now:
            nn.quantize(model, group_size=self._group_size, bits=self._bits,
                        class_predicate=_quantize_predicate(self._group_size))
        return model

    @property
    def source_bytes(self) -> int:
        return tensor_files.total_bytes(self.source, self._stored.values())

    def tensors(self, description: str, progress_delay: float = 0.0) -> Iterator[tuple[str, mx.array]]:
        """(our name, evaluated array) for every parameter, in the order they are stored; once.

        A progress bar (by source bytes) shows on a terminal once ``progress_delay`` seconds
        have passed. Each source tensor is released once its result is evaluated.
        """
        position = {name: i for i, name in enumerate(self.source.names())}
        order = sorted(self._stored, key=lambda ours: position[self._stored[ours]])
        with tqdm(total=self.source_bytes, desc=description, unit="B", unit_scale=True, disable=None,
                  delay=progress_delay, mininterval=1.0) as bar:
            for ours in order:
                theirs = self._stored[ours]
                value = self._first.pop(ours) if ours in self._first else self.source.read(theirs)
                results = self._prepare(ours, value)
                del value
                mx.eval([v for _, v in results])
                nbytes = self.source.nbytes(theirs)
                self.source.release(theirs)
                yield from results
                del results
                bar.update(nbytes)

    def _prepare(self, ours: str, value: mx.array) -> list[tuple[str, mx.array]]:
        value = cast_floating(value, self.dtype)
        if ours not in self._quantize_now:
            return [(ours, value)]
        weight, scales, biases = mx.quantize(value, self._group_size, self._bits)  # as QuantizedLinear does
        prefix = ours.removesuffix(".weight")
        return [(ours, weight), (f"{prefix}.scales", scales), (f"{prefix}.biases", biases)]


def our_names(stored: list[str]) -> dict[str, str]:
    """Our parameter name -> the stored tensor's name, by the mapping of ``T5.sanitize``."""
    if not is_hf_layout(stored):
        return {name: name for name in stored}
    # sanitize maps names and passes values through untouched, so mapping each name to itself
    # yields {ours: stored} without reading a single tensor.
    return T5.sanitize({name: name for name in stored})  # type: ignore[arg-type, return-value]


def load_model(
    name_or_dir: str | os.PathLike[str],
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> LoadedModel:
    """Load a T5 checkpoint into MLX, one tensor at a time.

    ``dtype`` None keeps the stored dtype (float16 is promoted to float32: T5 overflows in it).
    ``quantize_bits`` 4 or 8 quantizes the linear layers as they are read. Memory peaks at the
    loaded model plus about one source tensor, whatever the source's dtype.
    """
    started = time.perf_counter()
    stream = CheckpointStream(name_or_dir, dtype, quantize_bits, group_size)
    model = stream.new_model()
    weights = list(stream.tensors(f"loading {stream.path.name}", progress_delay=LOAD_PROGRESS_DELAY_S))
    model.load_weights(weights, strict=True)
    del weights
    model.eval()
    mx.eval(model.parameters())
    mx.clear_cache()  # the source tensors' freed buffers: not needed again
    choose_activations(model, stream.dtype, (stream.quantization or {}).get("bits"))
    loaded = LoadedModel(model, stream.args, stream.path, stream.model_id, stream.dtype, stream.quantization,
                         load_seconds=time.perf_counter() - started)
    logger.info("loaded %s in %.1f s: %.2f GB of weights (%s, quantization %s, computing in %s)", stream.model_id,
                loaded.load_seconds, weight_nbytes(model) / 1e9, loaded.dtype, loaded.quantization or "none",
                loaded.activation_dtype)
    return loaded


def choose_activations(model: T5, weights_dtype: str, quantize_bits: int | None) -> None:
    """Set the model's activation dtype for the device it computes on, and warn once (at load,
    so at a worker's start-up) where its weights' dtype or quantization is slow there."""
    device = compute_device()
    model.activation_dtype = DTYPES[numerics.activation_dtype(weights_dtype, device)]
    if device == "cpu":
        use_cpu_kernels(model)
    warning = numerics.slow_combination(weights_dtype, quantize_bits, device)
    if warning:
        logger.warning("%s", warning)


def weight_nbytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


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


def check_dtypes(model: T5, stored: dict[str, str], source: tensor_files.TensorSource, path: Path) -> None:
    """Raise a CheckpointError naming a stored tensor whose dtype cannot be the parameter it is
    loaded into: a floating parameter is stored as F32, F16 or BF16, a quantized weight as U32."""
    for ours, value in tree_flatten(model.parameters()):
        allowed = ("F32", "F16", "BF16") if mx.issubdtype(value.dtype, mx.floating) else ("U32",)
        if ours in stored and source.dtype(stored[ours]) not in allowed:
            raise CheckpointError(f"stored as {source.dtype(stored[ours])}; specdec reads it from "
                                  f"{', '.join(allowed)}", file=path, field=stored[ours])


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


@dataclass
class Conversion:
    """What ``convert_checkpoint`` wrote."""

    stream: CheckpointStream
    files: list[Path]
    tensor_bytes: int
    parameters: int  # elements stored (a quantized weight counts its 32-bit words)
    seconds: float


def convert_checkpoint(
    name_or_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    max_shard_bytes: int = tensor_files.DEFAULT_SHARD_BYTES,
) -> Conversion:
    """Stream a checkpoint into an MLX directory: tensors cast and quantized as they are read and
    written in shards of at most ``max_shard_bytes``, so memory holds one shard plus one tensor."""
    started = time.perf_counter()
    stream = CheckpointStream(name_or_dir, dtype, quantize_bits, group_size)
    out = Path(out_dir).expanduser()
    if out.resolve() == stream.path.resolve():
        raise CheckpointError(f"--out {out_dir} is the source directory; write the conversion somewhere else")
    # Everything is written to a directory inside ``out`` and moved in at the end, so a conversion
    # that fails leaves ``out`` as it found it (and no ``out`` at all where it made it).
    created = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".specdec-convert-", dir=out))
    except OSError as exc:
        raise CheckpointError(f"cannot write there: {exc.strerror}", file=out, field="--out") from None
    try:
        writer = tensor_files.ShardWriter(staging, max_shard_bytes, metadata={"format": "mlx"})
        for name, value in stream.tensors(f"converting {stream.path.name}"):
            writer.add(name, value)
        writer.finish()
        _write_config_and_tokenizer(stream.path, staging, stream.model_id, stream.dtype, stream.quantization,
                                    stream.args.scale_decoder_outputs)
        files = [f for f in tensor_files.move_into(staging, out) if f.suffix == ".safetensors"]
    except BaseException:
        shutil.rmtree(created or staging, ignore_errors=True)
        raise
    return Conversion(stream, files, writer.total_bytes, writer.total_elements, time.perf_counter() - started)


def save_model(loaded: LoadedModel, out_dir: str | os.PathLike[str],
               max_shard_bytes: int = tensor_files.DEFAULT_SHARD_BYTES) -> Path:
    """Write a model in memory as an MLX checkpoint directory: safetensors (our names, sharded
    when large), config.json, tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = tensor_files.ShardWriter(out, max_shard_bytes, metadata={"format": "mlx"})
    for name, value in tree_flatten(loaded.model.parameters()):
        writer.add(name, value)
    writer.finish()
    _write_config_and_tokenizer(loaded.path, out, loaded.model_id, loaded.dtype, loaded.quantization,
                                loaded.args.scale_decoder_outputs)
    return out


def _write_config_and_tokenizer(source: Path, out: Path, model_id: str, dtype: str,
                                quantization: dict[str, int] | None, scale_decoder_outputs: bool) -> None:
    config = read_config(source)
    config["specdec"] = {"format": "mlx", "source": model_id, "dtype": dtype, "quantization": quantization}
    # Our own keys are the source of truth for the architecture when we load it back.
    config["scale_decoder_outputs"] = scale_decoder_outputs
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = 0
    for name in TOKENIZER_FILES:
        file = source / name
        if file.is_file():
            (out / name).write_bytes(file.read_bytes())
            copied += 1
    if not copied:
        logger.warning("%s has no tokenizer files; %s will need one to serve text", source, out)
