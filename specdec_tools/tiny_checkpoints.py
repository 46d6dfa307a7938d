"""Tiny random T5 checkpoints and a sentencepiece tokenizer, built offline.

Used by the tests (against transformers' PyTorch T5) and by the benchmark's synthetic pair.
Checkpoints are written by transformers' own ``save_pretrained``, so they are real HF
directories; needs the ``test`` extra (torch, sentencepiece).

    python -m specdec_tools.tiny_checkpoints --out DIR

writes the tests' speculative pair (DIR/draft, DIR/target, sharing DIR/tokenizer) to try
conversion and serving offline: random weights, so the text is noise, but every path runs.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
from pathlib import Path
from typing import Any

TOKENIZER_VOCAB = 512
# Random init lets the residual stream echo the input token (a tied head then repeats it);
# larger attention/FFN outputs give varied, moderately peaked predictions.
BLOCK_OUTPUT_GAIN = 4.0


def corpus_lines() -> list[str]:
    """Text that ships with Python: the docstrings of a few standard-library modules."""
    import argparse
    import collections
    import email
    import json as json_module
    import logging
    import pathlib
    import string
    import textwrap

    lines: list[str] = []
    for module in (argparse, collections, email, json_module, logging, pathlib, string, textwrap):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                lines.extend(line.strip() for line in doc.splitlines() if len(line.strip()) > 20)
    return lines


def write_sentencepiece_tokenizer(
    lines: list[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    model_max_length: int = 512,
    split_digits: bool = False,
) -> Path:
    """Train a T5-style unigram sentencepiece model (pad 0, eos 1, unk 2, no extra ids) on
    ``lines`` and save it as a tokenizer directory that ``load_tokenizer`` reads.

    Trained in memory from an iterator with one thread: no temp path lands in the model and
    the same lines give byte-identical files."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        split_digits=split_digits,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (out / "spiece.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def train_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """The test tokenizer: trained on standard-library docstrings."""
    return write_sentencepiece_tokenizer(corpus_lines(), out_dir, vocab_size)


def build_t5(
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str],
    family: str = "v1_0",
    seed: int = 0,
    **sizes: Any,
) -> Path:
    """Save a random T5ForConditionalGeneration (v1_0: relu + tied + scaled; v1_1: gated-gelu +
    untied lm_head) with the tokenizer beside it."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from specdec_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config_args: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    config_args.update(sizes)
    if family == "v1_0":
        config_args.update(feed_forward_proj="relu", tie_word_embeddings=True)
    elif family == "v1_1":
        config_args.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        raise ValueError(f"family must be v1_0 or v1_1, not {family!r}")
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**config_args)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):
                param.mul_(BLOCK_OUTPUT_GAIN)
    out = Path(out_dir)
    model.save_pretrained(out)
    if family == "v1_1":
        _untie_lm_head(out, seed)
    tokenizer.save_pretrained(out)
    return out


def _untie_lm_head(out: Path, seed: int) -> None:
    """transformers 5 always ties lm_head on save; real flan-t5 files carry their own."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed + 1)
    weights["lm_head.weight"] = torch.randn(
        weights["shared.weight"].shape, generator=generator
    ) * weights["shared.weight"].std()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("scale_decoder_outputs", None)  # as in a pre-transformers-5 flan-t5 config
    (out / "config.json").write_text(json.dumps(config, indent=2))


def build_pair(out_dir: str | os.PathLike[str], seed: int = 2) -> tuple[Path, Path]:
    """The tests' speculative pair under ``out_dir``: a v1.1 target and a smaller v1.1 draft
    sharing one tokenizer (tests/conftest.py builds the same); returns (draft, target)."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(out / "tokenizer")
    target = build_t5(out / "target", tokenizer, "v1_1", seed=seed)
    draft = build_t5(out / "draft", tokenizer, "v1_1", seed=seed + 1, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                     num_heads=4)
    return draft, target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m specdec_tools.tiny_checkpoints",
        description="Write a tiny random T5 pair (HF layout: config.json, model.safetensors, tokenizer) to try "
                    "specdec-convert, scripts/up and specdec-bench without the internet. Random weights: the "
                    "text is noise. Needs the test extra (torch).",
    )
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory to write DIR/draft, DIR/target and DIR/tokenizer into")
    parser.add_argument("--seed", type=int, default=2, help="the target's seed; the draft's is one more (default 2)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    draft, target = build_pair(args.out, args.seed)
    print(f"wrote {draft} and {target}; serve them with:\n"
          f"  scripts/up --draft-model {draft} --target-model {target}")


if __name__ == "__main__":
    main()
