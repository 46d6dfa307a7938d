"""Checkpoint loading and conversion: HF directories, converted MLX directories (float32,
bfloat16, quantized), pytorch_model.bin, and the errors a person gets for broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx  # conftest imported specdec_core (OpenBLAS) before this
import mlx.nn as nn
import numpy as np
import pytest
from doc_prompts import PROMPTS as DOC_PROMPTS
from mlx.utils import tree_map
from safetensors.numpy import load_file, save_file

from specdec_core.checkpoint import LoadedModel, load_model
from specdec_core.cpu_quantized import CpuQuantizedLinear, use_cpu_kernels
from specdec_core.errors import CheckpointError
from specdec_core.t5 import T5
from specdec_core.tokenizer import load_tokenizer
from specdec_tools.convert import main as convert

PROMPTS = DOC_PROMPTS[:10]
NEW_TOKENS = 16


def _logits(loaded: LoadedModel, seed: int = 0) -> np.ndarray:
    """Decoder logits of a fixed random prompt and decoder sequence, uncached."""
    rng = np.random.default_rng(seed)
    vocab = loaded.args.vocab_size
    prompt = mx.array(rng.integers(3, vocab, size=(1, 15)))
    decoder = rng.integers(3, vocab, size=(1, 9))
    decoder[0, 0] = loaded.args.decoder_start_token_id
    model = loaded.model
    return np.array(model.decode(mx.array(decoder), encoder_output=model.encode(prompt)))


def _greedy(model: T5, prompt_ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    cache = model.make_cache(model.encode(mx.array([prompt_ids])))
    tokens = [model.args.decoder_start_token_id]
    for _ in range(n):
        tokens.append(int(mx.argmax(model.decode(mx.array([tokens[-1:]]), cache=cache)[0, -1]).item()))
        if tokens[-1] == model.args.eos_token_id:
            break
    return tokens


def _next_token_agreement(reference: T5, other: T5, prompts: list[list[int]]) -> tuple[float, float]:
    """(teacher-forced, free-running) agreement of ``other`` with ``reference``'s greedy output.

    Teacher-forced: feed the reference's greedy tokens to ``other`` and count positions where
    its argmax picks the same next token. Free-running: position-wise equality of the two
    greedy outputs (a single early divergence costs every later position).
    """
    forced = forced_total = free = free_total = 0
    for ids in prompts:
        expected = _greedy(reference, ids)
        logits = other.decode(mx.array([expected[:-1]]), encoder_output=other.encode(mx.array([ids])))
        picks = np.array(mx.argmax(logits[0], axis=-1)).tolist()
        forced += sum(a == b for a, b in zip(picks, expected[1:], strict=True))
        forced_total += len(picks)
        got = _greedy(other, ids)
        free += sum(a == b for a, b in zip(got[1:], expected[1:], strict=False))
        free_total += len(expected) - 1
    return forced / forced_total, free / free_total


def _quantized_layers(model: T5) -> int:
    return sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


# -- conversion ---------------------------------------------------------------------------------


def test_converted_directory_loads_to_same_logits(
    family_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mlx"
    assert convert(["--model", str(family_dir), "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "float32" in summary and str(out.resolve()) in summary and "bytes written" in summary
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    load_tokenizer(out)  # the tokenizer travelled with it
    original, converted = load_model(family_dir), load_model(out)
    assert converted.args == original.args
    assert json.loads((out / "config.json").read_text())["specdec"]["dtype"] == "float32"
    np.testing.assert_array_equal(_logits(converted), _logits(original))


def test_bfloat16_conversion_is_close(t5_v11_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert convert(["--model", str(t5_v11_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    stored = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {mx.bfloat16}
    loaded = load_model(out)
    assert loaded.dtype == "bfloat16"
    assert loaded.model.shared.weight.dtype == mx.bfloat16
    ours, reference = _logits(loaded), _logits(load_model(t5_v11_dir))
    assert ours.dtype == np.float32  # logits always come back in float32
    err = np.abs(ours - reference).max() / np.abs(reference).max()
    assert err < 0.05, f"bfloat16 logits differ by {err:.3f} of max |logit|"
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("bits", [None, 8])
def test_bfloat16_weights_compute_in_float32_on_the_cpu(
    family_dir: Path, bits: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """On a CPU, where MLX's 16-bit matmuls are slow, bfloat16 weights stay bfloat16 in memory but
    every activation is float32: the logits are those of the same rounded weights held in float32.
    Quantized, it warns once at load, naming the faster choice."""
    with caplog.at_level("WARNING", logger="specdec_core.checkpoint"):
        loaded = load_model(family_dir, dtype="bfloat16", quantize_bits=bits)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (0 if bits is None else 1)
    if bits:
        assert "leave out --quantize: --dtype float32 is the fastest" in warnings[0]
    assert loaded.model.shared.weight.dtype == mx.bfloat16 and loaded.dtype == "bfloat16"
    assert loaded.activation_dtype == "float32"
    assert loaded.model.encode(mx.array([[5, 6, 7, 1]])).dtype == mx.float32
    widened = load_model(family_dir, dtype="bfloat16", quantize_bits=bits)
    widened.model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v,
                                  widened.model.parameters()))
    np.testing.assert_allclose(_logits(loaded), _logits(widened), rtol=0, atol=1e-4)


def test_quantized_blocks_on_the_cpu_dequantize_to_the_same_logits(family_dir: Path) -> None:
    """On a CPU every quantized layer runs blocks of 3+ rows as a float32 matmul of its dequantized
    weights (MLX's quantized matmul costs grow with the rows there): the same logits as MLX's
    quantized matmul, which one-row steps keep."""
    loaded = load_model(family_dir, quantize_bits=8)
    layers = [m for _, m in loaded.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(isinstance(m, CpuQuantizedLinear) for m in layers)
    dequantized = _logits(loaded)  # 9 decoder rows, 15 encoder rows
    for module in layers:
        module.__class__ = nn.QuantizedLinear
    np.testing.assert_allclose(dequantized, _logits(loaded), rtol=0, atol=1e-4)


def test_a_pass_holds_one_dequantized_matrix_at_a_time() -> None:
    """Six gated FFN blocks of quantized 1024 x 8192 layers, 8 rows (a pass that dequantizes): each
    layer's float32 copy (32 MiB) is freed before the next one is made. Left to one lazy graph, MLX
    kept a dozen alive at once (420 MiB here; on the 11B-shaped encoder 2.3 GiB over its weights)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up = nn.Linear(1024, 8192, bias=False), nn.Linear(1024, 8192, bias=False)
            self.down = nn.Linear(8192, 1024, bias=False)

        def __call__(self, x: mx.array) -> mx.array:
            return x + self.down(nn.gelu(self.gate(x)) * self.up(x))

    blocks = [Block() for _ in range(6)]
    for block in blocks:
        nn.quantize(block, group_size=64, bits=4)
        use_cpu_kernels(block)
        mx.eval(block.parameters())
    x = mx.random.normal((8, 1024))
    mx.eval(x)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    for block in blocks:
        x = block(x)
    mx.eval(x)
    matrix = 1024 * 8192 * 4
    assert mx.get_peak_memory() - before <= 3 * matrix, (mx.get_peak_memory() - before) / matrix


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_greedy_agrees_with_float32(
    family_dir: Path, tokenizer_dir: Path, bits: int
) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    full = load_model(family_dir)
    quantized = load_model(family_dir, quantize_bits=bits)
    assert quantized.quantization == {"bits": bits, "group_size": 64}
    # d_model=64, d_ff=128, heads*d_kv=64: every linear layer (and v1.1's lm_head) qualifies.
    assert _quantized_layers(quantized.model) == _quantized_layers_expected(full.args)
    forced, free = _next_token_agreement(full.model, quantized.model, prompts)
    print(f"\n[{family_dir.name} {bits}-bit] greedy next-token agreement with float32: "
          f"teacher-forced {forced:.3f}, free-running {free:.3f}")
    for ids in prompts[:3]:
        tokens = _greedy(quantized.model, ids)
        assert tokens[0] == 0 and all(0 <= t < full.args.vocab_size for t in tokens)
    if bits == 8:
        # Random tiny models have small top-1/top-2 margins, so one flipped choice derails the
        # free-running sequence; the teacher-forced figure is the stable one to bound.
        assert forced >= 0.85


def test_quantization_error_shrinks_with_more_bits(family_dir: Path) -> None:
    reference = _logits(load_model(family_dir))
    err = {bits: np.abs(_logits(load_model(family_dir, quantize_bits=bits)) - reference).mean()
           for bits in (4, 8)}
    assert 0 < err[8] < 0.25 * err[4], err


def _quantized_layers_expected(args) -> int:
    per_ffn = 3 if args.gated else 2
    encoder = args.num_layers * (4 + per_ffn)
    decoder = args.num_decoder_layers * (8 + per_ffn)
    return encoder + decoder + (1 if args.untied_lm_head else 0)


def test_converted_quantized_directory_loads_back(t5_v11_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8"
    assert convert(["--model", str(t5_v11_dir), "--out", str(out), "--quantize", "8"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["specdec"]["quantization"] == {"bits": 8, "group_size": 64}
    loaded = load_model(out)
    assert loaded.quantization == {"bits": 8, "group_size": 64}
    assert _quantized_layers(loaded.model) == _quantized_layers_expected(loaded.args)
    np.testing.assert_allclose(_logits(loaded), _logits(load_model(t5_v11_dir, quantize_bits=8)),
                               atol=1e-5, rtol=0)
    assert (out / "model.safetensors").stat().st_size < 0.5 * (t5_v11_dir / "model.safetensors").stat().st_size
    load_model(out, quantize_bits=8)  # asking for what it already is is fine
    with pytest.raises(CheckpointError, match="already quantized to 8 bits"):
        load_model(out, quantize_bits=4)


def test_pytorch_model_bin_loads_to_same_logits(family_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import T5ForConditionalGeneration

    reference = T5ForConditionalGeneration.from_pretrained(family_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(family_dir / "config.json", bin_dir)
    torch.save(reference.state_dict(), bin_dir / "pytorch_model.bin")
    np.testing.assert_allclose(_logits(load_model(bin_dir)), _logits(load_model(family_dir)),
                               atol=1e-5, rtol=0)


# -- errors -------------------------------------------------------------------------------------


def test_convert_cli_reports_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert convert(["--model", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdec-convert: error:") and "does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        convert(["--help"])
    assert exit_info.value.code == 0
    assert "--quantize" in capsys.readouterr().out


def test_convert_refuses_to_overwrite_its_source(t5_v10_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    shutil.copytree(t5_v10_dir, source)
    assert convert(["--model", str(source), "--out", str(source)]) == 2
    assert "is the source directory" in capsys.readouterr().err


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint directory .*nowhere does not exist"):
        load_model(tmp_path / "nowhere")


def test_directory_without_config(t5_v10_dir: Path, tmp_path: Path) -> None:
    shutil.copy(t5_v10_dir / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="has no config.json; is it a T5 checkpoint directory"):
        load_model(tmp_path)


def test_directory_without_weights(t5_v10_dir: Path, tmp_path: Path) -> None:
    shutil.copy(t5_v10_dir / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        load_model(tmp_path)


def test_config_that_is_not_t5(t5_v10_dir: Path, tmp_path: Path) -> None:
    shutil.copy(t5_v10_dir / "model.safetensors", tmp_path)
    config = json.loads((t5_v10_dir / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="describes a bert model; specdec serves T5"):
        load_model(tmp_path)


def test_weights_with_wrong_shape(t5_v10_dir: Path, tmp_path: Path) -> None:
    shutil.copy(t5_v10_dir / "config.json", tmp_path)
    weights = load_file(t5_v10_dir / "model.safetensors")
    name = "decoder.block.1.layer.0.SelfAttention.q.weight"
    weights[name] = weights[name][:, :32].copy()
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"do not match its config.json: 1 shape mismatches \(e.g. decoder_layers.1.self_attn.q.weight: "
        r"checkpoint \(64, 32\) vs config \(64, 64\)\)",
    ):
        load_model(tmp_path)


def test_weights_missing_a_tensor(t5_v10_dir: Path, tmp_path: Path) -> None:
    shutil.copy(t5_v10_dir / "config.json", tmp_path)
    weights = load_file(t5_v10_dir / "model.safetensors")
    del weights["encoder.final_layer_norm.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(e.g. encoder_norm.weight\)"):
        load_model(tmp_path)


def test_bad_dtype_and_bits(t5_v10_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="dtype must be one of float32, bfloat16, float16"):
        load_model(t5_v10_dir, dtype="int8")
    with pytest.raises(CheckpointError, match="quantization must be 4 or 8 bits, not 3"):
        load_model(t5_v10_dir, quantize_bits=3)
