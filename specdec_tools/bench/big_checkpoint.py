"""Big-checkpoint memory benchmark: a T5-3B-shaped float32 checkpoint and the peak memory of
converting and serving it.

``generate`` writes a Hugging Face layout checkpoint with random weights (config.json,
``model-0000i-of-0000N.safetensors`` shards and ``model.safetensors.index.json``, a
sentencepiece tokenizer), one tensor at a time so that writing it needs about one shard of
memory. The default shape is T5-3B's (d_model 1024, 32 heads x 128, d_ff 16384, 24+24 layers,
vocabulary 32,128: 2.85B parameters, 10.6 GiB); ``--shape large`` and ``--shape 11b`` give
T5-large's and T5-11B's, ``--shape small`` T5-small's (a draft for them), ``--dtype bfloat16``
half the bytes (T5-11B: 21.1 GiB, not 42.1). The tokenizer is the demo models' 65 characters
(enough for memory figures); ``--tokenizer t5`` trains the T5-shaped pairs' 32,100-token one
(``specdec_tools/t5_pair.py``: T5's layout; a prompt is a few tokens, not one per character) and
``--tokenizer DIR`` copies another checkpoint's, so a draft and its target share one.

``measure`` runs, one at a time, ``specdec-convert`` (bfloat16, 8-bit, 4-bit) and
``specdec-target`` loading the source with ``--dtype``/``--quantize``, a converted directory
(``serve-converted-*``) or the source over two tensor-parallel ranks (``serve-tp2``) until it
announces its port, and reports each one's peak resident memory (the kernel's high-water
mark: ``ru_maxrss`` of the finished converter, ``VmHWM`` of the serving target and of each of its
ranks) next to the bytes it wrote or serves. The figures in docs/bench/big_checkpoints.md and
docs/bench/t5_11b.md come from it::

    python -m specdec_tools.bench.big_checkpoint generate --out /tmp/t5-3b-fp32
    python -m specdec_tools.bench.big_checkpoint measure --source /tmp/t5-3b-fp32 --work /tmp/big-work

``cache`` serves a model and opens sessions on it, comparing the growth of the worker's resident
memory with the cache formula's bytes (``specdec_tools.bench.cache_memory``;
docs/bench/cache_memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parents[2] / "models"
GIB = 1024**3

# The hub's t5-small (a draft: 6+6 layers), t5-large, t5-3b and t5-11b (24+24): relu FFN, tied embeddings.
SHAPES = {
    "small": dict(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6, num_decoder_layers=6,
                  vocab_size=32128),
    "large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=4096, num_layers=24, num_decoder_layers=24,
                  vocab_size=32128),
    "3b": dict(d_model=1024, d_kv=128, num_heads=32, d_ff=16384, num_layers=24, num_decoder_layers=24,
               vocab_size=32128),
    "11b": dict(d_model=1024, d_kv=128, num_heads=128, d_ff=65536, num_layers=24, num_decoder_layers=24,
                vocab_size=32128),
}


def hf_config(shape: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "feed_forward_proj": "relu",
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        **shape,
    }


def hf_tensor_shapes(shape: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every tensor a tied relu T5 stores under its Hugging Face name, in the hub's order."""
    d, inner, ff = shape["d_model"], shape["num_heads"] * shape["d_kv"], shape["d_ff"]
    attention = {"q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner)}
    tensors: dict[str, tuple[int, ...]] = {"shared.weight": (shape["vocab_size"], d)}
    for stack, layers in (("encoder", shape["num_layers"]), ("decoder", shape["num_decoder_layers"])):
        for i in range(layers):
            block = f"{stack}.block.{i}.layer"
            parts = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
            for j, part in enumerate(parts):
                for name, dims in attention.items():
                    tensors[f"{block}.{j}.{part}.{name}.weight"] = dims
                if i == 0 and part == "SelfAttention":
                    tensors[f"{block}.0.SelfAttention.relative_attention_bias.weight"] = (32, shape["num_heads"])
                tensors[f"{block}.{j}.layer_norm.weight"] = (d,)
            ffn = len(parts)
            tensors[f"{block}.{ffn}.DenseReluDense.wi.weight"] = (ff, d)
            tensors[f"{block}.{ffn}.DenseReluDense.wo.weight"] = (d, ff)
            tensors[f"{block}.{ffn}.layer_norm.weight"] = (d,)
        tensors[f"{stack}.final_layer_norm.weight"] = (d,)
    return tensors


def generate(out: Path, shape: dict[str, int], shard_bytes: int = 2 * GIB, seed: int = 0,
             dtype: str = "float32", tokenizer: str = "demo") -> Path:
    """Write the random checkpoint in ``dtype`` (float32 or bfloat16) with ``tokenizer`` ("demo",
    "t5" or a directory to copy spiece.model and tokenizer_config.json from); return ``out``."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stored, element_bytes = {"float32": (mx.float32, 4), "bfloat16": (mx.bfloat16, 2)}[dtype]
    shapes = hf_tensor_shapes(shape)
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():
        nbytes = element_bytes * int(np.prod(dims))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            dims = shapes[name]
            # Layer norms at 1 as T5 initialises them; the rest at the scale of a trained model's.
            values = (np.ones(dims, np.float32) if len(dims) == 1
                      else rng.standard_normal(dims, dtype=np.float32) * np.float32(dims[-1] ** -0.5))
            tensors[name] = mx.array(values).astype(stored)
            mx.eval(tensors[name])
            del values
            weight_map[name] = file
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        del tensors
        mx.clear_cache()
        print(f"wrote {file} ({len(names)} tensors)", flush=True)
    total = sum(element_bytes * int(np.prod(d)) for d in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(shape) | {"torch_dtype": dtype}, indent=2) + "\n")
    write_tokenizer(out, tokenizer)
    print(f"{out}: {sum(int(np.prod(d)) for d in shapes.values()):,} parameters, {total / GIB:.2f} GiB {dtype}")
    return out


def write_tokenizer(out: Path, tokenizer: str) -> None:
    if tokenizer == "t5":
        from specdec_tools.t5_pair import TOKENIZER_PIECES, _train_tokenizer

        _train_tokenizer(out, TOKENIZER_PIECES)
        return
    source = MODELS / "demo-target" if tokenizer == "demo" else Path(tokenizer)
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)


def to_pytorch_bin(source: Path, out: Path) -> Path:
    """The same checkpoint as one ``pytorch_model.bin`` (as older hub repositories ship it).
    Writing it holds the whole model in memory: use it on the T5-large shape."""
    import torch
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("model-*-of-*.safetensors")):
        state.update(load_file(shard))
    torch.save(state, out / "pytorch_model.bin")
    for file in source.iterdir():
        if not file.name.startswith("model"):
            shutil.copy(file, out / file.name)
    return out


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    command: str
    peak_rss_bytes: int
    payload_bytes: int  # bytes written (convert) or weights held (serve; rank 0's under tensor parallelism)
    seconds: float
    rank_peaks_bytes: list[int] = field(default_factory=list)  # tensor-parallel: every rank's, rank 0 first

    @property
    def bound_bytes(self) -> int:  # the goal of issue 23
        return int(1.5 * self.payload_bytes + GIB)


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix == ".safetensors")


def _script(name: str) -> str:
    script = Path(sys.executable).with_name(name)
    return str(script) if script.exists() else name


def measure_convert(source: Path, out: Path, options: list[str]) -> Measurement:
    argv = [_script("specdec-convert"), "--model", str(source), "--out", str(out), *options]
    started = time.monotonic()
    process = subprocess.Popen(argv)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    return Measurement(" ".join(["specdec-convert", *argv[1:]]), usage.ru_maxrss * 1024,
                       _directory_bytes(out), time.monotonic() - started)


def measure_serve(model: Path, options: list[str], log: Path) -> Measurement:
    """Peak memory of ``specdec-target --model MODEL OPTIONS`` once it serves (announced its port)."""
    from specdec_tools.bench.cache_memory import process_memory
    from specdec_tools.service_process import ServiceProcess

    argv = ["--model", str(model), "--port", "0", *options]
    started = time.monotonic()
    with ServiceProcess("target", argv, log) as service:
        service.wait_port(timeout=3600)
        seconds = time.monotonic() - started
        ranks = [service.pid, *_descendants(service.pid)]  # a tensor-parallel rank 0 starts the others
        peaks = [process_memory(pid)[1] for pid in ranks]
        served = _served_bytes(log)
    return Measurement(" ".join(["specdec-target", *argv]), peaks[0], served, seconds,
                       peaks if len(peaks) > 1 else [])


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return [found for child in children for found in (child, *_descendants(child))]


def _served_bytes(log: Path) -> int:
    """The weight bytes the target's load line reports (``... GB of weights``, or a tensor-parallel
    rank 0's ``... MB of weights``)."""
    import re

    match = re.search(r"([\d.]+) ([GM])B of weights", log.read_text(errors="replace"))
    if not match:
        raise RuntimeError(f"no 'GB of weights' in {log}")
    return int(float(match.group(1)) * (1e9 if match.group(2) == "G" else 1e6))


def measure(source: Path, work: Path, which: list[str], keep: bool = False) -> list[Measurement]:
    """Run ``which`` in order. A quantized conversion is deleted (disk) once no later run serves it
    (``serve-converted-...``), unless ``keep``."""
    work.mkdir(parents=True, exist_ok=True)
    results: list[Measurement] = []
    runs = {
        "convert-bf16": lambda: measure_convert(source, work / "bf16", ["--dtype", "bfloat16"]),
        "convert-q8": lambda: measure_convert(source, work / "q8", ["--dtype", "bfloat16", "--quantize", "8"]),
        "convert-q4": lambda: measure_convert(source, work / "q4", ["--dtype", "bfloat16", "--quantize", "4"]),
        "convert-q4-fp32": lambda: measure_convert(source, work / "q4-fp32", ["--dtype", "float32", "--quantize", "4"]),
        "serve-bf16": lambda: measure_serve(source, ["--dtype", "bfloat16"], work / "serve-bf16.log"),
        "serve-q8": lambda: measure_serve(source, ["--dtype", "bfloat16", "--quantize", "8"],
                                          work / "serve-q8.log"),
        "serve-q4": lambda: measure_serve(source, ["--dtype", "bfloat16", "--quantize", "4"],
                                          work / "serve-q4.log"),
        "serve-converted-bf16": lambda: measure_serve(work / "bf16", [], work / "serve-converted.log"),
        "serve-converted-q4": lambda: measure_serve(work / "q4", [], work / "serve-converted-q4.log"),
        "serve-converted-q4-fp32": lambda: measure_serve(work / "q4-fp32", [], work / "serve-converted-q4-fp32.log"),
        "serve-tp2": lambda: measure_serve(source, ["--tensor-parallel", "2"], work / "serve-tp2.log"),
    }
    unknown = [name for name in which if name not in runs]
    if unknown:
        raise SystemExit(f"--only: unknown run {unknown[0]!r}; choose from {', '.join(runs)}")
    for position, name in enumerate(which):
        result = runs[name]()
        results.append(result)
        print(f"{name}: peak {result.peak_rss_bytes / GIB:.2f} GiB, payload {result.payload_bytes / GIB:.2f} GiB, "
              f"bound {result.bound_bytes / GIB:.2f} GiB, {result.seconds:.0f} s  ({result.command})"
              + (f"; ranks' peaks {', '.join(f'{b / GIB:.2f}' for b in result.rank_peaks_bytes)} GiB"
                 if result.rank_peaks_bytes else ""), flush=True)
        converted = name.removeprefix("convert-").removeprefix("serve-converted-")
        if converted.startswith("q") and not keep and f"serve-converted-{converted}" not in which[position + 1:]:
            shutil.rmtree(work / converted, ignore_errors=True)  # disk, not needed again
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec_tools.bench.big_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="write the T5-3B-shaped float32 checkpoint")
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--shape", choices=list(SHAPES), default="3b", help="which T5's shape (default 3b)")
    make.add_argument("--layers", type=int, help="encoder and decoder layers each (default: the model's 24); "
                      "fewer keep the shape of every tensor but not the size of the whole")
    make.add_argument("--shard-gib", type=float, default=2.0, help="largest shard (default 2 GiB)")
    make.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="stored dtype (default float32; bfloat16 halves the disk)")
    make.add_argument("--tokenizer", default="demo", metavar="demo|t5|DIR",
                      help="demo: the demo models' 65 characters (default); t5: a 32,100-token T5-layout "
                           "sentencepiece (trained here in about a minute); DIR: copy that checkpoint's")
    to_bin = commands.add_parser("to-bin", help="rewrite a generated checkpoint as pytorch_model.bin")
    to_bin.add_argument("--source", required=True, type=Path)
    to_bin.add_argument("--out", required=True, type=Path)
    run = commands.add_parser("measure", help="peak memory of converting and serving it")
    run.add_argument("--source", required=True, type=Path, help="the generated float32 directory")
    run.add_argument("--work", required=True, type=Path, help="where conversions and logs go")
    run.add_argument("--only", nargs="*", default=["convert-bf16", "convert-q8", "convert-q4", "convert-q4-fp32",
                                                   "serve-bf16", "serve-q8", "serve-q4", "serve-converted-bf16"])
    run.add_argument("--keep", action="store_true", help="keep the quantized conversions (default: deleted "
                     "once measured and served)")
    run.add_argument("--json", type=Path, help="also write the figures here")
    cache = commands.add_parser("cache", help="a worker's resident memory against the cache formula: open N "
                                "sessions, compare the growth with Info's cache_bytes_used")
    cache.add_argument("--model", required=True, type=Path, help="the target checkpoint to serve")
    cache.add_argument("--sessions", type=int, default=20, help="sessions to open (default 20)")
    cache.add_argument("--prompt-tokens", type=int, default=512, help="each session's prompt (default 512)")
    cache.add_argument("--work", type=Path, default=Path("/tmp/specdec-cache-memory"), help="where the log goes")
    cache.add_argument("--until-refused", action="store_true",
                       help="stop at the first session the worker refuses (RESOURCE_EXHAUSTED: --cache-memory "
                            "spent), --sessions at most; also reports the peak against weights + budget + 1 GiB")
    cache.add_argument("--json", type=Path, help="also write the figures here")
    cache.add_argument("options", nargs="*", help="more specdec-target flags, after --, e.g. -- --dtype bfloat16")
    args = parser.parse_args(argv)
    if args.command == "cache":
        from specdec_tools.bench.cache_memory import measure_cache

        log = args.work / "cache-target.log"
        result = measure_cache(args.model, args.options, args.sessions, args.prompt_tokens, log,
                               until_refused=args.until_refused)
        print(result.line(), flush=True)
        figures = asdict(result) | {"growth": result.growth, "ratio": result.ratio}
        if args.until_refused:
            weights = _served_bytes(log)
            bound = weights + result.budget_bytes + GIB  # issue 30: the peak stays within this
            figures |= {"weights_bytes": weights, "peak_bound_bytes": bound, "within_bound": result.hwm_open <= bound}
            print(f"refused after {result.sessions} sessions: {result.refusal!r}; VmHWM {result.hwm_open / GIB:.2f} GiB "
                  f"vs weights {weights / GIB:.2f} + budget {result.budget_bytes / GIB:.2f} + 1 GiB = "
                  f"{bound / GIB:.2f} GiB", flush=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0
    if args.command == "generate":
        shape = SHAPES[args.shape] | ({"num_layers": args.layers, "num_decoder_layers": args.layers}
                                      if args.layers else {})
        generate(args.out, shape, int(args.shard_gib * GIB), dtype=args.dtype, tokenizer=args.tokenizer)
        return 0
    if args.command == "to-bin":
        to_pytorch_bin(args.source, args.out)
        return 0
    results = measure(args.source, args.work, args.only, args.keep)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"bound_bytes": r.bound_bytes} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
