"""Train the bundled demo pair from nothing: a tokenizer, a tiny draft T5 and a larger target T5
that spell numbers in English words (``spell 4512`` -> ``four thousand five hundred twelve``).

    specdec-train-demo --out models          # the committed recipe: models/demo-draft, demo-target
    specdec-train-demo --quick --out /tmp/x  # a smoke run in seconds (models that spell nothing)

Both models are v1.1-style T5 (gated-gelu, untied lm head) trained with MLX: AdamW,
teacher forcing, cross-entropy over the answer tokens with padding masked. On a CPU a
decoder step costs mostly per-layer overhead, so the draft has one 32-wide decoder layer and
the target six 128-wide ones (the encoders run once per prompt and barely count). Seeds
are fixed; the data come from ``demo_task``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from specdec_core import blas

blas.preload()  # OpenBLAS goes global before anything imports MLX (see specdec_core.blas)


# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from specdec_core.checkpoint import LoadedModel, save_model
from specdec_core.t5 import T5, DecoderLayer, ModelArgs
from specdec_core.tokenizer import load_tokenizer
from specdec_tools import demo_task

DRAFT_NAME = "demo-draft"
TARGET_NAME = "demo-target"


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: dict[str, Any]  # ModelArgs fields besides the vocabulary and special ids
    steps: int
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 100  # shorter warmups sometimes left the models stuck near loss 1
    weight_decay: float = 0.01
    seed: int = 0
    dtype: str = "float32"  # how the checkpoint is stored: both together are ~10 MB


# The task is easy: even this draft spells ~99% of held-out numbers after 500 steps. It gets
# 300, so it is fast and visibly imperfect, and the target corrects it now and then.
DRAFT = Recipe(
    name=DRAFT_NAME,
    architecture=dict(d_model=32, d_kv=8, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=1),
    steps=300,
    learning_rate=2e-3,
    seed=1,
)
# Narrow and deep: a decoder step costs ~6 layers of work; 16-wide heads keep the unscaled
# T5 attention trainable under AdamW (32-wide heads stalled at 1e-3 and diverged at 2e-3).
TARGET = Recipe(
    name=TARGET_NAME,
    architecture=dict(d_model=128, d_kv=16, num_heads=8, d_ff=384, num_layers=2, num_decoder_layers=6),
    steps=600,
    learning_rate=1e-3,
    seed=2,
)
# --quick: the same code path, a few steps, to check the tool end to end.
QUICK_STEPS = 20
QUICK_BATCH = 16


def model_args(recipe: Recipe, vocab_size: int) -> ModelArgs:
    return ModelArgs(
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",
        scale_decoder_outputs=False,
        untied_lm_head=True,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        **recipe.architecture,
    )


def hf_config(args: ModelArgs) -> dict[str, Any]:
    """config.json in Hugging Face's T5 vocabulary (``ModelArgs.from_dict`` reads it back)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": args.vocab_size,
        "d_model": args.d_model,
        "d_kv": args.d_kv,
        "d_ff": args.d_ff,
        "num_layers": args.num_layers,
        "num_decoder_layers": args.num_decoder_layers,
        "num_heads": args.num_heads,
        "relative_attention_num_buckets": args.relative_attention_num_buckets,
        "relative_attention_max_distance": args.relative_attention_max_distance,
        "layer_norm_epsilon": args.layer_norm_epsilon,
        "feed_forward_proj": args.feed_forward_proj,
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "tie_word_embeddings": False,
        "scale_decoder_outputs": False,
        "dropout_rate": 0.0,
        "is_encoder_decoder": True,
        "decoder_start_token_id": args.decoder_start_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
    }


def init_model(args: ModelArgs, seed: int) -> T5:
    mx.random.seed(seed)
    model = T5(args)
    # T5 attention is unscaled: it folds 1/sqrt(d_kv) into the query initialisation.
    for stack in (model.encoder_layers, model.decoder_layers):
        for layer in stack:
            attns = [layer.self_attn] + ([layer.cross_attn] if isinstance(layer, DecoderLayer) else [])
            for attn in attns:
                attn.q.weight = attn.q.weight * (args.d_kv**-0.5)
    mx.eval(model.parameters())
    return model


class Batches:
    """Training batches of the demo task, padded with 0 to fixed lengths (one compiled step
    shape); deterministic for a seed."""

    def __init__(self, tokenizer: Any, batch_size: int, seed: int):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.prompt_tokens = len(tokenizer(demo_task.prompt_for(demo_task.MAX_NUMBER)).input_ids)
        # Words tokenize on their own (pieces never cross spaces), so the longest answer is the
        # longest "<0..999> thousand <1..999>" plus EOS.
        pieces = [len(ids) - 1 for ids in tokenizer([demo_task.number_to_words(n) for n in range(1000)]).input_ids]
        thousand = len(tokenizer("thousand").input_ids) - 1
        self.answer_tokens = max(pieces) + thousand + max(pieces[1:]) + 1

    @staticmethod
    def _pad(rows: list[list[int]], length: int) -> np.ndarray:
        out = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def next(self) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        numbers = demo_task.sample_numbers(self.rng, self.batch_size, held_out=False)
        prompts = [demo_task.prompt_for(int(n)) for n in numbers]
        answers = [demo_task.number_to_words(int(n)) for n in numbers]
        inputs = self._pad(self.tokenizer(prompts).input_ids, self.prompt_tokens)
        labels = self._pad(self.tokenizer(answers).input_ids, self.answer_tokens)
        # Teacher forcing: the decoder reads [start] + labels[:-1] and predicts labels.
        decoder_inputs = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)
        return (
            mx.array(inputs),
            mx.array((inputs != 0).astype(np.int32)),
            mx.array(decoder_inputs),
            mx.array(labels),
        )


