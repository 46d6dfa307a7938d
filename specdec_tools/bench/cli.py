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

from .cells import BASELINE_OF, SYSTEMS, Settings
from .machine import limit_threads, machine, machine_line
from .progress import route_logs
from .report import markdown, plot, verdict, workload_entry, write_outputs
from .runner import rederive, run_workload
from .serving import FULL_REQUESTS, QUICK_REQUESTS, serving_main, serving_settings
from .workloads import CUSTOM_MAX_TOKENS, DEMO_DIR, T5_PAIR_DIR, WORKLOADS, CustomPair, load_workloads

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
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="output directory (default bench-out)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['prompts']} prompts, {QUICK['repeats']} repeats, k "
                             f"{'/'.join(QUICK_KS)}, max_tokens {QUICK['max_tokens']} "
                             "(under 5 minutes on 2 cores); with --concurrency "
                             f"{QUICK_REQUESTS} requests per client, max_tokens {QUICK['max_tokens']}")
    parser.add_argument("--workloads",
                        help=f"comma-separated: {', '.join(WORKLOADS)} (default synthetic,demo; custom when "
                             "--draft-model and --target-model are given)")
    parser.add_argument("--draft-model", metavar="DIR|NAME",
                        help="your draft for the custom workload: a checkpoint directory (Hugging Face or "
                             "specdec-convert format) or a hub name, loaded as the services load --model")
    parser.add_argument("--target-model", metavar="DIR|NAME", help="your target for the custom workload (as above)")
    parser.add_argument("--prompts-file", type=Path, metavar="FILE",
                        help="the custom workload's prompts: one per line, or JSON Lines with a \"prompt\" "
                             "field; the first --prompts of them are used (default 8; quick 2), each "
                             f"generating up to --max-tokens (default {CUSTOM_MAX_TOKENS}; quick 24)")
    parser.add_argument("--ks", help=f"comma-separated k values and/or auto (default {','.join(FULL_KS)}; "
                                     "with --concurrency: a speculative phase per k, default auto)")
    parser.add_argument("--systems",
                        help=f"comma-separated systems to run (default all: {', '.join(SYSTEMS)}); a "
                             "speculative system's baseline is added when missing, and (c) with its target "
                             "always runs (the cost ratio is measured in process)")
    parser.add_argument("--temperatures", help="comma-separated temperatures (default 0,1; with --concurrency 0)")
    parser.add_argument("--prompts", type=int, help="prompts per workload (default 8; quick 2, but 8 with "
                                                    "--concurrency)")
    parser.add_argument("--repeats", type=int, help="timed repeats of every prompt (default 3; quick 2)")
    parser.add_argument("--max-tokens", type=int, help="cap on each workload's max_tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenBLAS/torch threads in every process "
                             "(default 1; 0: the libraries' defaults)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "as-stored"],
                        help="dtype MLX loads both models in "
                             "(default float32; transformers always runs float32)")
    parser.add_argument("--pair-dir", type=Path,
                        help="where the synthetic pair is cached (default OUT/synthetic-pair)")
    parser.add_argument("--t5-pair-dir", type=Path, default=T5_PAIR_DIR,
                        help="where the T5-shaped pairs (workloads t5, t5-agree, t5-lowaccept; t5-costly in DIR-costly) are cached: ~3 GB "
                             f"per agreement level (default {T5_PAIR_DIR})")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny synthetic and T5-shaped pairs (for smoke tests)")
    parser.add_argument("--models-dir", type=Path, default=DEMO_DIR,
                        help="where demo-draft and demo-target live (default: the repository's models/)")
    parser.add_argument("--report-from", type=Path, metavar="BENCH_JSON",
                        help="run nothing: derive the figures of a bench.json made before again from its stored "
                             "runs and write bench.json, bench.md and bench.png into --out")
    parser.add_argument("--log-level", default="INFO",
                        help="the benchmark's own log level (default INFO)")
    parser.add_argument("--drafting", action="store_true",
                        help="compare draft methods instead: --draft-methods drafts against the target alone, "
                             "through the services; writes drafting.json and drafting.md (e.g. --workloads copy)")
    parser.add_argument("--draft-methods", default="model,ngram,hybrid",
                        help="with --drafting: comma-separated draft methods (default model,ngram,hybrid)")
    parser.add_argument("--draft-flags", default="",
                        help="with --drafting: extra flags for every draft, "
                             "e.g. \"--ngram-max 3 --hybrid-min-match 2\" (default none)")
    parser.add_argument("--concurrency", metavar="C,C,...",
                        help="the serving benchmark instead: at each number of concurrent streaming clients, "
                             "speculative and the target alone through one set of services; writes "
                             "serving.json, serving.md and serving.png (default workload synthetic)")
    parser.add_argument("--requests", type=int,
                        help=f"with --concurrency: timed requests per client at each concurrency (default "
                             f"{FULL_REQUESTS}; quick {QUICK_REQUESTS})")
    parser.add_argument("--kv-bits", metavar="SETTING,...",
                        help="with --concurrency: the target's K/V cache settings side by side instead (none = the "
                             "model's dtype, 8, 4; the first is the baseline), e.g. none,8,4: a target and an "
                             "orchestrator per setting beside one draft; greedy agreement with the baseline on "
                             "every prompt, the serving phases of each setting, bytes per session; writes "
                             "kv_cache.json and kv_cache.md")
    parser.add_argument("--worker-flags", default="",
                        help="with --concurrency: extra flags for draft and target, e.g. "
                             "\"--max-batch 8 --batch-wait-ms 2\" (default none)")
    parser.add_argument("--orchestrator-flags", default="",
                        help="with --concurrency: extra flags for the orchestrator, e.g. \"--call-timeout 600\" "
                             "for a target whose pass takes over a minute (default none)")
    return parser


