#!/usr/bin/env python3
"""Time the MLX T5 core on a small random checkpoint it builds itself.

(a) target-alone greedy decoding with the session cache (cross-attention K/V projected once),
(b) the same with cross-attention K/V re-projected from the encoder output every step (what
    mlx-examples' T5 port does), checked to produce the same tokens,
(c) one decoder pass over a block of k+1 tokens vs over one token (the verify step's cost).

    scripts/core_timing.py [--family v1_1] [--new-tokens 64] [--prompt-tokens 64] [--k 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from specdec_core import blas

blas.preload()  # OpenBLAS goes global before anything imports MLX (see specdec_core.blas)


# isort: split
import mlx.core as mx

from specdec_core.checkpoint import load_model
from specdec_core.kv_cache import DecoderCache
from specdec_core.t5 import T5
from specdec_core.tokenizer import load_tokenizer
from specdec_tools.tiny_checkpoints import build_t5, corpus_lines, train_tokenizer

SIZES = dict(d_model=256, d_kv=64, num_heads=4, d_ff=1024, num_layers=4)


def build_checkpoint(root: Path, family: str) -> Path:
    tokenizer_dir = train_tokenizer(root / "tokenizer")
    return build_t5(root / "model", tokenizer_dir, family, seed=0, **SIZES)


def prompt_ids(model_dir: Path, length: int) -> list[int]:
    """About ``length`` tokens of real text, ending with EOS like any tokenized prompt."""
    tokenizer = load_tokenizer(model_dir)
    ids: list[int] = []
    for line in corpus_lines():
        ids.extend(tokenizer(line, add_special_tokens=False).input_ids)
        if len(ids) >= length - 1:
            break
    return ids[: length - 1] + [tokenizer.eos_token_id]


Step = Callable[[T5, mx.array, DecoderCache, mx.array], mx.array]


def cached_step(model: T5, tokens: mx.array, cache: DecoderCache, encoder_output: mx.array) -> mx.array:
    return model.decode(tokens, cache=cache)


def recomputing_step(model: T5, tokens: mx.array, cache: DecoderCache, encoder_output: mx.array) -> mx.array:
    """Self-attention K/V cached, but cross-attention K/V projected again on every step."""
    cache.cross = [layer.cross_attn.project_kv(encoder_output) for layer in model.decoder_layers]
    return model.decode(tokens, cache=cache)


def compare_greedy(model: T5, prompt: list[int], new_tokens: int, repeats: int):
    """Greedy decoding of exactly ``new_tokens`` tokens (EOS does not stop it) with both
    variants in lockstep: two sessions over one encoder output, stepped alternately, so load
    from other processes hits both alike. Asserts both pick the same token at every step.
    Returns the tokens and the median seconds per decoder step of each variant."""
    encoder_output = model.encode(mx.array([prompt]))
    mx.eval(encoder_output)
    times: dict[Step, list[float]] = {cached_step: [], recomputing_step: []}
    outputs = []
    for run in range(repeats + 1):  # run 0 warms up
        caches = {step: model.make_cache(encoder_output) for step in times}
        tokens = [model.args.decoder_start_token_id]
        for i in range(new_tokens):
            order = list(times) if i % 2 == 0 else list(times)[::-1]
            picked = set()
            for step in order:
                start = time.perf_counter()
                logits = step(model, mx.array([tokens[-1:]]), caches[step], encoder_output)
                picked.add(int(mx.argmax(logits[0, -1]).item()))
                if run:
                    times[step].append(time.perf_counter() - start)
            assert len(picked) == 1, f"the two decoding variants disagree at step {i}: {picked}"
            tokens.append(picked.pop())
        outputs.append(tokens)
    assert all(t == outputs[0] for t in outputs), "greedy decoding is not deterministic"
    return outputs[0], statistics.median(times[cached_step]), statistics.median(times[recomputing_step])


def block_times(model: T5, prompt: list[int], k: int, prefix: int, repeats: int) -> tuple[float, float]:
    """Median time of one decoder pass over 1 token and over k+1 tokens after ``prefix``
    cached positions; the cache is rolled back after each pass (as after a rejected draft)."""
    cache = model.make_cache(model.encode(mx.array([prompt])))
    mx.eval(model.decode(mx.array([[model.args.decoder_start_token_id] + [5] * (prefix - 1)]), cache=cache))

    def once(n: int) -> float:
        start = time.perf_counter()
        mx.eval(model.decode(mx.array([[7] * n]), cache=cache))
        elapsed = time.perf_counter() - start
        cache.rollback_to(prefix)
        return elapsed

    for n in (1, k + 1):
        once(n)  # warm up
    ones, blocks = [], []
    for _ in range(repeats):  # interleaved, like compare_greedy
        ones.append(once(1))
        blocks.append(once(k + 1))
    return statistics.median(ones), statistics.median(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["v1_0", "v1_1"], default="v1_1")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=5, help="draft length; the block is k+1 tokens")
    parser.add_argument("--repeats", type=int, default=3, help="greedy runs (median over all steps)")
    parser.add_argument("--block-repeats", type=int, default=50)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp), args.family)
        loaded = load_model(model_dir)
        prompt = prompt_ids(model_dir, args.prompt_tokens)
    model = loaded.model

    tokens, cached_s, recomputed_s = compare_greedy(model, prompt, args.new_tokens, args.repeats)
    one_s, block_s = block_times(model, prompt, args.k, prefix=32, repeats=args.block_repeats)

    a = loaded.args
    print(f"BLAS: {blas.active_blas}")
    print(f"MLX {mx.__version__}, device {mx.default_device()}")
    print(f"model: random T5 {args.family}, d_model {a.d_model}, {a.num_layers}+{a.num_decoder_layers} "
          f"layers, d_ff {a.d_ff}, {a.num_heads} heads, vocab {a.vocab_size}, "
          f"{loaded.num_parameters / 1e6:.1f}M params, {loaded.dtype}")
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, median over {args.repeats} runs' steps; "
          f"block timings after 32 cached positions, median of {args.block_repeats}")
    print()
    rows = [
        ("(a) greedy, cross K/V once (ours)", f"{cached_s * 1e3:8.3f} ms/token", ""),
        ("(b) greedy, cross K/V every step", f"{recomputed_s * 1e3:8.3f} ms/token",
         f"{recomputed_s / cached_s:5.2f}x of (a)"),
        ("(c) decoder pass, 1 token", f"{one_s * 1e3:8.3f} ms", ""),
        (f"(c) decoder pass, block of k+1={args.k + 1}", f"{block_s * 1e3:8.3f} ms",
         f"{block_s / one_s:5.2f}x of 1 token"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value}  {ratio}")
    print(f"\n(a) and (b) produced the same {len(tokens) - 1} greedy tokens in every run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