def loss_fn(
    model: T5, inputs: mx.array, mask: mx.array, decoder_inputs: mx.array, labels: mx.array
) -> mx.array:
    encoded = model.encode(inputs, mask)
    logits = model.decode(decoder_inputs, encoder_output=encoded, encoder_mask=mask)  # (B, T, V)
    weights = (labels != 0).astype(mx.float32)  # pad is 0; every answer ends in EOS (1)
    losses = nn.losses.cross_entropy(logits, labels, reduction="none")
    return (losses * weights).sum() / weights.sum()


def schedule(recipe: Recipe) -> Callable[[mx.array], mx.array]:
    warmup = min(recipe.warmup_steps, max(1, recipe.steps // 2))
    return optim.join_schedules(
        [
            optim.linear_schedule(recipe.learning_rate / 100, recipe.learning_rate, warmup),
            optim.cosine_decay(recipe.learning_rate, max(1, recipe.steps - warmup), recipe.learning_rate / 20),
        ],
        [warmup],
    )


def train(recipe: Recipe, tokenizer: Any, log_every: int, clock_start: float) -> T5:
    args = model_args(recipe, len(tokenizer))
    model = init_model(args, recipe.seed)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"[{recipe.name}] {params:,} parameters, {recipe.steps} steps of {recipe.batch_size}", flush=True)
    optimizer = optim.AdamW(learning_rate=schedule(recipe), weight_decay=recipe.weight_decay)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step_fn(*batch: mx.array) -> mx.array:
        loss, grads = value_and_grad(model, *batch)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step_fn, inputs=state, outputs=state)
    batches = Batches(tokenizer, recipe.batch_size, seed=1000 + recipe.seed)
    running = None
    for i in range(1, recipe.steps + 1):
        loss = step(*batches.next())
        mx.eval(state, loss)
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if i % log_every == 0 or i == recipe.steps:
            print(
                f"[{recipe.name}] step {i:5d}/{recipe.steps}  loss {running:.4f}  "
                f"lr {optimizer.learning_rate.item():.2e}  {time.perf_counter() - clock_start:6.0f}s",
                flush=True,
            )
    return model


def greedy_answers(model: T5, tokenizer: Any, prompts: list[str], max_tokens: int = 16) -> list[str]:
    """Batched greedy decoding without a cache (fine for answers of a dozen tokens)."""
    rows = tokenizer(prompts).input_ids
    inputs = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    for i, row in enumerate(rows):
        inputs[i, : len(row)] = row
    mask = mx.array((inputs != 0).astype(np.int32))
    encoded = model.encode(mx.array(inputs), mask)
    tokens = np.zeros((len(rows), 1), np.int32)
    done = np.zeros(len(rows), bool)
    for _ in range(max_tokens):
        logits = model.decode(mx.array(tokens), encoder_output=encoded, encoder_mask=mask, num_logits=1)
        nxt = np.array(mx.argmax(logits[:, -1], axis=-1)).astype(np.int32)
        nxt[done] = 0
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        done |= nxt == 1
        if done.all():
            break
    return tokenizer.batch_decode(tokens[:, 1:].tolist(), skip_special_tokens=True)


def heldout_accuracy(model: T5, tokenizer: Any, count: int) -> float:
    numbers = demo_task.eval_numbers(count)
    prompts = [demo_task.prompt_for(n) for n in numbers]
    answers = greedy_answers(model, tokenizer, prompts)
    return float(np.mean([demo_task.is_correct(p, a) for p, a in zip(prompts, answers, strict=True)]))


def save(model: T5, recipe: Recipe, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write config.json, the tokenizer and model.safetensors (in the recipe's dtype) the way
    ``specdec_core.checkpoint.save_model`` does, so ``load_model`` reads the directory back."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.args), indent=2) + "\n")
    model.set_dtype(getattr(mx, recipe.dtype))
    loaded = LoadedModel(model, model.args, out_dir, f"specdec-train-demo ({recipe.name})", recipe.dtype, None)
    return save_model(loaded, out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec-train-demo",
        description="Train the demo draft/target pair (spell numbers in English words) from nothing.",
    )
    parser.add_argument("--out", default="models", help="writes OUT/demo-draft and OUT/demo-target")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps per model: a smoke test of the tool, not a usable pair")
    parser.add_argument("--eval-prompts", type=int, default=200,
                        help="held-out prompts for the accuracy printed after each model (0: skip)")
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    recipes = [DRAFT, TARGET]
    log_every = 100
    if opts.quick:
        recipes = [replace(r, steps=QUICK_STEPS, batch_size=QUICK_BATCH) for r in recipes]
        log_every = 10
        opts.eval_prompts = min(opts.eval_prompts, 8)
    out = Path(opts.out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = demo_task.train_tokenizer(Path(tmp) / "tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir)
        print(f"tokenizer: {len(tokenizer)} pieces, digits split", flush=True)
        for recipe in recipes:
            model = train(recipe, tokenizer, log_every, start)
            if opts.eval_prompts:
                accuracy = heldout_accuracy(model, tokenizer, opts.eval_prompts)
                print(f"[{recipe.name}] held-out exact match {accuracy:.1%} "
                      f"({opts.eval_prompts} prompts, float32)", flush=True)
            path = save(model, recipe, tokenizer_dir, out / recipe.name)
            print(f"[{recipe.name}] saved to {path} ({recipe.dtype})", flush=True)
    print(f"done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
