"""Streaming conversion and loading of a multi-shard checkpoint: peak memory, output, errors.

The source is a random T5 of ~110 MB in float32 that transformers saves in 20 MB shards with
an index, as the hub does for big models. Memory is measured in a child process (its
high-water mark, ``VmHWM``), relative to that process's own resident size just before it
converts, so the bound is "what is written plus a little", not "the model twice".
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx  # conftest imported specdec_core (OpenBLAS) before this
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration

from specdec_core.checkpoint import LoadedModel, load_model
from specdec_core.errors import CheckpointError
from specdec_tools.convert import main as convert

MB = 1000**2
SIZES = dict(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=4, num_decoder_layers=4)

# Runs specdec-convert in a fresh process and reports its resident size before and its peak.
CHILD = """
import json, sys
from specdec_core import blas
blas.preload()
import mlx.core as mx
if sys.argv[1] == "torch":
    import torch  # a pytorch_model.bin source imports it; count it in the baseline
from specdec_tools.convert import main

def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024

mx.eval(mx.ones((256, 256)) @ mx.ones((256, 256)))  # MLX's first-use allocations
baseline = status("VmRSS")
code = main(sys.argv[2:])
print(json.dumps({"code": code, "baseline": baseline, "peak": status("VmHWM")}))
"""


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random v1.0 T5 (tied head, relu) of ~110 MB in float32, in 20 MB safetensors shards."""
    from specdec_core.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("sharded")
    config = T5Config(vocab_size=len(load_tokenizer(tokenizer_dir)), feed_forward_proj="relu",
                      tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      dropout_rate=0.0, **SIZES)
    torch.manual_seed(5)
    T5ForConditionalGeneration(config).eval().save_pretrained(out, max_shard_size="20MB")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 5
    return out


def _source_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _written_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _convert_in_child(source: Path, out: Path, *options: str, imports: str = "mlx") -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, imports, "--model", str(source), "--out", str(out), *options],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["code"] == 0
    return figures


def _logits(loaded: LoadedModel) -> np.ndarray:
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, loaded.args.vocab_size, size=(1, 13))
    decoder = rng.integers(3, loaded.args.vocab_size, size=(1, 7))
    decoder[0, 0] = loaded.args.decoder_start_token_id
    model = loaded.model
    return np.array(model.decode(mx.array(decoder), encoder_output=model.encode(mx.array(prompt))))


# -- memory ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("options", [["--dtype", "bfloat16"], ["--quantize", "4"]], ids=["bfloat16", "4-bit"])
def test_conversion_peaks_at_what_it_writes_not_the_model(sharded_dir: Path, tmp_path: Path,
                                                          options: list[str]) -> None:
    source = _source_bytes(sharded_dir)
    figures = _convert_in_child(sharded_dir, tmp_path / "out", *options)
    written = _written_bytes(tmp_path / "out")
    grew = figures["peak"] - figures["baseline"]
    # Holding the float32 source (or the model plus its cast) would add >= the source size;
    # streaming adds what it writes (one shard here) plus a few tensors.
    bound = 1.5 * written + source / 4
    print(f"\n[{' '.join(options)}] source {source / MB:.0f} MB, written {written / MB:.0f} MB, "
          f"peak grew {grew / MB:.0f} MB (bound {bound / MB:.0f} MB)")
    assert grew <= bound, f"conversion grew {grew / MB:.0f} MB over its baseline; bound {bound / MB:.0f} MB"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_pytorch_model_bin_converts_within_the_bound(sharded_dir: Path, tmp_path: Path) -> None:
    """A memory-mapped pytorch_model.bin: each tensor's pages are dropped once it is read, so
    the touched mapping does not add up to the whole file."""
    bin_dir = _as_pytorch_bin(sharded_dir, tmp_path / "bin")
    source = (bin_dir / "pytorch_model.bin").stat().st_size
    figures = _convert_in_child(bin_dir, tmp_path / "out", "--dtype", "bfloat16", imports="torch")
    written = _written_bytes(tmp_path / "out")
    grew = figures["peak"] - figures["baseline"]
    bound = 1.5 * written + source / 4
    print(f"\n[pytorch_model.bin -> bfloat16] source {source / MB:.0f} MB, written {written / MB:.0f} MB, "
          f"peak grew {grew / MB:.0f} MB (bound {bound / MB:.0f} MB)")
    assert grew <= bound
    np.testing.assert_array_equal(_logits(load_model(tmp_path / "out")),
                                  _logits(load_model(sharded_dir, dtype="bfloat16")))


def _as_pytorch_bin(source: Path, out: Path) -> Path:
    out.mkdir()
    reference = T5ForConditionalGeneration.from_pretrained(source)
    torch.save(reference.state_dict(), out / "pytorch_model.bin")  # tied tensors share storage
    for file in source.iterdir():
        if not file.name.startswith("model"):
            shutil.copy(file, out)
    return out


# -- output ---------------------------------------------------------------------------------------


def test_sharded_source_loads_to_transformers_logits(sharded_dir: Path) -> None:
    reference = T5ForConditionalGeneration.from_pretrained(sharded_dir).eval()
    loaded = load_model(sharded_dir)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, loaded.args.vocab_size, size=(1, 13))
    decoder = rng.integers(3, loaded.args.vocab_size, size=(1, 7))
    decoder[0, 0] = 0
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(prompt), decoder_input_ids=torch.tensor(decoder)).logits.numpy()
    model = loaded.model
    ours = np.array(model.decode(mx.array(decoder), encoder_output=model.encode(mx.array(prompt))))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("dtype", "bits"), [("bfloat16", None), (None, 4), ("bfloat16", 8)])
