"""The files of a checkpoint directory, checked before anything trusts them: safetensors headers,
the shard index, JSON files. Needs neither MLX nor numpy.

A safetensors file is an 8-byte little-endian header length, that many bytes of JSON, then the
tensors' bytes. The header is an object: an optional ``__metadata__`` map of strings to strings,
and per tensor exactly ``dtype``, ``shape`` and ``data_offsets`` ([begin, end), relative to the
data). ``read_header`` checks all of it against the file (offsets inside the data, bytes that
match dtype and shape, no two tensors sharing a byte), so a reader may seek and read blindly.

Only regular files are opened (a FIFO or a device would block or never end). Shard names in
``model.safetensors.index.json`` stay inside the checkpoint directory; a symlink there may point
anywhere (the hub cache links into its blob store) but must resolve to a regular file.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the format's cap (safetensors' MAX_HEADER_SIZE)
MAX_JSON_BYTES = 100_000_000  # config.json and the index: kilobytes in practice
# The dtypes specdec reads, and their bytes per element.
ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checked header; ``begin`` and ``end`` are byte positions in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def check_regular(file: Path, named_by: str | None = None) -> None:
    """Raise unless ``file`` (or what its symlinks resolve to) is a regular file."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        raise CheckpointError("does not exist" + (f" ({named_by} names it)" if named_by else ""),
                              file=file) from None
    except OSError as exc:
        raise CheckpointError(f"cannot be read: {exc.strerror}", file=file) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"is a {_file_kind(mode)}, not a regular file", file=file)


def open_regular(file: Path, named_by: str | None = None) -> BinaryIO:
    """``file`` opened for reading, if it is a regular file (checked again on the open file, so a
    file swapped in between cannot block the reader)."""
    check_regular(file, named_by)
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"cannot be read: {exc.strerror}", file=file) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"is a {_file_kind(mode)}, not a regular file", file=file)
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((kind for test, kind in kinds if test(mode)), "special file")


def read_json(file: Path, named_by: str | None = None) -> Any:
    """The JSON value in ``file`` (a regular file of at most MAX_JSON_BYTES)."""
    with open_regular(file, named_by) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{size:,} bytes; a checkpoint's JSON files are at most {MAX_JSON_BYTES:,}",
                                  file=file)
        return parse_json(f.read(), file)


def parse_json(raw: bytes, file: Path, field: str | None = None) -> Any:
    """JSON text as a value; a duplicate key is an error (which of the two would count?)."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=file, field=field) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"not valid JSON: {exc}", file=file, field=field) from None
    except RecursionError:
        raise CheckpointError("not valid JSON: nested too deeply", file=file, field=field) from None
    except ValueError as exc:  # a duplicate key, or an integer of too many digits
        raise CheckpointError(f"not valid JSON: {exc}", file=file, field=field) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


def show(value: object, limit: int = 60) -> str:
    """A value from a file, for a message: as JSON writes it, cut short (a header may be 100 MB)."""
    return clip(json.dumps(value), limit)


def clip(text: str, limit: int = 200) -> str:
    """A name from a file, for a message, cut short."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: object) -> bool:
    """A JSON integer (true and false are not numbers, 64.0 is not an integer)."""
    return type(value) is int


# -- safetensors headers ----------------------------------------------------------------------------


def read_header(file: Path, named_by: str | None = None) -> dict[str, TensorEntry]:
    """The tensors of safetensors ``file``, every entry checked against the format and the file."""
    with open_regular(file, named_by) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"a file of {size} bytes cannot hold a safetensors header (8 bytes of length "
                                  "first): truncated or not a safetensors file", file=file, field="header")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"claims {length:,} bytes; the safetensors format allows at most "
                                  f"{MAX_HEADER_BYTES:,}: not a safetensors file", file=file, field="header length")
        if length > size - 8:
            raise CheckpointError(f"claims {length:,} bytes of a file of {size:,}: truncated or not a "
                                  "safetensors file", file=file, field="header length")
        header = parse_json(f.read(length), file, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"a JSON {json_kind(header)}, not an object", file=file, field="header")
    _check_metadata(header.pop("__metadata__", None), file)
    data_start, data_size = 8 + length, size - 8 - length
    tensors = {name: _entry(name, value, data_start, data_size, file) for name, value in header.items()}
    _check_contiguous(tensors, data_start, size, file)
    return tensors


def _check_metadata(metadata: object, file: Path) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise CheckpointError(f"a JSON {json_kind(metadata)}; the format wants an object of strings",
                              file=file, field="__metadata__")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(f"a JSON {json_kind(value)}; metadata values are strings", file=file,
                                  field=f"__metadata__.{clip(key)}")


