"""``specdec-bench``'s command line: presets, flags, and the run that writes json, md and png."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .cells import SYSTEMS, Settings
from .machine import limit_threads, machine, machine_line
from .report import markdown, plot
from .runner import run_workload
from .workloads import DEMO_DIR, load_workloads

FULL_KS = ("1", "2", "3", "5", "8", "auto")
QUICK_KS = ("1", "3", "auto")
FULL = dict(prompts=8, repeats=3)
QUICK = dict(prompts=2, repeats=2, max_tokens=24)

logger = logging.getLogger("specdec.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec-bench",
        description="Benchmark speculative decoding through the services against the target alone, the "
                    "same loop in one process, and transformers' assisted generation.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['prompts']} prompts, {QUICK['repeats']} repeats, k "
                             f"{'/'.join(QUICK_KS)}, max_tokens {QUICK['max_tokens']} "
                             "(under 5 minutes on 2 cores)")
    parser.add_argument("--workloads", default="synthetic,demo", help="comma-separated: synthetic, demo")
    parser.add_argument("--ks", help=f"comma-separated k values and/or auto (default {','.join(FULL_KS)})")
    parser.add_argument("--temperatures", default="0,1", help="comma-separated temperatures (default 0,1)")
    parser.add_argument("--prompts", type=int, help="prompts per workload (default 8; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed repeats of every prompt (default 3; quick 2)")
    parser.add_argument("--max-tokens", type=int, help="cap on each workload's max_tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenBLAS/torch threads in every process (0: the libraries' defaults)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "as-stored"],
                        help="dtype MLX loads both models in (transformers always runs float32)")
    parser.add_argument("--pair-dir", type=Path,
                        help="where the synthetic pair is cached (default OUT/synthetic-pair)")
    parser.add_argument("--tiny", action="store_true", help="a tiny synthetic pair (for smoke tests)")
    parser.add_argument("--models-dir", type=Path, default=DEMO_DIR,
                        help="where demo-draft and demo-target live (default: the repository's models/)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.logging.set_verbosity_error()
    preset = QUICK if args.quick else FULL
    settings = Settings(
        ks=[k.strip() for k in (args.ks or ",".join(QUICK_KS if args.quick else FULL_KS)).split(",")],
        temperatures=[float(t) for t in args.temperatures.split(",")],
        prompts=args.prompts or preset["prompts"],
        repeats=args.repeats or preset["repeats"],
        max_tokens=args.max_tokens or preset.get("max_tokens"),
        threads=args.threads,
        dtype=None if args.dtype == "as-stored" else args.dtype,
    )
    for k in settings.ks:
        if k != "auto" and not (k.isdigit() and 1 <= int(k) <= 16):
            raise SystemExit(f"--ks: {k!r} is not a k in 1..16 or 'auto'")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = limit_threads(settings.threads)
    info = machine(settings)
    logger.info("%s", machine_line(info))
    started = time.perf_counter()
    pair_dir = args.pair_dir or out / ("synthetic-pair-tiny" if args.tiny else "synthetic-pair")
    workloads, skipped = load_workloads([w.strip() for w in args.workloads.split(",") if w.strip()], settings,
                                        pair_dir, args.tiny, args.models_dir)
    report: dict[str, Any] = {
        "machine": info,
        "settings": {**asdict(settings), "quick": args.quick, "tiny": args.tiny},
        "systems": SYSTEMS,
        "skipped": skipped,
        "workloads": [],
    }
    for workload in workloads:
        workload.results = run_workload(workload, settings, env)
        report["workloads"].append({
            "name": workload.name, "about": workload.about, "draft": str(workload.draft),
            "target": str(workload.target), "prompts": workload.prompts, "max_tokens": workload.max_tokens,
            "results": workload.results,
        })
    report["wall_s"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(report))
    plot(report, out / "bench.png")
    logger.info("wrote %s, %s and %s (%.0f s)", out / "bench.json", out / "bench.md", out / "bench.png",
                report["wall_s"])
    print((out / "bench.md").read_text())
    return 0
