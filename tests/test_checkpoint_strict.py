"""Malformed checkpoints: each is refused with one line naming the file and the field, through
specdec-convert's main() (no traceback, no --out left behind), through the tensor-parallel
loader (the same reader, the same line) and through a worker's start-up; a valid checkpoint, also
one whose shard is a symlink to a file elsewhere, still converts and loads.

Every malformed input is made here from the tiny v1.0 checkpoint: safetensors headers rewritten
byte by byte, config.json fields changed, the weights split into two shards with an index.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx  # conftest imported specdec_core (OpenBLAS) before this
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from specdec_core import checkpoint
from specdec_core.checkpoint import load_model
from specdec_core.errors import CheckpointError
from specdec_core.tensor_parallel import load_sharded
from specdec_tools.convert import main as convert

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
Q = "encoder.block.0.layer.0.SelfAttention.q.weight"  # float32 (64, 64): 16,384 bytes, as are K's
K = "encoder.block.0.layer.0.SelfAttention.k.weight"
FIRST = "decoder.block.0.layer.0.SelfAttention.k.weight"  # the tensor at data offset 0
SECOND = "decoder.block.0.layer.0.SelfAttention.o.weight"  # the one after it
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


# -- making malformed files ---------------------------------------------------------------------


def _read(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write(file: Path, header: dict | list, data: bytes, pad_to: int = 0) -> None:
    text = json.dumps(header).encode()
    text += b" " * max(0, pad_to - len(text))  # the format allows trailing spaces
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _header(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A case that rewrites model.safetensors' header with ``change`` (the data stays)."""

    def mutate(directory: Path) -> None:
        header, data = _read(directory / WEIGHTS)
        replaced = change(header)
        _write(directory / WEIGHTS, header if replaced is None else replaced, data)

    return mutate


def _config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        replaced = change(config)
        (directory / "config.json").write_text(json.dumps(config if replaced is None else replaced))

    return mutate


def _shift_first_tensor_into_the_header(header: dict) -> None:
    """Its bytes would begin 8 bytes before the data: the end of the header, read as weights."""
    begin, end = header[FIRST]["data_offsets"]
    assert begin == 0
    header[FIRST]["data_offsets"] = [begin - 8, end - 8]


def _bytes_after_the_last_tensor(directory: Path) -> None:
    header, data = _read(directory / WEIGHTS)
    _write(directory / WEIGHTS, header, data + bytes(16))


def _drop_the_first_tensor(header: dict) -> None:
    """Its bytes stay in the file, owned by no tensor: a hole before the tensor that followed it."""
    del header[FIRST]


def _claim_a_header_over_100mb(directory: Path) -> None:
    header, data = _read(directory / WEIGHTS)
    _write(directory / WEIGHTS, header, data, pad_to=100_000_001)


def _split_into_shards(directory: Path) -> dict[str, str]:
    """model.safetensors as two shards and an index, as the hub lays out big checkpoints."""
    tensors = load_file(directory / WEIGHTS)
    (directory / WEIGHTS).unlink()
    names = sorted(tensors)
    halves = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({name: tensors[name] for name in part}, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _index_points(tensor: str, shard: str) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        weight_map = _split_into_shards(directory)
        weight_map[tensor] = shard
        (directory / INDEX).write_text(json.dumps({"weight_map": weight_map}))

    return mutate


def _shard_is_a_fifo(directory: Path) -> None:
    _index_points(Q, "fifo.safetensors")(directory)
    os.mkfifo(directory / "fifo.safetensors")  # opening it to read would wait for a writer


def _shard_is_a_directory_elsewhere(directory: Path) -> None:
    _index_points(Q, "linked.safetensors")(directory)
    (directory / "linked.safetensors").symlink_to(directory.parent)


def _bin_is_a_fifo(directory: Path) -> None:
    (directory / WEIGHTS).unlink()
    os.mkfifo(directory / "pytorch_model.bin")


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Path], None]
    file: str  # the file the line names, relative to the checkpoint directory
    field: str  # the field it names (the line reads "<file>: <field>: <problem>")