def _entry(name: str, entry: object, data_start: int, data_size: int, file: Path) -> TensorEntry:
    def fail(field: str, problem: str) -> CheckpointError:
        return CheckpointError(problem, file=file, field=clip(name) + field)

    if not isinstance(entry, dict):
        raise fail("", f"a JSON {json_kind(entry)}; a tensor is an object of dtype, shape and data_offsets")
    if set(entry) != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - set(entry)), sorted(set(entry) - _ENTRY_KEYS)
        raise fail("", "a tensor has exactly dtype, shape and data_offsets; "
                   + "; ".join([*(f"{k} is missing" for k in missing), *(f"{k} is not one" for k in extra)]))
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise fail(".dtype", f"{show(dtype)} is not a dtype specdec reads ({', '.join(ITEM_BYTES)})")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise fail(".shape", f"{show(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise fail(".data_offsets", f"{show(offsets)} is not a pair of integers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise fail(".data_offsets", f"[{begin}, {end}] is not a byte range: 0 <= begin <= end")
    if end > data_size:
        raise fail(".data_offsets", f"ends at byte {data_start + end:,} of a file of {data_start + data_size:,} "
                   "bytes: the file is truncated; download or copy it again")
    expected = math.prod(shape) * ITEM_BYTES[dtype]
    if end - begin != expected:
        raise fail("", f"{dtype} {show(shape)} is {expected:,} bytes, but data_offsets [{begin}, {end}] hold "
                   f"{end - begin:,}")
    return TensorEntry(dtype, tuple(shape), data_start + begin, data_start + end)


def _check_contiguous(tensors: dict[str, TensorEntry], data_start: int, file_size: int, file: Path) -> None:
    """The format indexes the whole data buffer: tensors neither overlap nor leave bytes that no
    tensor owns (a hole could carry a second file inside the checkpoint). Overlaps are named first:
    a tensor moved onto another's bytes also leaves a hole where it was."""
    ordered = sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    for (before, a), (after, b) in zip(ordered, ordered[1:], strict=False):
        if b.begin < a.end:
            raise CheckpointError(f"overlap the bytes of {clip(before)}: every tensor has bytes of its own",
                                  file=file, field=f"{clip(after)}.data_offsets")
    position = data_start
    for name, entry in ordered:
        if entry.begin > position:
            raise CheckpointError(f"start {entry.begin - position:,} bytes after the previous tensor's end: the "
                                  "format leaves no bytes that no tensor owns", file=file,
                                  field=f"{clip(name)}.data_offsets")
        position = entry.end
    if position != file_size:
        raise CheckpointError(f"{file_size - position:,} bytes after the last tensor belong to none: the format "
                              "leaves no bytes that no tensor owns", file=file, field="data")


# -- the shard index -------------------------------------------------------------------------------


def read_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from ``directory``'s ``model.safetensors.index.json``; every
    shard name confined to ``directory`` and resolving to a regular file."""
    index = directory / INDEX_FILE
    content = read_json(index)
    if not isinstance(content, dict):
        raise CheckpointError(f"a JSON {json_kind(content)}, not an object", file=index)
    weight_map = content.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        what = "missing" if weight_map is None else f"a JSON {json_kind(weight_map)}"
        raise CheckpointError(f"{what}; it maps each tensor name to its shard file", file=index, field="weight_map")
    shards: dict[str, Path] = {}  # shard name -> its checked path
    result: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"a JSON {json_kind(shard)}; shard names are strings", file=index,
                                  field=f"weight_map[{show(tensor, 200)}]")
        if shard not in shards:
            shards[shard] = _shard_path(directory, tensor, shard, index)
        result[tensor] = shards[shard]
    return result


def _shard_path(directory: Path, tensor: str, shard: str, index: Path) -> Path:
    name = PurePosixPath(shard)
    if not shard or "\0" in shard or name.is_absolute() or ".." in name.parts:
        raise CheckpointError(f"{show(shard)} is not a file name inside the checkpoint directory", file=index,
                              field=f"weight_map[{show(tensor, 200)}]")
    path = directory / name
    check_regular(path, INDEX_FILE)
    return path


def safetensors_layout(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """``model.safetensors``, or the shards of the index with its map (tensor -> shard); ([], None)
    if the directory has neither."""
    single = directory / SINGLE_FILE
    if os.path.lexists(single):
        check_regular(single)
        return [single], None
    if os.path.lexists(directory / INDEX_FILE):
        weight_map = read_index(directory)
        return sorted(set(weight_map.values())), weight_map
    return [], None
