"""Checkpoint tensors read and written one at a time, so no step holds a whole model.

``SafetensorsFiles`` is the one safetensors reader (checkpoint loading, conversion and the
tensor-parallel loader all read through it): one file or the shards of an index, every header
and shard name checked first (``checkpoint_files``). ``TorchBins`` reads ``pytorch_model*.bin``
(torch's memory-mapped loading); ``ShardWriter`` writes safetensors shards with a
``model.safetensors.index.json``, as the hub lays them out. A broken file raises a one-line
``CheckpointError`` naming the file and the field.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from .checkpoint_files import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorEntry,
    check_regular,
    open_regular,
    read_header,
    safetensors_layout,
)
from .errors import CheckpointError

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1000**3  # a few shards for T5-3B/11B; each written from memory at once

# safetensors dtype -> numpy dtype to read its bytes as (bfloat16 as uint16, viewed in MLX).
_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class TensorSource(Protocol):
    """Tensors by stored name, read on demand."""

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...  # as safetensors names it (F32, BF16, U32, ...), as read
    def nbytes(self, name: str) -> int: ...
    def read(self, name: str) -> mx.array: ...  # an evaluated array that owns its memory
    def release(self, name: str) -> None: ...  # the tensor will not be read again


# -- safetensors ---------------------------------------------------------------------------------


class SafetensorsFiles:
    """Tensors of one or more safetensors files, each read with plain ``read`` calls: only the
    tensor being read is in memory (no mapping of the file stays resident). ``read_slice`` reads
    part of a tensor (a tensor-parallel rank's), mapping only that tensor's bytes.

    Every header is checked when the files are opened (``checkpoint_files.read_header``), so
    reads trust offsets, dtypes and shapes."""

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None) -> None:
        self._where: dict[str, tuple[Path, TensorEntry]] = {}
        for file in files:
            for name, entry in read_header(file, INDEX_FILE if weight_map else None).items():
                if name in self._where:
                    raise CheckpointError(f"also in {self._where[name][0]}; a tensor lives in one shard only",
                                          file=file, field=name)
                self._where[name] = (file, entry)
        for name, shard in (weight_map or {}).items():
            if name not in self._where or self._where[name][0] != shard:
                raise CheckpointError(
                    f"puts {name} in {shard}, but that file does not hold it; the shard is damaged or from "
                    "another checkpoint: download or copy it again", file=shard.parent / INDEX_FILE, field="weight_map"
                )

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][1].shape

    def dtype(self, name: str) -> str:
        return self._where[name][1].dtype

    def nbytes(self, name: str) -> int:
        return self._where[name][1].nbytes

    def read(self, name: str) -> mx.array:
        file, entry = self._where[name]
        buffer = np.empty(entry.nbytes, dtype=np.uint8)
        with open_regular(file) as f:
            f.seek(entry.begin)
            if f.readinto(memoryview(buffer)) != entry.nbytes:
                raise CheckpointError(f"ended while reading {name}: the file was truncated after it was opened",
                                      file=file)
        return _as_mlx(buffer.view(_NUMPY_DTYPES[entry.dtype]).reshape(entry.shape), entry.dtype)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> mx.array:
        """``read(name)[index]``, reading from disk only the pages the slice touches."""
        file, entry = self._where[name]
        if entry.nbytes == 0:
            return self.read(name)[index]  # nothing to map
        with open_regular(file) as f:
            mapped = np.memmap(f, dtype=_NUMPY_DTYPES[entry.dtype], mode="r", offset=entry.begin, shape=entry.shape)
            part = np.ascontiguousarray(mapped[index])
        del mapped
        return _as_mlx(part, entry.dtype)

    def release(self, name: str) -> None:
        pass  # nothing is kept between reads


def _as_mlx(array: np.ndarray, dtype: str) -> mx.array:
    """A tensor's elements in MLX (bfloat16 travels as uint16: numpy has no bfloat16)."""
    result = mx.array(array)
    return result.view(mx.bfloat16) if dtype == "BF16" else result


def open_safetensors(path: Path) -> SafetensorsFiles | None:
    """The safetensors weights of checkpoint directory ``path`` (one file, or the shards of its
    index), headers and index checked; None if it has none."""
    files, weight_map = safetensors_layout(path)
    return SafetensorsFiles(files, weight_map) if files else None


# -- pytorch_model.bin ----------------------------------------------------------------------------


class TorchBins:
    """Tensors of ``pytorch_model*.bin`` files, memory-mapped by torch. Floating tensors come
    back as float32 (as the checkpoint loader always read them). After a tensor is read its
    pages are dropped from this process (``release``), so the mapping never becomes resident
    as a whole."""

    def __init__(self, files: list[Path]) -> None:
        try:
            import torch
        except ImportError as exc:
            raise CheckpointError(
                f"{files[0].parent} holds only pytorch_model.bin; install torch to read it, or convert "
                "it elsewhere with specdec-convert"
            ) from exc
        self._torch = torch
        self._tensors: dict[str, Any] = {}
        self._mapped: set[str] = set()  # names whose bytes are in a file mapping (not a copy)
        for file in files:
            state, mapped = self._load(file)
            for name, tensor in state.items():
                if name in self._tensors:
                    raise CheckpointError("also in another pytorch_model*.bin; a tensor lives in one file only",
                                          file=file, field=name)
                self._tensors[name] = tensor
                if mapped:
                    self._mapped.add(name)

    def _load(self, file: Path) -> tuple[dict[str, Any], bool]:
        """``file``'s state dict, and whether its tensors are memory-mapped."""
        torch = self._torch
        check_regular(file)  # torch.load would block on a FIFO
        mapped = True
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                logger.warning("%s is in torch's legacy (pre-1.6) format, which cannot be memory-mapped: "
                               "it is read whole into memory", file)
                state = torch.load(file, map_location="cpu", weights_only=True)
                mapped = False
        except Exception as exc:  # torch raises anything from pickle errors to zip errors
            raise CheckpointError(f"cannot be read by torch.load: {exc}", file=file) from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError("is not a state dict (tensors by name)", file=file)
        return state, mapped

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> str:
        tensor = self._tensors[name]
        if tensor.is_floating_point():
            return "F32"  # read as float32
        return _TORCH_DTYPES.get(str(tensor.dtype).removeprefix("torch."), str(tensor.dtype))

    def nbytes(self, name: str) -> int:
        tensor = self._tensors[name]
        return tensor.numel() * tensor.element_size()

    def read(self, name: str) -> mx.array:
        tensor = self._tensors[name]
        value = tensor.float() if tensor.is_floating_point() else tensor
        return mx.array(value.numpy())  # copies: the result owns its memory

    def release(self, name: str) -> None:
        # Only pages of the file mapping may be dropped: anonymous ones would read back as zeros.
        if name in self._mapped:
            _drop_pages(self._tensors[name].data_ptr(), self.nbytes(name))
        del self._tensors[name]


# torch's integer dtypes by safetensors' names for them.
_TORCH_DTYPES = {"int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}

_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def _drop_pages(address: int, size: int) -> None:
    """Forget the whole pages of a read-only file mapping in [address, address + size): their
    bytes are still on disk, and a later touch would read them again."""
    if _libc is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + size) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def torch_bin_files(path: Path) -> list[Path]:
    return sorted(path.glob("pytorch_model*.bin"))


# -- writing ----------------------------------------------------------------------------------------


class ShardWriter:
    """Writes named tensors to safetensors shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own). One shard is in memory at a time. ``finish`` names them
    ``model-0000i-of-0000N.safetensors`` with an index, or ``model.safetensors`` if one."""

    def __init__(self, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None) -> None:
        self.out = out
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {}
        self._pending: dict[str, mx.array] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0  # tensor bytes written
        self.total_elements = 0

    def add(self, name: str, value: mx.array) -> None:
        if self._pending and self._pending_bytes + value.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = value
        self._pending_bytes += value.nbytes
        self.total_bytes += value.nbytes
        self.total_elements += value.size

    def _flush(self) -> None:
        file = self.out / f".partial-{len(self._written) + 1:05d}.safetensors"  # MLX insists on the suffix
        mx.save_safetensors(str(file), self._pending, metadata=self.metadata)
        self._written.append((file, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0
        mx.clear_cache()  # give the shard's buffers back rather than keep them for reuse

    def finish(self) -> list[Path]:
        """Flush the last shard, give the shards their final names; the files written."""
        if self._pending or not self._written:
            self._flush()
        for stale in [self.out / SINGLE_FILE, self.out / INDEX_FILE, *self.out.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)  # a previous conversion into the same directory
        if len(self._written) == 1:
            final = self.out / SINGLE_FILE
            self._written[0][0].rename(final)
            return [final]
        count = len(self._written)
        files, weight_map = [], {}
        for i, (partial, names) in enumerate(self._written, start=1):
            final = self.out / f"model-{i:05d}-of-{count:05d}.safetensors"
            partial.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files


def move_into(staging: Path, out: Path) -> list[Path]:
    """Move every file of ``staging`` (a finished conversion) into ``out`` and remove ``staging``;
    the weight files of an earlier conversion in ``out`` go first, so one file and shards never
    mix. The moved files' new paths."""
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    moved = []
    for file in sorted(staging.iterdir()):
        moved.append(out / file.name)
        os.replace(file, moved[-1])
    staging.rmdir()
    return moved


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``1.5GiB`` or a number of bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 2GB, 500MB or 1073741824")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def total_bytes(source: TensorSource, names: Iterable[str]) -> int:
    return sum(source.nbytes(name) for name in names)
