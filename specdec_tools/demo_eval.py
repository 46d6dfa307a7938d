"""Measure the bundled demo pair: sizes, per-token decode cost, greedy acceptance, accuracy.

    python -m specdec_tools.demo_eval                       # the repository's models/demo-*
    python -m specdec_tools.demo_eval --json figures.json

Everything runs in-process on ``ModelEngine``, the code the services run: cached greedy
decoding for cost and accuracy, and a small greedy speculative loop (draft proposes k,
target verifies in one pass, both roll back) for acceptance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specdec_core import blas

blas.preload()  # OpenBLAS goes global before anything imports MLX (see specdec_core.blas)

from specdec_core.checkpoint import LoadedModel, load_model
from specdec_core.engine import ModelEngine
from specdec_core.sampling import SamplingParams
from specdec_core.tokenizer import load_tokenizer
from specdec_tools import demo_task

MODELS = Path(__file__).resolve().parents[1] / "models"  # the repository's committed pair
GREEDY = SamplingParams()
MAX_NEW_TOKENS = 24  # the longest answer is 10 tokens


@dataclass
class Speculation:
    tokens: list[int]  # the generated tokens, EOS included when it came
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted by the target
    target_passes: int = 0


def speculate_greedy(
    draft: ModelEngine, target: ModelEngine, prompt_ids: list[int], k: int, max_new_tokens: int = MAX_NEW_TOKENS
) -> Speculation:
    """Greedy speculative decoding in one process: the draft proposes k tokens greedily, the
    target scores them in one pass, the prefix equal to the target's argmax is kept plus the
    target's own next token, and both sessions roll back to that. The output equals the
    target's greedy output."""
    eos = target.args.eos_token_id
    d, t = draft.start(prompt_ids), target.start(prompt_ids)
    result = Speculation(tokens=[])
    while len(result.tokens) < max_new_tokens:
        base = t.length  # both sessions hold the same tokens here
        proposal = draft.propose(d, min(k, max_new_tokens - len(result.tokens)), GREEDY, seed=0)
        n = len(proposal.tokens)
        t.tokens.extend(proposal.tokens)
        verdict = target.verify(t, n, GREEDY, seed=0, draft_distributions=[])
        result.target_passes += 1
        accepted = 0
        while accepted < n and proposal.tokens[accepted] == verdict.argmax[accepted]:
            accepted += 1
        result.proposed += n
        result.accepted += accepted
        new = proposal.tokens[:accepted] + [verdict.argmax[accepted]]
        if eos in new:
            new = new[: new.index(eos) + 1]
        new = new[: max_new_tokens - len(result.tokens)]
        result.tokens.extend(new)
        if result.tokens[-1] == eos:
            break
        for state in (d, t):
            state.rollback_to(base + accepted)
            state.tokens.extend(new[accepted:])
    return result


def greedy_decode(
    engine: ModelEngine, prompt_ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS
) -> tuple[list[int], list[float]]:
    """Plain cached greedy decoding; returns the tokens and the seconds each decoder step took."""
    state = engine.start(prompt_ids)
    tokens: list[int] = []
    step_seconds: list[float] = []
    for _ in range(max_new_tokens):
        begin = time.perf_counter()
        logits = engine.forward(state, 1)[0]
        token = int(logits.argmax())
        step_seconds.append(time.perf_counter() - begin)
        tokens.append(token)
        state.tokens.append(token)
        if token == engine.args.eos_token_id:
            break
    return tokens, step_seconds


@dataclass
class ModelFigures:
    path: str
    parameters: int
    parameter_bytes: int
    checkpoint_bytes: int
    dtype: str
    decode_ms_per_token: float = 0.0  # median cached greedy decoder step
    heldout_exact_match: float = 0.0


@dataclass
class Figures:
    prompts: int
    k: int
    draft: ModelFigures
    target: ModelFigures
    cost_ratio: float = 0.0  # target / draft per-token decode cost
    acceptance: float = 0.0  # accepted / proposed draft tokens, greedy, on held-out prompts
    mean_accepted_per_pass: float = 0.0  # accepted draft tokens per target forward pass
    tokens_per_target_pass: float = 0.0  # generated tokens per target forward pass
    speculative_matches_target: bool = True  # every speculative output equals target greedy
    examples: list[dict[str, Any]] = field(default_factory=list)
    draft_mistakes: list[dict[str, Any]] = field(default_factory=list)  # the first few


