#!/usr/bin/env python3
"""Paired A/B of the orchestrator's step transport: one stream per session (the default) against
a unary Propose/Verify call per step (``--unary-steps``).

Starts one draft and one target (``specdec_tools.bench.services.Services``) and two
orchestrators in front of them, one of each kind, then runs every prompt through both, in
alternating order, ``--rounds`` times. Each pair of runs (same prompt, same seed, back to back)
gives one ratio stream/unary of ms/token, so the machine's slow drifts cancel; the summary is
the median and mean ratio and how often the stream run was the faster one.

Usage: scripts/step_streams_ab.py PAIR_DIR [--workload synthetic] [--k 3] [--temperature 0]
       [--rounds 10] [--max-tokens 48]

PAIR_DIR holds ``draft/`` and ``target/`` (e.g. a ``specdec-bench`` pair directory such as
``bench-out/synthetic-pair``); the prompts are the workload's in specdec_tools/bench/prompts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from specdec_tools.bench.machine import limit_threads
from specdec_tools.bench.services import Services
from specdec_tools.bench.workloads import PROMPTS_FILE


def workload_prompts(name: str, count: int) -> list[str]:
    spec = json.loads(PROMPTS_FILE.read_text())
    entry = spec[name]
    prompts = entry.get("prompts") or spec[entry["prompts_from"]]["prompts"]
    return [p if isinstance(p, str) else p["prompt"] for p in prompts][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pair_dir", type=Path)
    parser.add_argument("--workload", default="synthetic")
    parser.add_argument("--k", default="3", help="num_draft: 1..16 or auto")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    prompts = workload_prompts(args.workload, args.prompts)
    services = Services(args.pair_dir / "draft", args.pair_dir / "target", "float32", limit_threads(1)).connect()
    try:
        for prompt in prompts:  # warm-up: first calls pay for allocation and lazy set-up
            for unary in (False, True):
                services.generate(prompt, 0, 8, args.k, args.temperature, 1, unary_steps=unary)
        ms: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for index, prompt in enumerate(prompts):
                order = (False, True) if (round_ + index) % 2 == 0 else (True, False)
                for unary in order:
                    run = services.generate(prompt, index, args.max_tokens, args.k, args.temperature,
                                            1000 * round_ + index, unary_steps=unary)
                    ms[unary].append(1e3 * run.wall_s / run.tokens)
    finally:
        services.close()
    ratios = [stream / unary for stream, unary in zip(ms[False], ms[True], strict=True)]
    print(f"{args.workload} k={args.k} T={args.temperature:g}: ms/token median stream "
          f"{statistics.median(ms[False]):.2f}, unary {statistics.median(ms[True]):.2f}; paired ratio "
          f"stream/unary median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f}; "
          f"stream faster in {sum(r < 1 for r in ratios)} of {len(ratios)} pairs")


if __name__ == "__main__":
    main()
