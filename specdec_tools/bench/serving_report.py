"""The serving report: ``serving.md`` (a table per workload and temperature) and ``serving.png``
(aggregate throughput and p50 time per token against concurrency) from ``serving.json``'s content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .machine import machine_line
from .report import fmt


def batch(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def label(phase: dict[str, Any], systems: dict[str, str]) -> str:
    """A phase's system as the table names it: the speculative ones with their k."""
    k = phase.get("k")  # (serving.json files from before several ks ran have none)
    return systems[phase["system"]] + (f" k={k}" if k else "")


def crossover_line(crossover: dict[str, Any], phases: list[dict[str, Any]]) -> str:
    """Where speculative aggregate tokens/s first falls below the target alone's, if anywhere."""
    ratios = crossover["speculative_over_target"]
    k = crossover.get("k")
    phases = [p for p in phases if p.get("k") in (k, None)]
    name = f"Speculative k={k}" if k else "Speculation"
    if not ratios:
        return "No concurrency ran both systems."
    listed = ", ".join(f"C={r['concurrency']} {r['ratio']:.2f}x" for r in ratios)
    at = crossover["stops_paying_at"]
    if at is None:
        return f"{name} pays at every concurrency measured (speculative / target alone tokens/s: {listed})."
    rates = {p["system"]: p["tokens_per_s"] for p in phases if p["concurrency"] == at}
    where = f"does not pay even at C={at}" if at == ratios[0]["concurrency"] else f"stops paying at C={at}"
    below = ", ".join(f"C={c}" for c in crossover["losing"])
    return (f"{name} {where}: speculative {fmt(rates.get('speculative'), 1)} tokens/s, target alone "
            f"{fmt(rates.get('target'), 1)}; below the target alone at {below} (speculative / target alone "
            f"tokens/s: {listed}).")


def auto_line(crossover: dict[str, Any]) -> str | None:
    """Auto k against the best fixed k at each concurrency (the target alone is k=0)."""
    ratios = crossover.get("auto_over_best_fixed")
    if not ratios:
        return None
    return ("Auto k over the best fixed k at each concurrency (the target alone counted as k=0), tokens/s: "
            + ", ".join(f"C={r['concurrency']} {r['ratio']:.2f}x (best k={r['best_fixed_k']})" for r in ratios) + ".")


def exact_line(phases: list[dict[str, Any]], systems: dict[str, str]) -> str | None:
    shares = {(label(p, systems), p["concurrency"]): p["exact_greedy"] for p in phases
              if p["exact_greedy"] is not None}
    if not shares:
        return None
    wrong = {key: share for key, share in shares.items() if share < 1.0}
    base = min(p["concurrency"] for p in phases)
    return (f"Greedy outputs equal to the target alone's at C={base} on the same prompt, every request of every "
            "phase: " + ("all" if not wrong else "all but " + ", ".join(
                f"{system} C={c} ({share:.0%})" for (system, c), share in wrong.items())) + ".")


