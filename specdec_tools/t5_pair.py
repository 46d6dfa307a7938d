"""A draft/target pair at the job's own shapes, built offline for the benchmark (``specdec-bench``).

Users run T5-small drafting for T5-large and larger; a pair of toy width hides what a step
costs there. This pair keeps both shapes exact and lets the agreement be set:

- **draft**: T5-small's shape (relu FFN): d_model 512, 8 heads x 64, d_ff 2048, 6+6 layers,
  vocabulary 32,128; random weights at transformers' init scale with factor 1 (a larger factor
  amplifies float rounding across layers: the agreement would then follow the arithmetic, not
  the gain). One departure, which costs the same: the lm head is its own matrix (as in
  v1.1/flan-t5), not the tied embedding. In a random model the tied head mostly repeats the
  input token (the residual stream still holds its embedding); an untied head scaled to give
  logits of standard deviation ``LOGIT_STD`` gives peaked predictions instead (top token ~0.5
  on average, entropy ~2 nats, like a trained model's).
- **target**: T5-large's shape: d_model 1024, 16 heads x 64, d_ff 4096, 24+24 layers, 32,128.
  It *embeds* the draft: the draft's residual stream is the first half of the target's width,
  the draft's 8 heads are the target's heads 0-7 and its 2,048 FFN units the first half of the
  target's, in the target's first 6 layers of each stack. What reads the draft's half reads
  only it (zero weights from the other half), so the target's first half follows the draft's
  stream exactly while the other half stays near zero. Norms are rescaled: an RMS over 1,024
  dimensions of which 512 carry the draft's values is the draft's RMS / sqrt(2), so the norm
  weights on the draft's half are divided by sqrt(2). Everything else (the extra
  heads, FFN units, the other half of the embeddings and the 18 extra layers of each stack)
  is random, and every output projection that writes into the residual stream from an extra
  part is multiplied by ``gain``: the target is the draft plus a perturbation whose size the
  gain sets, so greedy agreement runs from ~1 (gain 0) down to chance.
- **tokenizer**: a 32,000-piece unigram sentencepiece model trained on the standard library's
  own Python source (shipped with Python, so offline), plus T5's 100 sentinel ids: 32,100
  tokens, the model's 32,128 rows as in T5. Prompts read as text; random models write
  text-like pieces, and the 28 ids past the tokenizer decode to empty text.

Costs are T5's: a target decoder step reads ~0.7B weights, a draft step 60M (the models are
float32 on disk: target 2.9 GB, draft 0.24 GB). Everything is seeded; ``build_t5_pair`` caches
the pair under a directory keyed by its recipe (``recipe.json``) and shares the draft and
tokenizer between gains (``base/``).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sysconfig
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 32128
TOKENIZER_PIECES = 32000  # + 100 sentinels = T5's 32,100 tokens
SMALL = dict(d_model=512, num_heads=8, d_ff=2048, layers=6)
LARGE = dict(d_model=1024, num_heads=16, d_ff=4096, layers=24)
# A costlier draft for the same target: T5-large's width, 2+2 layers (a drafted token ~15% of a
# target pass, against ~10% for SMALL); the target embeds it whole in its first 2 layers.
WIDE = dict(LARGE, layers=2)
SENTINELS = 100
D_KV = 64
LOGIT_STD = 6.0  # of a random model's logits: the top token gets ~0.5 on average (see the docstring)
BUCKETS, MAX_DISTANCE = 32, 128
# Gains for the benchmark's three agreement levels: greedy acceptance at k = 5 over its first 4
# prompts, 32 tokens each, was 0.65, 0.91 and ~0.1 when chosen (docs/bench/t5_shape.md).
GAINS = {"t5": 0.03, "t5-agree": 0.003, "t5-lowaccept": 0.18}
COSTLY_GAIN = 0.028  # the t5-costly workload's: WIDE draft, greedy acceptance about 0.5


@dataclass(frozen=True)
class T5PairRecipe:
    gain: float
    draft: dict[str, int] = field(default_factory=lambda: dict(SMALL))
    target: dict[str, int] = field(default_factory=lambda: dict(LARGE))
    vocab: int = VOCAB
    tokenizer_pieces: int = TOKENIZER_PIECES
    seed: int = 0
    version: int = 2  # bump when the construction changes, so caches rebuild

    def scaled_down(self) -> T5PairRecipe:
        """The same construction at toy widths (seconds to build), for tests and smoke runs."""
        wide = self.draft["d_model"] == self.target["d_model"]
        return replace(self, draft=dict(d_model=64 if wide else 32, num_heads=4 if wide else 2, d_ff=128 if wide else 64,
                                        layers=1 if wide else 2),
                       target=dict(d_model=64, num_heads=4, d_ff=128, layers=4), vocab=1128,
                       tokenizer_pieces=1000)


@dataclass(frozen=True)
class T5Pair:
    draft: Path
    target: Path
    recipe: T5PairRecipe


def build_t5_pair(cache_dir: str | Path, recipe: T5PairRecipe) -> T5Pair:
    """Build (or reuse) the pair under ``cache_dir``: ``base/`` holds the tokenizer and draft for
    every gain, ``target-<gain>/`` one target each."""
    root = Path(cache_dir)
    base = _base(root / "base", recipe)
    target = root / f"target-gain{recipe.gain:g}"
    stamp = target / "recipe.json"
    wanted = json.dumps(asdict(recipe), sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == wanted and (target / "model.safetensors").is_file()):
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        _write_target(target, base / "draft", recipe)
        stamp.write_text(wanted)
    return T5Pair(base / "draft", target, recipe)


def _base(base: Path, recipe: T5PairRecipe) -> Path:
    stamp = base / "recipe.json"
    wanted = json.dumps({key: value for key, value in asdict(recipe).items() if key != "gain"}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted and (base / "draft" / "model.safetensors").is_file():
        return base
    if base.exists():
        shutil.rmtree(base)
    (base / "draft").mkdir(parents=True)
    tokenizer = _train_tokenizer(base / "tokenizer", recipe.tokenizer_pieces)
    rng = np.random.default_rng(recipe.seed)
    shape, vocab = recipe.draft, recipe.vocab
    weights = {}
    for stack in ("encoder", "decoder"):
        weights |= _stack(rng, stack, shape)
    weights["shared.weight"] = rng.standard_normal((vocab, shape["d_model"]), dtype=np.float32)
    weights["lm_head.weight"] = _head(rng, vocab, shape["d_model"])
    _save(base / "draft", weights, shape, vocab, tokenizer)
    stamp.write_text(wanted)
    return base


def _head(rng: np.random.Generator, vocab: int, d_model: int) -> np.ndarray:
    # a normalised hidden state has RMS 1, so logits have standard deviation LOGIT_STD
    return rng.standard_normal((vocab, d_model), dtype=np.float32) * np.float32(LOGIT_STD / d_model ** 0.5)


def _stack(rng: np.random.Generator, stack: str, shape: dict[str, int], gain: float = 1.0,
           first: int = 0) -> dict[str, np.ndarray]:
    """Random blocks ``first``.. of one stack at transformers' init scale (factor 1), with the
    output projections (attention ``o``, FFN ``wo``) multiplied by ``gain``."""
    d, inner, d_ff = shape["d_model"], shape["num_heads"] * D_KV, shape["d_ff"]

    def normal(rows: int, cols: int, std: float) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)

    def attention(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.q.weight": normal(inner, d, (d * D_KV) ** -0.5),
                f"{prefix}.k.weight": normal(inner, d, d ** -0.5),
                f"{prefix}.v.weight": normal(inner, d, d ** -0.5),
                f"{prefix}.o.weight": normal(d, inner, gain * inner ** -0.5)}

    weights: dict[str, np.ndarray] = {}
    ffn_layer = 2 if stack == "decoder" else 1
    for i in range(first, shape["layers"]):
        block = f"{stack}.block.{i}.layer"
        weights |= attention(f"{block}.0.SelfAttention")
        if stack == "decoder":
            weights |= attention(f"{block}.1.EncDecAttention")
        weights[f"{block}.{ffn_layer}.DenseReluDense.wi.weight"] = normal(d_ff, d, d ** -0.5)
        weights[f"{block}.{ffn_layer}.DenseReluDense.wo.weight"] = normal(d, d_ff, gain * d_ff ** -0.5)
        for sub in range(ffn_layer + 1):
            weights[f"{block}.{sub}.layer_norm.weight"] = np.ones(d, np.float32)
    if first == 0:
        weights[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = normal(
            BUCKETS, shape["num_heads"], d ** -0.5)
    weights[f"{stack}.final_layer_norm.weight"] = np.ones(d, np.float32)
    return weights


def _write_target(out: Path, draft_dir: Path, recipe: T5PairRecipe) -> None:
    from safetensors.numpy import load_file

    draft = load_file(str(draft_dir / "model.safetensors"))
    # Start from a random target whose every extra part writes with the gain, then put the draft in.
    rng = np.random.default_rng(recipe.seed + 1)
    weights: dict[str, np.ndarray] = {}
    small, large, vocab = recipe.draft, recipe.target, recipe.vocab
    for stack in ("encoder", "decoder"):
        weights |= _stack(rng, stack, large, recipe.gain)
    half, inner_half, ff_half = small["d_model"], small["num_heads"] * D_KV, small["d_ff"]
    rest = large["d_model"] - half
    shared = weights["shared.weight"] = np.empty((vocab, large["d_model"]), np.float32)
    shared[:, :half] = draft["shared.weight"]
    shared[:, half:] = rng.standard_normal((vocab, rest), dtype=np.float32) * np.float32(recipe.gain)
    head = weights["lm_head.weight"] = np.empty((vocab, large["d_model"]), np.float32)
    head[:, :half] = draft["lm_head.weight"]
    if rest:
        head[:, half:] = _head(rng, vocab, rest)  # reads the other half, which stays near zero
    for name, value in draft.items():
        if name in ("shared.weight", "lm_head.weight"):
            continue
        target = weights[name]
        if name.endswith("layer_norm.weight"):
            # the RMS over the full width is the draft's * sqrt(half / width) while the rest is near zero
            scale = math.sqrt(large["d_model"] / half)
            target[:] = 1 / scale
            target[:half] = value / np.float32(scale)
        elif name.endswith("relative_attention_bias.weight"):
            target[:, : value.shape[1]] = value
        elif name.endswith((".q.weight", ".k.weight", ".v.weight", "wi.weight")):
            rows = inner_half if not name.endswith("wi.weight") else ff_half
            target[:rows, :] = 0.0  # the draft's heads and units read the draft's half only
            target[:rows, :half] = value
        elif name.endswith((".o.weight", "wo.weight")):
            cols = inner_half if name.endswith(".o.weight") else ff_half
            target[:half, :cols] = value  # the draft's heads and units write its half at full scale
            target[half:, :cols] = 0.0
        else:
            raise ValueError(f"unexpected draft tensor {name}")
    _save(out, weights, large, vocab, draft_dir.parent / "tokenizer")


def _save(out: Path, weights: dict[str, np.ndarray], shape: dict[str, int], vocab: int,
          tokenizer_dir: Path) -> None:
    from safetensors.numpy import save_file
    from transformers import T5Config

    from specdec_core.tokenizer import load_tokenizer

    config = T5Config(vocab_size=vocab, d_model=shape["d_model"], d_kv=D_KV, d_ff=shape["d_ff"],
                      num_layers=shape["layers"], num_decoder_layers=shape["layers"],
                      num_heads=shape["num_heads"], relative_attention_num_buckets=BUCKETS,
                      relative_attention_max_distance=MAX_DISTANCE, feed_forward_proj="relu",
                      tie_word_embeddings=False, scale_decoder_outputs=False, dropout_rate=0.0, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    config.save_pretrained(out)
    # T5Config ties a relu model's head whatever it is told; the file must say the head is its own
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(saved | {"tie_word_embeddings": False}, indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(tokenizer_dir).save_pretrained(out)


def source_lines() -> list[str]:
    """The standard library's Python source (tests excluded), one stripped line each: ~9 MB of
    text that ships with every Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines.extend(line.strip() for line in text.splitlines() if len(line.strip()) > 20)
    return lines


def _train_tokenizer(out: Path, pieces: int) -> Path:
    """T5's layout: pad 0, eos 1, unk 2, the pieces (32,000), then 100 sentinels ``<extra_id_N>``."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # ten lines a piece is plenty (all of them for 32,000); a toy vocabulary trains in seconds
        sentence_iterator=iter(source_lines()[: 10 * pieces]), model_writer=model, vocab_size=pieces,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    (out / "spiece.model").write_bytes(model.getvalue())
    config: dict[str, Any] = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>",
                              "pad_token": "<pad>", "extra_ids": SENTINELS, "model_max_length": 512}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
