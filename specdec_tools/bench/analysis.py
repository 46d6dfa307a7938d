"""Figures from the runs: per-cell summaries, Leviathan's acceptance fit and speedup bound,
cross-cell speedups and gRPC overhead, and greedy exactness."""

from __future__ import annotations

import statistics
from typing import Any

from .cells import BASELINE_OF, SYSTEMS, Cell, Run


def fit_alpha(tokens_per_pass: float, k: float) -> float:
    """Leviathan's per-token acceptance a with (1 - a^(k+1)) / (1 - a) = tokens per pass."""
    if k <= 0 or tokens_per_pass <= 1.0:
        return 0.0
    if tokens_per_pass >= k + 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_tokens(mid, k) < tokens_per_pass:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def expected_tokens(alpha: float, k: float) -> float:
    """Expected tokens per target pass with k drafts accepted i.i.d. with probability alpha."""
    if alpha >= 1.0:
        return k + 1
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def speedup_bound(alpha: float, k: float, cost_ratio: float) -> float:
    """(1 - a^(k+1)) / ((1 - a)(k c + 1)): Leviathan et al.'s expected walltime improvement."""
    return expected_tokens(alpha, k) / (k * cost_ratio + 1)


def summarize(runs_by_repeat: list[list[Run]]) -> dict[str, Any]:
    """Figures of one cell from its runs (one list of prompts' runs per repeat)."""
    runs = [run for repeat in runs_by_repeat for run in repeat]
    tokens = sum(r.tokens for r in runs)
    steps = sum(r.steps for r in runs)
    target_passes = sum(r.target_passes for r in runs)
    draft_passes = sum(r.draft_passes for r in runs)
    summary: dict[str, Any] = {
        "ms_per_token": 1e3 * statistics.median(
            sum(r.wall_s for r in rep) / max(1, sum(r.tokens for r in rep)) for rep in runs_by_repeat
        ),
        "tokens": tokens,
        "generations": len(runs),
        "steps": steps,
        "target_passes": target_passes,
        "draft_passes": draft_passes,
        "tokens_per_target_pass": tokens / target_passes if target_passes else None,
        "wall_ms_per_step": 1e3 * statistics.median(
            sum(r.wall_s for r in rep) / max(1, sum(r.steps for r in rep)) for rep in runs_by_repeat
        ) if steps else None,
        "loop_ms_per_step": 1e3 * statistics.median(
            sum(r.loop_s for r in rep) / max(1, sum(r.steps for r in rep)) for rep in runs_by_repeat
        ) if steps and any(r.loop_s for r in runs) else None,
        "wire_bytes_per_step": sum(r.wire_bytes for r in runs) / steps if steps else None,
        "draft_ms_per_step": 1e3 * sum(r.draft_s for r in runs) / steps if steps and draft_passes else None,
        "verify_ms_per_step": 1e3 * sum(r.verify_s for r in runs) / steps if steps and any(
            r.verify_s for r in runs) else None,
        "cpu_ms_per_token": 1e3 * sum(r.cpu_s or 0.0 for r in runs) / tokens if all(
            r.cpu_s is not None for r in runs) and tokens else None,
        "cpu_ms_per_step": 1e3 * sum(r.cpu_s or 0.0 for r in runs) / steps if all(
            r.cpu_s is not None for r in runs) and steps else None,
        "draft_ms_per_token": 1e3 * sum(r.draft_s for r in runs) / draft_passes if draft_passes and any(
            r.draft_s for r in runs) else None,
        "target_ms_per_pass": 1e3 * sum(r.verify_s for r in runs) / target_passes if target_passes and any(
            r.verify_s for r in runs) else None,
        "alpha": None,
        "drafted_per_step": None,
        # pipelining: share of the blocks drafted ahead that were used, tokens drafted ahead in vain
        "predraft_hit_rate": (sum(r.predraft_hits for r in runs) / sum(r.predrafts for r in runs)
                              if any(r.predrafts for r in runs) else None),
        "predrafts_per_step": sum(r.predrafts for r in runs) / steps if steps else None,
        "wasted_draft_tokens_per_step": sum(r.wasted_draft_tokens for r in runs) / steps if steps else None,
        "steps_per_k": [sum(r.steps_per_k[k] for r in runs if k < len(r.steps_per_k))
                        for k in range(max((len(r.steps_per_k) for r in runs), default=0))],
    }
    if all(r.proposed is not None for r in runs):
        proposed = sum(r.proposed or 0 for r in runs)
        accepted = sum(r.accepted or 0 for r in runs)
        summary["alpha"] = accepted / proposed if proposed else None
        summary["drafted_per_step"] = proposed / steps if steps else None
    return summary


