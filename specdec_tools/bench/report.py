"""The report: ``bench.md`` (tables) and ``bench.png`` (speedup vs k) from ``bench.json``'s content."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cells import BASELINE_OF, SYSTEMS
from .machine import machine_line

logger = logging.getLogger("specdec.bench")


def workload_entry(workload: Any, results: dict[str, Any]) -> dict[str, Any]:
    """One workload's part of a report's json: what it ran on, and its results."""
    return {"name": workload.name, "about": workload.about, "draft": str(workload.draft),
            "target": str(workload.target), "prompts": workload.prompts, "max_tokens": workload.max_tokens,
            "results": results}


def write_outputs(out: Path, stem: str, report: dict[str, Any], markdown_text: str,
                  plot_fn: Callable[[dict[str, Any], Path], None] | None = None, summary: str | None = None) -> int:
    """Write STEM.json, STEM.md (and STEM.png with ``plot_fn``) into ``out``; print ``summary`` and
    where the tables are, or (no summary) the markdown."""
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    written[0].write_text(json.dumps(report, indent=1) + "\n")
    written[1].write_text(markdown_text)
    if plot_fn is not None:
        written.append(out / f"{stem}.png")
        plot_fn(report, written[-1])
    logger.info("wrote %s (%.0f s)", ", ".join(str(p) for p in written), report["wall_s"])
    print(markdown_text if summary is None else f"{summary}\nEvery figure: {written[1]} (tables), {written[0]}")
    return 0


def verdict(report: dict[str, Any]) -> str:
    """The figures a run is for, per workload and temperature: speculative's speedup over the
    target alone at its best k (through the services; in process when they did not run), both
    sides' ms/token and tokens/s, the acceptance, and whether greedy output equalled the target's."""
    lines = ["Verdict:"]
    for workload in report["workloads"]:
        cells = workload["results"]["cells"]
        exact = workload["results"]["exact_greedy"]
        for temperature in sorted({c["temperature"] for c in cells}):
            spec = [c for c in cells if c["temperature"] == temperature and c["system"] == "services-spec"] or [
                c for c in cells if c["temperature"] == temperature and c["system"] == "inproc-spec"]
            if not spec:
                continue
            best = max(spec, key=lambda c: c.get("speedup") or 0.0)
            where = "through the services" if best["system"] == "services-spec" else "in process"
            alone = next(c for c in cells if c["temperature"] == temperature
                         and c["system"] == BASELINE_OF[best["system"]])
            line = (f"  {workload['name']} T={temperature:g}: speculative {where} runs {fmt(best.get('speedup'))}x "
                    f"the target alone at k={best['k']} ({best['ms_per_token']:.1f} vs {alone['ms_per_token']:.1f} "
                    f"ms/token: {1e3 / best['ms_per_token']:.1f} vs {1e3 / alone['ms_per_token']:.1f} tokens/s), "
                    f"acceptance {fmt(best.get('alpha'))}")
            if temperature == 0:
                unequal = [label for label, share in exact.items() if share < 1.0 and "transformers" not in label]
                line += ("; greedy output equals the target alone's in every cell" if not unequal
                         else f"; greedy output DIFFERS from the target alone's in {', '.join(unequal)}")
            lines.append(line)
    return "\n".join(lines) if len(lines) > 1 else "Verdict: no speculative cell ran"


def fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# specdec benchmark", "", machine_line(report["machine"]), "", "```", verdict(report), "```", ""]
    s = report["settings"]
    lines.append(f"Settings: {s['prompts']} prompts x {s['repeats']} repeats per cell, k in "
                 f"{', '.join(s['ks'])}, temperatures {', '.join(f'{t:g}' for t in s['temperatures'])}, "
                 f"MLX dtype {s['dtype'] or 'as stored'}{', quick' if s['quick'] else ''}; "
                 f"{report['wall_s']:.0f} s in all. Services: three subprocesses on loopback gRPC.")
    lines.append("")
    for name, reason in report.get("skipped", {}).items():
        lines += [f"## {name}", "", reason, ""]
    for workload in report["workloads"]:
        cells = {(c["temperature"], c["system"], c["k"]): c for c in workload["results"]["cells"]}
        floor = workload["results"]["empty_grpc_call"]
        lines += [f"## {workload['name']}: {workload['about']}", "",
                  f"draft `{workload['draft']}`, target `{workload['target']}`, max_tokens "
                  f"{workload['max_tokens']}. An empty gRPC call (health Check) from the bench to the target "
                  f"service: p50 {fmt(floor['wall_ms_p50'])} ms wall, {fmt(floor['cpu_ms'])} ms CPU (both "
                  "processes); a speculative step sends a Propose and a Verify (messages on the sessions' step streams; "
                  "(b''): two unary calls).", ""]
        skipped_systems = workload["results"].get("skipped_systems") or {}
        for reason in dict.fromkeys(skipped_systems.values()):
            systems = ", ".join(SYSTEMS[name] for name, why in skipped_systems.items() if why == reason)
            lines += [f"{systems}: {reason}", ""]
        for temperature in s["temperatures"]:
            derived = workload["results"]["per_temperature"][f"{temperature:g}"]

            def ms(system: str, t: float = temperature, table: dict = cells) -> str:
                return fmt(table.get((t, system, None), {}).get("ms_per_token"), 1)

            lines += [
                f"### T={temperature:g}", "",
                f"Target alone, ms/token: (a) services {ms('services-target')}, in-process "
                f"{ms('inproc-target')}, (e) transformers {ms('hf-target')}. Cost ratio c = "
                f"{fmt(derived['cost_ratio_c'], 3)} (draft {fmt(derived['draft_ms_per_token'])} ms/token, "
                f"target {fmt(derived['target_ms_per_pass'])} ms/pass, in process).", "",
                "| k | (b) services ms/tok | (c) in-proc ms/tok | (d) HF assisted ms/tok "
                "| (b) speedup vs (a) "
                "| (c) speedup vs in-proc target | (d) speedup vs (e) | (b) vs (d) | alpha | alpha_hat "
                "| tokens/target pass | gRPC ms/step | gRPC CPU ms/step | wire B/step | bound | block cost | predicted "
                "| (b') no pipelining ms/tok | (b)/(b') | (b)/(c) | (b'') unary steps ms/tok | (b)/(b'') "
                "| (b'') - (b) ms/step | ahead: drafted/step, used, wasted tok/step "
                "| k chosen (steps at k=0,1,..) |",
                "|---|" + "---:|" * 24,
            ]
            for k in s["ks"]:
                b = cells.get((temperature, "services-spec", k), {})  # {}: (b) left out (--systems)
                c = cells[(temperature, "inproc-spec", k)]
                d = cells.get((temperature, "hf-assisted", k), {"ms_per_token": None, "speedup": None})
                unary = cells.get((temperature, "services-unary", k), {})
                lines.append(
                    f"| {k} | {fmt(b.get('ms_per_token'), 1)} | {fmt(c['ms_per_token'], 1)} | "
                    f"{fmt(d['ms_per_token'], 1)} | {fmt(b.get('speedup'), 2, 'x')} | "
                    f"{fmt(c['speedup'], 2, 'x')} | {fmt(d['speedup'], 2, 'x')} | "
                    f"{fmt(b.get('vs_hf_assisted'), 2, 'x')} | {fmt((b or c).get('alpha'))} | "
                    f"{fmt((b or c).get('alpha_hat'))} | {fmt((b or c).get('tokens_per_target_pass'))} | "
                    f"{fmt(b.get('grpc_ms_per_step'))} | {fmt(b.get('grpc_cpu_ms_per_step'))} | "
                    f"{fmt(b.get('wire_bytes_per_step'), 0)} | "
                    f"{fmt(b.get('bound'), 2, 'x')} | {fmt(c.get('block_cost'), 2, 'x')} | "
                    f"{fmt(c.get('predicted'), 2, 'x')} | "
                    f"{fmt(cells.get((temperature, 'services-serial', k), {}).get('ms_per_token'), 1)} | "
                    f"{fmt(b.get('vs_serial'), 2, 'x')} | {fmt(b.get('vs_inproc_serial'), 2, 'x')} | "
                    f"{fmt(unary.get('ms_per_token'), 1)} | {fmt(b.get('vs_unary'), 2, 'x')} | "
                    f"{fmt(unary.get('unary_ms_per_step'))} | "
                    f"{fmt(b.get('predrafts_per_step'))}, {fmt(b.get('predraft_hit_rate'))}, "
                    f"{fmt(b.get('wasted_draft_tokens_per_step'))} | "
                    f"{' '.join(str(n) for n in (b or c).get('steps_per_k', [])) or '-'} |"
                )
            lines.append("")
        exact = workload["results"]["exact_greedy"]
        if exact:
            wrong = {label: share for label, share in exact.items() if share < 1.0}
            lines.append("Greedy outputs equal to the same family's target alone on every prompt: "
                         + ("all" if not wrong else "all but " + ", ".join(
                             f"{label} ({share:.0%})" for label, share in wrong.items())) + ".")
            lines.append("")
    lines += [
        "Columns: ms/tok = wall time per generated token seen by the caller (median over repeats); "
        "speedup = the system's own target-alone ms/token over its ms/token; (b) vs (d) = HF assisted "
        "ms/token over (b)'s (> 1: the services are faster); alpha = accepted/proposed; alpha_hat = "
        "per-token acceptance fitted to tokens/target pass; gRPC ms/step = (b') minus (c) loop time per "
        "step, both serial at a fixed k (drafting ahead shortens (b)'s step by draft time, not wire "
        "time, and under auto each run picks its own k: '-' there); gRPC CPU ms/step = the same in CPU time summed over all processes (robust to a busy "
        "machine); bound = (1 - a^(k+1)) / ((1 - a)(k c + 1)) with a = alpha_hat (for auto, k = mean "
        "drafted per step); block cost = (c)'s Verify of k+1 positions over a one-token target pass, in "
        "process; predicted = (c)'s tokens/target pass over (k c + block cost): the cost model's speedup "
        "from the measured parts, to compare with (c)'s and (b)'s speedups; (b') = (b) with drafting only after each verdict; (b)/(b') and (b)/(c) = "
        "ms/token ratios (< 1: pipelined services faster than serial services / than the serial loop in "
        "one process); (b'') = (b) with a unary Propose/Verify call per step instead of one stream per "
        "session; (b'') - (b) ms/step = what the unary calls add to a step; (b)/(b'') < 1: the streams made (b) faster; ahead = blocks "
        "drafted ahead per step, the share of them used, draft tokens "
        "drafted ahead in vain per step; k chosen = steps of (b) at each k, over all its runs (alpha, alpha_hat, tokens/target pass and k chosen are (c)'s when (b) was left out).", "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    panels = [(w, t) for w in report["workloads"] for t in s["temperatures"]]
    columns = max(1, len(s["temperatures"]))
    rows = max(1, (len(panels) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    x = list(range(len(s["ks"])))
    styles = {"services-spec": "o-", "services-serial": "o:", "inproc-spec": "s--", "hf-assisted": "^-."}
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (workload, temperature) in zip(axes.flat, panels, strict=False):
        cells = {(c["temperature"], c["system"], c["k"]): c for c in workload["results"]["cells"]}
        for system, style in styles.items():
            if (temperature, system, s["ks"][0]) not in cells:  # a skipped system
                continue
            speedups = [cells[(temperature, system, k)]["speedup"] for k in s["ks"]]
            ax.plot(x, speedups, style, label=SYSTEMS[system])
        bound = [cells.get((temperature, "services-spec", k), {}).get("bound") for k in s["ks"]]
        if any(b is not None for b in bound):
            ax.plot(x, [b if b is not None else float("nan") for b in bound], ":", color="gray",
                    label="bound (alpha_hat, c)")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(x, s["ks"])
        ax.set_xlabel("k (draft tokens per step)")
        ax.set_ylabel("speedup over its own target alone")
        ax.set_title(f"{workload['name']}, T={temperature:g}")
        ax.grid(alpha=0.3)
    if panels:
        axes.flat[0].legend(fontsize=8)
    figure.suptitle(machine_line(report["machine"]), fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=120)
    plt.close(figure)