def test_sharded_output_loads_to_the_same_model(sharded_dir: Path, tmp_path: Path, dtype: str | None,
                                                bits: int | None) -> None:
    """Converting into 16 MB shards and loading them gives exactly the model that loading the
    source with the same --dtype/--quantize gives (the serve-time path)."""
    out = tmp_path / "out"
    options = (["--dtype", dtype] if dtype else []) + (["--quantize", str(bits)] if bits else [])
    assert convert(["--model", str(sharded_dir), "--out", str(out), "--max-shard-size", "16MB", *options]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert all(f.stat().st_size <= 16 * MB + 100_000 for f in shards)  # the limit, plus a header
    assert not (out / "model.safetensors").exists()
    converted, direct = load_model(out), load_model(sharded_dir, dtype=dtype, quantize_bits=bits)
    assert (converted.dtype, converted.quantization) == (direct.dtype, direct.quantization)
    np.testing.assert_array_equal(_logits(converted), _logits(direct))


def test_bad_shard_size(sharded_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        convert(["--model", str(sharded_dir), "--out", str(tmp_path / "out"), "--max-shard-size", "lots"])
    assert "not a size such as 2GB" in capsys.readouterr().err


# -- broken shards --------------------------------------------------------------------------------


def _copy(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    return out


def test_tensor_missing_from_its_shard(sharded_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    broken = _copy(sharded_dir, tmp_path / "broken")
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    name = "decoder.block.2.layer.1.EncDecAttention.k.weight"
    shard = broken / weight_map[name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=rf"puts {name} in {shard}, but that file does not hold it"):
        load_model(broken)
    assert convert(["--model", str(broken), "--out", str(tmp_path / "out")]) == 2
    assert str(shard) in capsys.readouterr().err


def test_truncated_shard(sharded_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _copy(sharded_dir, tmp_path / "broken")
    shard = sorted(broken.glob("model-*-of-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match=rf"{shard}: .*\.data_offsets: ends at byte .* the file is truncated"):
        load_model(broken)
    assert convert(["--model", str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"specdec-convert: error: {shard}: ") and "the file is truncated" in err
    assert "Traceback" not in err


def test_shard_named_by_the_index_is_missing(sharded_dir: Path, tmp_path: Path) -> None:
    broken = _copy(sharded_dir, tmp_path / "broken")
    shard = sorted(broken.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: does not exist \(model.safetensors.index.json names it\)"):
        load_model(broken)


def test_legacy_pytorch_bin_loads_whole(t5_v10_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """torch cannot memory-map a pre-1.6 file (it raises): it is read whole, with a warning."""
    reference = T5ForConditionalGeneration.from_pretrained(t5_v10_dir)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(t5_v10_dir / "config.json", legacy)
    torch.save(reference.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = load_model(legacy)
    assert "legacy (pre-1.6) format" in caplog.text
    np.testing.assert_array_equal(_logits(loaded), _logits(load_model(t5_v10_dir)))


def test_failed_conversion_leaves_no_partial_shards(sharded_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from specdec_core import tensor_files

    real_read, reads = tensor_files.SafetensorsFiles.read, []

    def read_then_fail(self, name: str) -> mx.array:
        reads.append(name)
        if len(reads) == 40:  # after a few 16 MB shards were written
            raise CheckpointError(f"simulated read error in {name}")
        return real_read(self, name)

    monkeypatch.setattr(tensor_files.SafetensorsFiles, "read", read_then_fail)
    out = tmp_path / "out"
    assert convert(["--model", str(sharded_dir), "--out", str(out), "--max-shard-size", "16MB"]) == 2
    assert not out.exists()  # it made the directory, and took it away again


def test_benchmark_generator_writes_a_loadable_sharded_checkpoint(tmp_path: Path) -> None:
    """The T5-3B-shaped generator of the memory benchmark, at a tiny shape: the same layout."""
    from specdec_tools.bench.big_checkpoint import generate, hf_tensor_shapes

    shape = dict(d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2, vocab_size=96)
    out = generate(tmp_path / "gen", shape, shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_tensor_shapes(shape)) and len(set(index["weight_map"].values())) > 1
    reference = T5ForConditionalGeneration.from_pretrained(out).eval()
    assert sum(p.numel() for p in reference.parameters()) == sum(
        int(np.prod(s)) for s in hf_tensor_shapes(shape).values())
    loaded = load_model(out)
    assert loaded.args.d_ff == 256 and not loaded.args.untied_lm_head


def test_benchmark_generator_writes_bfloat16_that_loads_to_the_float32_values_rounded(tmp_path: Path) -> None:
    """``--dtype bfloat16`` stores BF16 tensors (half the disk of T5-11B's 42 GiB): the same
    seeded values as the float32 checkpoint, rounded, and a checkpoint transformers reads."""
    from specdec_tools.bench.big_checkpoint import generate

    shape = dict(d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2, vocab_size=96)
    wide = generate(tmp_path / "f32", shape, shard_bytes=200_000)
    narrow = generate(tmp_path / "bf16", shape, shard_bytes=200_000, dtype="bfloat16")
    index, wide_index = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (narrow, wide))
    assert index["metadata"]["total_size"] * 2 == wide_index["metadata"]["total_size"]
    assert set(index["weight_map"]) == set(wide_index["weight_map"])
    for shard in sorted(set(index["weight_map"].values())):
        for name, value in mx.load(str(narrow / shard)).items():
            expected = mx.load(str(wide / wide_index["weight_map"][name]))[name].astype(mx.bfloat16)
            assert value.dtype == mx.bfloat16 and mx.array_equal(value, expected).item(), name
    reference = T5ForConditionalGeneration.from_pretrained(narrow).eval()
    assert reference.shared.weight.dtype == torch.bfloat16
