"""The safetensors header and index checks need no MLX (the fast tier runs them): what they accept
and the edges of what they refuse. The table of malformed checkpoints through specdec-convert is
tests/test_checkpoint_strict.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from specdec_core.checkpoint_files import INDEX_FILE, TensorEntry, read_header, read_index
from specdec_core.errors import CheckpointError


def _safetensors(file: Path, header: str, data: bytes) -> Path:
    text = header.encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return file


def test_entries_carry_positions_in_the_file(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "empty": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [8, 8]},
                         "b": {"dtype": "U8", "shape": [], "data_offsets": [8, 9]}})
    file = _safetensors(tmp_path / "x.safetensors", header, bytes(9))
    start = 8 + len(header)
    assert read_header(file) == {"a": TensorEntry("F32", (2,), start, start + 8),
                                 "empty": TensorEntry("BF16", (0, 3), start + 8, start + 8),
                                 "b": TensorEntry("U8", (), start + 8, start + 9)}


def test_a_duplicate_tensor_name_is_refused(tmp_path: Path) -> None:
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    file = _safetensors(tmp_path / "x.safetensors", f'{{"a": {entry}, "a": {entry}}}', bytes(1))
    with pytest.raises(CheckpointError, match=r"x.safetensors: header: not valid JSON: the key 'a' appears twice"):
        read_header(file)


def test_a_header_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    file = _safetensors(tmp_path / "x.safetensors", "[" * 100_000 + "]" * 100_000, b"")
    with pytest.raises(CheckpointError, match="header: not valid JSON: nested too deeply"):
        read_header(file)


def test_index_shards_may_be_symlinks_to_regular_files_anywhere(tmp_path: Path) -> None:
    checkpoint, blobs = tmp_path / "checkpoint", tmp_path / "blobs"
    checkpoint.mkdir()
    blobs.mkdir()
    (blobs / "0123").write_bytes(b"")
    (checkpoint / "model-00001-of-00001.safetensors").symlink_to(blobs / "0123")
    (checkpoint / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert read_index(checkpoint) == {"a": checkpoint / "model-00001-of-00001.safetensors"}