CASES = [
    # safetensors headers
    Case("dtype-does-not-match-bytes", _header(lambda h: h[Q].update(dtype="F16")), WEIGHTS, Q),
    Case("shape-does-not-match-bytes", _header(lambda h: h["shared.weight"].update(shape=[512, 32])), WEIGHTS,
         "shared.weight"),
    Case("reversed-offsets", _header(lambda h: h[Q].update(data_offsets=h[Q]["data_offsets"][::-1])), WEIGHTS,
         f"{Q}.data_offsets"),
    Case("negative-offset", _header(_shift_first_tensor_into_the_header), WEIGHTS, f"{FIRST}.data_offsets"),
    Case("float-offsets", _header(lambda h: h[Q].update(data_offsets=[float(o) for o in h[Q]["data_offsets"]])),
         WEIGHTS, f"{Q}.data_offsets"),
    Case("bool-offsets", _header(lambda h: h[Q].update(data_offsets=[False, True])), WEIGHTS, f"{Q}.data_offsets"),
    Case("overlapping-tensors", _header(lambda h: h[K].update(data_offsets=h[Q]["data_offsets"])), WEIGHTS,
         f"{Q}.data_offsets: overlap the bytes of {K}"),
    Case("bytes-after-the-last-tensor", _bytes_after_the_last_tensor, WEIGHTS, "data"),
    Case("hole-before-a-tensor", _header(_drop_the_first_tensor), WEIGHTS,
         f"{SECOND}.data_offsets: start 16,384 bytes after"),
    Case("header-over-100mb", _claim_a_header_over_100mb, WEIGHTS, "header length"),
    Case("header-not-an-object", _header(lambda h: [h]), WEIGHTS, "header"),
    Case("metadata-not-strings", _header(lambda h: h.update(__metadata__={"format": 1})), WEIGHTS,
         "__metadata__.format"),
    Case("entry-with-an-extra-key", _header(lambda h: h[Q].update(offset=0)), WEIGHTS, Q),
    Case("shape-with-a-negative-size", _header(lambda h: h[Q].update(shape=[-64, -64])), WEIGHTS, f"{Q}.shape"),
    Case("stored-as-integers", _header(lambda h: h["shared.weight"].update(dtype="I32")), ".", "shared.weight"),
    # config.json
    Case("config-is-a-list", _config(lambda c: [c]), "config.json", ""),
    Case("num-heads-0", _config(lambda c: c.update(num_heads=0)), "config.json", "num_heads"),
    Case("vocab-size-10e12", _config(lambda c: c.update(vocab_size=10**12)), "config.json", "vocab_size"),
    Case("eos-empty-list", _config(lambda c: c.update(eos_token_id=[])), "config.json", "eos_token_id"),
    Case("eos-outside-vocab", _config(lambda c: c.update(eos_token_id=[1, 512])), "config.json",
         "eos_token_id[1]"),
    Case("d-model-a-string", _config(lambda c: c.update(d_model="64")), "config.json", "d_model"),
    Case("epsilon-negative", _config(lambda c: c.update(layer_norm_epsilon=-1e-6)), "config.json",
         "layer_norm_epsilon"),
    Case("feed-forward-unknown", _config(lambda c: c.update(feed_forward_proj="gated-silu")), "config.json",
         "feed_forward_proj"),
    Case("max-distance-within-exact-buckets", _config(lambda c: c.update(relative_attention_max_distance=4)),
         "config.json", "relative_attention_max_distance"),
    Case("tie-a-string", _config(lambda c: c.update(tie_word_embeddings="false")), "config.json",
         "tie_word_embeddings"),
    Case("quantized-to-3-bits", _config(lambda c: c.update(specdec={"quantization": {"bits": 3, "group_size": 64}})),
         "config.json", "specdec.quantization.bits"),
    # the shard index
    Case("shard-is-an-absolute-path", _index_points(Q, "/etc/passwd"), INDEX, f'weight_map["{Q}"]'),
    Case("shard-escapes-the-directory", _index_points(Q, "../../x"), INDEX, f'weight_map["{Q}"]'),
    Case("shard-is-a-fifo", _shard_is_a_fifo, "fifo.safetensors", ""),
    Case("shard-links-to-a-directory", _shard_is_a_directory_elsewhere, "linked.safetensors", ""),
    Case("shard-name-not-a-string", _index_points(Q, 7), INDEX, f'weight_map["{Q}"]'),
    Case("weight-map-a-list", lambda d: (_split_into_shards(d), (d / INDEX).write_text('{"weight_map": []}')),
         INDEX, "weight_map"),
    # pytorch_model.bin
    Case("bin-is-a-fifo", _bin_is_a_fifo, "pytorch_model.bin", ""),
]