def derive(cells: dict[Cell, dict[str, Any]], temperatures: list[float], ks: list[str]) -> dict[str, Any]:
    """Cross-cell figures per temperature: cost ratio c, speedups, gRPC overhead, bound."""
    per_temperature: dict[str, Any] = {}
    for temperature in temperatures:
        def get(system: str, k: str | None, t: float = temperature) -> dict[str, Any]:
            return cells[Cell(t, system, k)]

        def ran(system: str, k: str | None, t: float = temperature) -> bool:
            return Cell(t, system, k) in cells  # the transformers systems may have been skipped

        draft_ms = [get("inproc-spec", k)["draft_ms_per_token"] for k in ks]
        draft_ms = [ms for ms in draft_ms if ms]
        target_ms = get("inproc-target", None)["target_ms_per_pass"]
        ratio = statistics.median(draft_ms) / target_ms if draft_ms and target_ms else None
        per_temperature[f"{temperature:g}"] = {
            "cost_ratio_c": ratio,
            "draft_ms_per_token": statistics.median(draft_ms) if draft_ms else None,
            "target_ms_per_pass": target_ms,
        }
        # (a) may be left out (--systems): then no figure is relative to it
        a_ms = get("services-target", None)["ms_per_token"] if ran("services-target", None) else None
        for system in SYSTEMS:
            for k in ([None] if system not in BASELINE_OF else ks):
                if not ran(system, k):
                    continue
                cell = get(system, k)
                cell["speedup_vs_a"] = a_ms / cell["ms_per_token"] if a_ms else None
                if system in BASELINE_OF:
                    cell["speedup"] = get(BASELINE_OF[system], None)["ms_per_token"] / cell["ms_per_token"]
        for k in ks:
            c = get("inproc-spec", k)
            b = get("services-spec", k) if ran("services-spec", k) else c  # (b) left out: (c)'s own figures
            d = get("hf-assisted", k) if ran("hf-assisted", k) else None
            unary = get("services-unary", k) if ran("services-unary", k) else None
            serial = get("services-serial", k) if ran("services-serial", k) else None
            # What gRPC adds to a step: (b') minus (c), both serial at the same fixed k. (b) and (b'')
            # draft ahead, which hides draft time inside the Verify (their step is shorter than (c)'s
            # by that, not faster on the wire), and under auto each run picks its own k: neither is a
            # wire cost, so the figures are left out there rather than shown negative.
            grpc = {}
            for key, name in (("loop_ms_per_step", "grpc_ms_per_step"),
                              ("wall_ms_per_step", "grpc_wall_ms_per_step"),
                              ("cpu_ms_per_step", "grpc_cpu_ms_per_step"),
                              ("draft_ms_per_step", "grpc_propose_ms_per_step"),
                              ("verify_ms_per_step", "grpc_verify_ms_per_step")):
                grpc[name] = (serial[key] - c[key] if serial is not None and k != "auto"
                              and serial[key] is not None and c[key] is not None else None)
            for services in [cell for cell in (b, serial) if cell is not None and cell is not c]:
                services.update(grpc)
            if unary is not None and b is not c:  # a unary call per step over a stream, both drafting ahead
                unary["unary_ms_per_step"] = (unary["loop_ms_per_step"] - b["loop_ms_per_step"]
                                              if k != "auto" and unary["loop_ms_per_step"] is not None
                                              and b["loop_ms_per_step"] is not None else None)
            if b is not c:
                b["vs_hf_assisted"] = d["ms_per_token"] / b["ms_per_token"] if d is not None else None
            if ran("services-serial", k):  # < 1: pipelining made the services faster
                b["vs_serial"] = b["ms_per_token"] / get("services-serial", k)["ms_per_token"]
                b["vs_inproc_serial"] = b["ms_per_token"] / c["ms_per_token"]
            if unary is not None:  # < 1: step streams made the services faster
                b["vs_unary"] = b["ms_per_token"] / unary["ms_per_token"]
            # what a Verify of k+1 positions costs, in one-token target passes (in process)
            block = c["target_ms_per_pass"] / target_ms if c["target_ms_per_pass"] and target_ms else None
            for cell in [c] if b is c else [b, c]:
                drafted, tpp = cell["drafted_per_step"], cell["tokens_per_target_pass"]
                if drafted and tpp and ratio is not None:
                    cell["alpha_hat"] = fit_alpha(tpp, drafted)
                    cell["bound"] = speedup_bound(cell["alpha_hat"], drafted, ratio)
                    cell["bound_rate"] = speedup_bound(cell["alpha"] or 0.0, drafted, ratio)
                if tpp and block is not None and ratio is not None:
                    # the cost model's speedup from measured parts: tokens per step over a step's
                    # cost (k draft tokens at c, one block at its measured cost), in target passes
                    cell["block_cost"] = block
                    cell["predicted"] = tpp / ((drafted or 0.0) * ratio + block)
    return per_temperature


def exactness(runs: dict[Cell, list[list[Run]]], ks: list[str]) -> dict[str, Any]:
    """At T=0: does each system's output equal its family's target alone, prompt by prompt?"""
    out: dict[str, Any] = {}
    greedy = [cell for cell in runs if cell.temperature == 0]
    if not greedy:
        return out

    def ids(cell: Cell) -> list[list[int]]:
        return [run.token_ids for run in runs[cell][0]]

    for cell in greedy:
        if cell.system in BASELINE_OF:
            reference = ids(Cell(0.0, BASELINE_OF[cell.system], None))
            mine = ids(cell)
            out[cell.label] = sum(a == b for a, b in zip(mine, reference, strict=True)) / len(mine)
    if Cell(0.0, "hf-target", None) in runs and Cell(0.0, "services-target", None) in runs:
        mlx, hf = ids(Cell(0.0, "services-target", None)), ids(Cell(0.0, "hf-target", None))
        out["mlx target == transformers target"] = sum(a == b for a, b in zip(mlx, hf, strict=True)) / len(mlx)
    return out
