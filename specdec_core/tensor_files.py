"""Checkpoint tensors read and written one at a time, so no step holds a whole model.

``open_tensors`` reads safetensors (one file or the shards of an index) and
``pytorch_model*.bin`` (torch's memory-mapped loading); ``ShardWriter`` writes safetensors
shards with a ``model.safetensors.index.json``, as the hub lays them out. Broken files
(truncated, a tensor missing from the shard its index names) raise a ``CheckpointError`` that
names the file.
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

from .errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
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
    def nbytes(self, name: str) -> int: ...
    def read(self, name: str) -> mx.array: ...  # an evaluated array that owns its memory
    def release(self, name: str) -> None: ...  # the tensor will not be read again


# -- safetensors ---------------------------------------------------------------------------------


class SafetensorsFiles:
    """Tensors of one or more safetensors files, each read with plain ``read`` calls: only the
    tensor being read is in memory (no mapping of the file stays resident)."""

    def __init__(self, files: list[Path], index: dict[str, str] | None = None) -> None:
        self._where: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for file in files:
            for name, (dtype, shape, begin, end) in _read_header(file).items():
                self._where[name] = (file, dtype, shape, begin, end)
        for name, shard in (index or {}).items():
            if name not in self._where or self._where[name][0].name != shard:
                raise CheckpointError(
                    f"{INDEX_FILE} puts {name} in {files[0].parent / shard}, but that file does not hold it; "
                    "the shard is damaged or from another checkpoint: download or copy it again"
                )

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def nbytes(self, name: str) -> int:
        _, _, _, begin, end = self._where[name]
        return end - begin

    def read(self, name: str) -> mx.array:
        file, dtype, shape, begin, end = self._where[name]
        buffer = np.empty(end - begin, dtype=np.uint8)
        with open(file, "rb", buffering=0) as f:
            f.seek(begin)
            if f.readinto(memoryview(buffer)) != end - begin:
                raise CheckpointError(f"{file} ended while reading {name}: the file is truncated")
        array = mx.array(buffer.view(_NUMPY_DTYPES[dtype]).reshape(shape))
        return array.view(mx.bfloat16) if dtype == "BF16" else array

    def release(self, name: str) -> None:
        pass  # nothing is kept between reads


def _read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) in ``file``, checked against its size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                raise CheckpointError(f"{file} is truncated or not a safetensors file "
                                      f"(header of {length:,} bytes, file of {size:,})")
            header = json.loads(f.read(length))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing (named by {INDEX_FILE})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not a safetensors file: its header is not JSON ({exc})") from exc
    header.pop("__metadata__", None)
    data_start, data_size = 8 + length, size - 8 - length
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{file} is truncated: {name} ends at byte {data_start + end:,} of a file of {size:,} bytes; "
                "download or copy it again"
            )
        if entry["dtype"] not in _NUMPY_DTYPES:
            raise CheckpointError(f"{file}: {name} has dtype {entry['dtype']}, which specdec cannot read")
        tensors[name] = (entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end)
    return tensors


def safetensors_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` names with its
    weight map; ([], None) if neither."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        return [single], None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {exc}") from exc
        return [path / shard for shard in sorted(set(weight_map.values()))], weight_map
    return [], None


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
            mapped = True
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise CheckpointError(f"cannot read {file}: {exc}") from exc
                logger.warning("%s is in torch's legacy (pre-1.6) format, which cannot be memory-mapped: "
                               "it is read whole into memory", file)
                state = torch.load(file, map_location="cpu", weights_only=True)
                mapped = False
            except Exception as exc:
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
            for name, tensor in state.items():
                self._tensors[name] = tensor
                if mapped:
                    self._mapped.add(name)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

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

    def abort(self) -> None:
        """Remove the shards written so far (a conversion that failed part-way)."""
        for partial, _ in self._written:
            partial.unlink(missing_ok=True)
        self._written, self._pending = [], {}

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
