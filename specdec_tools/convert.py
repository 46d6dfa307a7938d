"""specdec-convert: turn a T5 checkpoint (hub name or HF directory) into an MLX directory.

The output holds safetensors under our parameter names (``model.safetensors``, or shards of
at most ``--max-shard-size`` with ``model.safetensors.index.json``), ``config.json`` with a
``"specdec"`` section recording dtype and quantization, and the tokenizer files, so a
service can load it directly (``--model OUT``) without torch or a download. Tensors are
read, cast, quantized and written one at a time: memory holds one output shard plus about
one source tensor, not the model (docs/bench/big_checkpoints.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdec_core import blas

blas.preload()  # OpenBLAS goes global before anything imports MLX (see specdec_core.blas)

from specdec_core.checkpoint import DEFAULT_GROUP_SIZE, DTYPES, QUANT_BITS, convert_checkpoint
from specdec_core.errors import CheckpointError
from specdec_core.tensor_files import DEFAULT_SHARD_BYTES, parse_size

GROUP_SIZES = (32, 64, 128)  # what mlx.nn.quantize supports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec-convert",
        description=(
            "Convert a T5 checkpoint (t5-*, google/t5-v1_1-*, google/flan-t5-*) to an MLX\n"
            "directory that the draft and target services load directly (--model DIR),\n"
            "optionally cast to another dtype or quantized. The tokenizer files are copied."
        ),
        epilog=(
            "examples:\n"
            "  specdec-convert --model google/flan-t5-small --out models/flan-t5-small\n"
            "  specdec-convert --model t5-11b --out models/t5-11b-q4 --dtype bfloat16 --quantize 4\n"
            "\n"
            "exit status: 0 converted; 2 a bad flag, or a checkpoint it cannot read, told in one line\n"
            "(specdec-convert: error: <file>: <field>: <problem>). A failed conversion leaves --out as it\n"
            "was: a directory it created is removed, an existing one keeps only what it held.\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_DIR",
        help="a local checkpoint directory (config.json plus safetensors or pytorch_model.bin) "
        "or a Hugging Face hub name, downloaded on first use",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="parameter dtype to store (default: the checkpoint's own, except that a float16 checkpoint "
        "is stored as float32, since T5 overflows in float16; --dtype float16 is stored as float16, with "
        "a warning)",
    )
    parser.add_argument(
        "--quantize",
        type=int,
        choices=list(QUANT_BITS),
        default=None,
        metavar="BITS",
        help="quantize the linear layers to 4 or 8 bits (layers whose input size is not a "
        "multiple of --group-size stay unquantized)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=DEFAULT_GROUP_SIZE,
        help=f"quantization group size, one of {GROUP_SIZES} (default {DEFAULT_GROUP_SIZE}; "
        "used with --quantize)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default=DEFAULT_SHARD_BYTES,
        metavar="SIZE",
        help="largest safetensors file to write, e.g. 2GB, 500MB (default 2GB; a checkpoint that "
        "fits in one is written as model.safetensors). Conversion holds one shard in memory",
    )
    return parser


def _shard_size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if size <= 0:
        raise argparse.ArgumentTypeError("the shard size must be positive")
    return size


def _format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        done = convert_checkpoint(args.model, args.out, dtype=args.dtype, quantize_bits=args.quantize,
                                  group_size=args.group_size, max_shard_bytes=args.max_shard_size)
    except CheckpointError as exc:
        print(f"specdec-convert: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    stream = done.stream
    quant = stream.quantization
    quant_text = f"{quant['bits']}-bit, group size {quant['group_size']}" if quant else "none"
    a = stream.args
    head = "untied" if a.untied_lm_head else "tied"
    shards = f"{len(done.files)} shards + index" if len(done.files) > 1 else "one file"
    print(f"converted {stream.model_id} in {done.seconds:.1f} s")
    print(f"  architecture  T5 {a.num_layers}+{a.num_decoder_layers} layers, d_model {a.d_model}, "
          f"{a.feed_forward_proj} FFN, {head} lm head")
    print(f"  parameters    {done.parameters:,}"
          + (" (packed: quantized weights count 32-bit words)" if quant else ""))
    print(f"  dtype         {stream.dtype}")
    print(f"  quantization  {quant_text}")
    print(f"  bytes written {written:,} ({_format_bytes(written)}, {shards})")
    print(f"  written to    {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