@pytest.fixture
def source(t5_v10_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(t5_v10_dir, tmp_path / "checkpoint"))


def _expected_prefix(directory: Path, case: Case) -> str:
    file = directory if case.file == "." else directory / case.file
    return f"{file}: {case.field}" if case.field else f"{file}: "


@pytest.mark.timeout(60)  # a FIFO opened for reading would wait for good
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_checkpoint_is_one_line_naming_file_and_field(
    case: Case, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case.mutate(source)
    out = tmp_path / "out" / "converted"
    assert convert(["--model", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"specdec-convert: error: {_expected_prefix(source, case)}"), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_outside_file_is_never_named(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shard name outside the directory is refused before anything there is opened, so the
    message tells nothing about the outside file (its size, whether it exists)."""
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x" * 12345)
    _index_points(Q, str(outside))(source)
    assert convert(["--model", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "12345" not in err and "12,345" not in err and "is not a file name inside the checkpoint directory" in err


def test_a_symlinked_shard_elsewhere_converts_and_loads(source: Path, tmp_path: Path) -> None:
    """As in the hub cache: shard names are symlinks into a blob store outside the directory."""
    _split_into_shards(source)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.move(source / SHARDS[1], blobs / "0123abcd")
    (source / SHARDS[1]).symlink_to(blobs / "0123abcd")
    out = tmp_path / "out"
    assert convert(["--model", str(source), "--out", str(out)]) == 0
    reference, converted = load_model(source), load_model(out)
    prompt = mx.array([[5, 6, 7, 1]])
    decoder = mx.array([[0, 9, 10]])
    np.testing.assert_array_equal(
        np.array(converted.model.decode(decoder, encoder_output=converted.model.encode(prompt))),
        np.array(reference.model.decode(decoder, encoder_output=reference.model.encode(prompt))),
    )


def test_a_convert_that_fails_late_leaves_an_existing_directory_as_it_was(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing after every tensor is written (here: the disk fills while the config is written)
    neither leaves the new weights nor removes the earlier conversion's."""
    out = tmp_path / "existing"
    assert convert(["--model", str(source), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_config_and_tokenizer", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(["--model", str(source), "--out", str(out), "--dtype", "bfloat16"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tensor_parallel_loader_refuses_with_the_same_line(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """load_sharded reads through the same reader: a shifted offset is the same one-line error."""
    _header(_shift_first_tensor_into_the_header)(source)
    assert convert(["--model", str(source), "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip().removeprefix("specdec-convert: error: ")
    with pytest.raises(CheckpointError) as refused:
        load_sharded(source, mx.distributed.init())  # the singleton group: no launcher
    assert str(refused.value) == line


def test_worker_prints_one_line_and_exits_2(source: Path) -> None:
    _config(lambda c: c.update(num_heads=0))(source)
    done = subprocess.run([sys.executable, "-m", "draft_service.server", "--model", str(source), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"specdec-draft: error: {source / 'config.json'}: num_heads: 0; expected an integer" in done.stderr