def model_figures(loaded: LoadedModel) -> ModelFigures:
    from mlx.utils import tree_flatten

    return ModelFigures(
        path=str(loaded.path),
        parameters=loaded.num_parameters,
        parameter_bytes=sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters())),
        checkpoint_bytes=sum(f.stat().st_size for f in loaded.path.iterdir() if f.is_file()),
        dtype=loaded.dtype,
    )


def evaluate(draft_dir: str, target_dir: str, prompts: int = 200, k: int = 5, seed: int = 1234) -> Figures:
    draft_loaded, target_loaded = load_model(draft_dir), load_model(target_dir)
    draft, target = ModelEngine(draft_loaded), ModelEngine(target_loaded)
    tokenizer = load_tokenizer(target_dir)
    figures = Figures(prompts=prompts, k=k, draft=model_figures(draft_loaded),
                      target=model_figures(target_loaded))
    numbers = demo_task.eval_numbers(prompts, seed)
    warmup = tokenizer(demo_task.prompt_for(numbers[0])).input_ids
    greedy_decode(draft, warmup)
    greedy_decode(target, warmup)

    step_seconds: dict[str, list[float]] = {"draft": [], "target": []}
    correct = {"draft": 0, "target": 0}
    proposed = accepted = passes = generated = 0
    for i, number in enumerate(numbers):
        prompt = demo_task.prompt_for(number)
        ids = tokenizer(prompt).input_ids
        answers = {}
        for name, engine in (("draft", draft), ("target", target)):  # interleaved: same load
            tokens, seconds = greedy_decode(engine, ids)
            step_seconds[name].extend(seconds)
            answers[name] = tokenizer.decode(tokens, skip_special_tokens=True)
            correct[name] += demo_task.is_correct(prompt, answers[name])
            if name == "target":
                target_tokens = tokens
        spec = speculate_greedy(draft, target, ids, k)
        figures.speculative_matches_target &= spec.tokens == target_tokens
        proposed += spec.proposed
        accepted += spec.accepted
        passes += spec.target_passes
        generated += len(spec.tokens)
        example = {"prompt": prompt, "target": answers["target"], "draft": answers["draft"],
                   "expected": demo_task.number_to_words(number)}
        if i < 5:
            figures.examples.append(example)
        if example["draft"] != example["expected"] and len(figures.draft_mistakes) < 5:
            figures.draft_mistakes.append(example)

    figures.draft.decode_ms_per_token = 1e3 * statistics.median(step_seconds["draft"])
    figures.target.decode_ms_per_token = 1e3 * statistics.median(step_seconds["target"])
    figures.draft.heldout_exact_match = correct["draft"] / prompts
    figures.target.heldout_exact_match = correct["target"] / prompts
    figures.cost_ratio = figures.target.decode_ms_per_token / figures.draft.decode_ms_per_token
    figures.acceptance = accepted / max(proposed, 1)
    figures.mean_accepted_per_pass = accepted / max(passes, 1)
    figures.tokens_per_target_pass = generated / max(passes, 1)
    return figures


def report(figures: Figures) -> str:
    lines = []
    for name, m in (("draft", figures.draft), ("target", figures.target)):
        lines.append(
            f"{name:6s} {m.parameters:>10,} params  {m.parameter_bytes / 1e6:6.2f} MB ({m.dtype})  "
            f"dir {m.checkpoint_bytes / 1e6:6.2f} MB  decode {m.decode_ms_per_token:6.2f} ms/token  "
            f"held-out exact match {m.heldout_exact_match:6.1%}"
        )
    lines.append(f"cost ratio target/draft (median cached greedy step): {figures.cost_ratio:.1f}x")
    lines.append(
        f"greedy acceptance at k={figures.k}: {figures.acceptance:.3f} "
        f"({figures.mean_accepted_per_pass:.2f} draft tokens accepted and "
        f"{figures.tokens_per_target_pass:.2f} tokens generated per target pass; "
        f"speculative output == target greedy: {figures.speculative_matches_target})"
    )
    lines.append(f"on {figures.prompts} held-out prompts, e.g. (the last two: draft mistakes, if any):")
    for ex in figures.examples[:3] + figures.draft_mistakes[:2]:
        lines.append(f"  {ex['prompt']!r} -> target {ex['target']!r}, draft {ex['draft']!r}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m specdec_tools.demo_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--draft", default=str(MODELS / "demo-draft"), help="draft checkpoint directory")
    parser.add_argument("--target", default=str(MODELS / "demo-target"), help="target checkpoint directory")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts to run")
    parser.add_argument("-k", "--num-draft", type=int, default=5, help="draft tokens per speculative step")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    figures = evaluate(opts.draft, opts.target, opts.prompts, opts.num_draft)
    print(report(figures))
    if opts.json:
        Path(opts.json).write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