def chosen_systems(flag: str | None) -> list[str]:
    """``--systems``, checked, with the baseline of every speculative system chosen (the speedups need it)."""
    if not flag:
        return list(SYSTEMS)
    chosen = [name.strip() for name in flag.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown system {unknown[0]!r}; choose from {', '.join(SYSTEMS)}")
    # (c) and its target always run: the cost ratio c and the block cost are measured in process
    wanted = set(chosen) | {BASELINE_OF[name] for name in chosen if name in BASELINE_OF} | {
        "inproc-spec", "inproc-target"}
    return [name for name in SYSTEMS if name in wanted]


def workload_names(args: argparse.Namespace) -> tuple[list[str], CustomPair | None]:
    """The workloads to run, and the user's pair when the custom flags are given (all three)."""
    given = {"--draft-model": args.draft_model, "--target-model": args.target_model,
             "--prompts-file": args.prompts_file}
    custom = None
    if any(given.values()):
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise SystemExit(f"the custom workload needs {', '.join(missing)} too")
        custom = CustomPair(args.draft_model, args.target_model, args.prompts_file)
    default = "custom" if custom else ("synthetic" if args.concurrency else "synthetic,demo")
    names = [w.strip() for w in (args.workloads or default).split(",") if w.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")
    if "custom" in names and not custom:
        raise SystemExit("the custom workload needs --draft-model, --target-model and --prompts-file")
    if custom and "custom" not in names:
        raise SystemExit("--draft-model/--target-model/--prompts-file are for the custom workload; add custom "
                         "to --workloads")
    return names, custom


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper(), logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.report_from:
        report = rederive(json.loads(args.report_from.read_text()))
        args.out.mkdir(parents=True, exist_ok=True)
        route_logs(args.out, level)
        return write_outputs(args.out, "bench", report, markdown(report), plot, verdict(report))
    preset = QUICK if args.quick else FULL
    if args.concurrency and args.drafting:
        raise SystemExit("--concurrency and --drafting are separate benchmarks; pick one")
    if args.kv_bits:
        from .kv_cache import parse_kv_bits

        parse_kv_bits(args.kv_bits)  # checked now, before any pair is built
        if not args.concurrency:
            raise SystemExit("--kv-bits compares the K/V cache settings through the serving benchmark: give "
                             "--concurrency too (e.g. --concurrency 1,8)")
    # the serving mode checks its flags now, before any pair is built; it takes every prompt in turn
    # (prompts cost nothing there) and is greedy unless asked
    serving = serving_settings(args) if args.concurrency else None
    settings = Settings(
        ks=serving.ks if serving else [
            k.strip() for k in (args.ks or ",".join(QUICK_KS if args.quick else FULL_KS)).split(",")],
        temperatures=[float(t) for t in (args.temperatures or ("0" if serving else "0,1")).split(",")],
        prompts=args.prompts or (FULL["prompts"] if serving else preset["prompts"]),
        repeats=args.repeats or preset["repeats"],
        max_tokens=args.max_tokens or preset.get("max_tokens"),
        threads=args.threads,
        dtype=None if args.dtype == "as-stored" else args.dtype,
        systems=chosen_systems(args.systems),
    )
    for k in settings.ks:
        if k != "auto" and not (k.isdigit() and 1 <= int(k) <= 16):
            raise SystemExit(f"--ks: {k!r} is not a k in 1..16 or 'auto'")
    names, custom = workload_names(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = route_logs(out, level)  # the flags are checked: from here on the run writes into OUT
    env = limit_threads(settings.threads)
    info = machine(settings)
    logger.info("%s", machine_line(info))
    started = time.perf_counter()
    pair_dir = args.pair_dir or out / ("synthetic-pair-tiny" if args.tiny else "synthetic-pair")
    workloads, skipped = load_workloads(names, settings, pair_dir, args.tiny, args.models_dir, custom,
                                        args.t5_pair_dir)
    if args.drafting:
        from .drafting import drafting_main

        return drafting_main(args, settings, env, info, workloads, skipped, out, started)
    if serving and args.kv_bits:
        from .kv_cache import kv_cache_main

        return kv_cache_main(args, settings, serving, env, info, workloads, skipped, out, started)
    if serving:
        return serving_main(args, settings, serving, env, info, workloads, skipped, out, started)
    report: dict[str, Any] = {
        "machine": info,
        "settings": {**asdict(settings), "quick": args.quick, "tiny": args.tiny},
        "systems": SYSTEMS,
        "skipped": skipped,
        "workloads": [],
    }
    for workload in workloads:
        workload.results = run_workload(workload, settings, env, log_dir)
        report["workloads"].append(workload_entry(workload, workload.results))
    report["wall_s"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return write_outputs(out, "bench", report, markdown(report), plot, verdict(report))