def serving_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    systems = report["systems"]
    lines = [
        "# specdec serving benchmark", "", machine_line(report["machine"]), "",
        f"Settings: concurrency {', '.join(map(str, s['concurrency']))}; per phase every client sends one "
        f"warm-up request, then {s['requests']} timed streaming requests back to back; speculative k "
        f"{', '.join(s.get('ks') or [s.get('k', 'auto')])}; "
        f"temperatures {', '.join(f'{t:g}' for t in s['temperatures'])}; MLX dtype {s['dtype'] or 'as stored'}; "
        f"worker flags: `{s['worker_flags'] or '(defaults)'}`"
        f"{f'; orchestrator flags: `{o}`' if (o := s.get('orchestrator_flags')) else ''}{', quick' if s['quick'] else ''}; "
        f"{report['wall_s']:.0f} s in all. One draft, one target and one orchestrator on loopback gRPC; the "
        "clients are threads of the benchmark process on the same machine.", "",
    ]
    for name, reason in report.get("skipped", {}).items():
        lines += [f"## {name}", "", reason, ""]
    for workload in report["workloads"]:
        results = workload["results"]
        lines += [f"## {workload['name']}: {workload['about']}", "",
                  f"draft `{workload['draft']}`, target `{workload['target']}`, max_tokens "
                  f"{workload['max_tokens']}, {len(workload['prompts'])} prompts taken in turn.", ""]
        for crossover in results["crossover"]:
            temperature = crossover["temperature"]
            phases = [p for p in results["phases"] if p["temperature"] == temperature]
            base = min(p["concurrency"] for p in phases)
            lines += [f"### T={temperature:g}", "",
                      f"| concurrency | system | aggregate tok/s | vs C={base} | p50 ms/token | p99 ms/token "
                      "| p50 TTFT ms | mean batch draft | mean batch target | acceptance | drafted/step | tokens/step "
                      "| requests | errors |",
                      "|---:|---|" + "---:|" * 12]
            ks = list(dict.fromkeys(p.get("k") for p in phases))
            for p in sorted(phases, key=lambda p: (p["concurrency"], list(systems).index(p["system"]),
                                                   ks.index(p.get("k")))):
                lines.append(
                    f"| {p['concurrency']} | {label(p, systems)} | {fmt(p['tokens_per_s'], 1)} "
                    f"| {fmt(p['scaling'], 2, 'x')} | {fmt(p['tpot_ms_p50'], 1)} | {fmt(p['tpot_ms_p99'], 1)} "
                    f"| {fmt(p['ttft_ms_p50'], 1)} | {batch(p['workers']['draft']['mean_batch'])} "
                    f"| {batch(p['workers']['target']['mean_batch'])} | {fmt(p['acceptance'])} "
                    f"| {fmt(p.get('drafted_per_step'))} | {fmt(p.get('tokens_per_step'))} "
                    f"| {p['requests']} | {p['errors']} |")
            lines.append("")
            for line in [crossover_line(each, phases) for each in crossover.get("by_k") or [crossover]] + [
                    auto_line(crossover)]:
                if line:
                    lines += [line, ""]
            exact = exact_line(phases, systems)
            if exact:
                lines += [exact, ""]
            errors = sorted({e for p in phases for e in p["error_examples"]})
            if errors:
                lines += ["Errors: " + "; ".join(errors[:5]), ""]
    lines += [
        "Columns: aggregate tok/s = all generated tokens of the phase (EOS counted) / the phase's wall time "
        "(first request sent to last stream ended); vs C=... = that over the same system's at the lowest "
        "concurrency; ms/token = time per output token of one request after its first, (last message - first "
        "token) / (tokens - 1), p50 and p99 over the phase's requests; TTFT = request sent to the first "
        "message holding a token; mean batch = steps per batched forward pass on that worker over the phase "
        "(delta batched_steps / delta batches of its Info; n/a: no batch counted, e.g. the draft behind the "
        "target alone, or workers that do not batch); acceptance = accepted / proposed draft tokens; "
        "drafted/step = proposed draft tokens per step (auto's mean k), tokens/step = generated tokens per "
        "target pass.", "",
    ]
    return "\n".join(lines)


def serving_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, c["temperature"]) for w in report["workloads"] for c in w["results"]["crossover"]]
    rows = max(1, len(panels))
    figure, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    styles = {"speculative": "o-", "target": "s--"}
    for (throughput, latency), (workload, temperature) in zip(axes, panels, strict=False):
        phases = [p for p in workload["results"]["phases"] if p["temperature"] == temperature]
        for system, k in dict.fromkeys((p["system"], p.get("k")) for p in phases):
            mine = sorted((p for p in phases if (p["system"], p.get("k")) == (system, k)),
                          key=lambda p: p["concurrency"])
            x, name = [p["concurrency"] for p in mine], label(mine[0], report["systems"])
            nan = float("nan")
            style = styles[system] if k in (None, "auto") else ":"
            throughput.plot(x, [p["tokens_per_s"] or nan for p in mine], style, label=name)
            latency.plot(x, [p["tpot_ms_p50"] or nan for p in mine], style, label=name)
        ticks = sorted({p["concurrency"] for p in phases})
        for ax, ylabel in ((throughput, "aggregate tokens/s"), (latency, "p50 ms per output token")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{workload['name']}, T={temperature:g}")
        throughput.legend(fontsize=8)
    if not panels:
        for ax in axes.flat:
            ax.axis("off")
    figure.suptitle(machine_line(report["machine"]), fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=120)
    plt.close(figure)
