"""``specdec-bench --drafting``: the draft methods side by side on one workload, through the services.

One target process, one draft process per method (``--method model|ngram|hybrid``, all given
the workload's draft checkpoint: the n-gram draft reads only its config and tokenizer) and one
orchestrator per draft, all on loopback gRPC. Cells: the target alone (``speculative=false``)
and every method at every k; every prompt runs in every cell once per repeat, cells in a
rotating order per (repeat, prompt), after one warm-up generation per cell, as ``runner`` does.

Figures per cell (``analysis.summarize`` plus): ``speedup`` (target alone's ms/token over the
cell's), ``alpha`` (accepted / proposed), ``tokens_per_target_pass``, ``drafting_steps`` (share of
steps with at least one draft token: an n-gram draft proposes nothing where nothing matches)
and, at T=0, ``exact`` (share of prompts whose output equals the target alone's).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from specdec_tools.service_process import ServiceProcess

from .analysis import summarize
from .cells import Run, Settings, seed
from .report import fmt, workload_entry, write_outputs
from .workloads import Workload

logger = logging.getLogger("specdec.bench")

METHODS = ("model", "ngram", "hybrid")
TARGET = "target"  # the target-alone cell's method
START_TIMEOUT_S = 300.0


@dataclass
class DraftRun(Run):
    drafting_steps: int = 0  # steps that drafted at least one token


@dataclass(frozen=True)
class DraftCell:
    temperature: float
    method: str  # a draft method, or TARGET
    k: str | None

    @property
    def label(self) -> str:
        return f"T={self.temperature:g} {self.method}" + (f" k={self.k}" if self.k else "")


class DraftServices:
    """The shared target, one draft and one orchestrator per method, and a client to each."""

    def __init__(self, workload: Workload, methods: list[str], dtype: str | None, env: dict[str, str],
                 draft_args: list[str]):
        from orchestrator.client import SpecdecClient

        self.logs = tempfile.TemporaryDirectory(prefix="specdec-drafting-")
        self.processes: list[ServiceProcess] = []
        self.clients: dict[str, Any] = {}
        dtype_args = ["--dtype", dtype] if dtype else []
        try:
            target = self._start("target", "target", ["--model", str(workload.target), *dtype_args], env)
            drafts = {m: self._start(f"draft-{m}", "draft", ["--model", str(workload.draft), "--method", m,
                                                             *dtype_args, *draft_args], env)
                      for m in methods}
            for process in (target, *drafts.values()):
                process.wait_port(START_TIMEOUT_S)
            for method, draft in drafts.items():
                orchestrator = self._start(f"orchestrator-{method}", "orchestrator",
                                           ["--draft", draft.address, "--target", target.address], env)
                orchestrator.wait_port(START_TIMEOUT_S)
                self.clients[method] = SpecdecClient(orchestrator.address, timeout=600)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, role: str, args: list[str], env: dict[str, str]) -> ServiceProcess:
        process = ServiceProcess(role, [*args, "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                                 Path(self.logs.name) / f"{name}.log", env=env)
        self.processes.append(process)
        return process

    def generate(self, cell: DraftCell, prompt: str, index: int, max_tokens: int, run_seed: int) -> DraftRun:
        client = self.clients[cell.method] if cell.method != TARGET else next(iter(self.clients.values()))
        options = dict(max_tokens=max_tokens, temperature=cell.temperature, seed=run_seed,
                       speculative=cell.method != TARGET,
                       num_draft=cell.k if cell.k == "auto" else int(cell.k or 1))
        start = time.perf_counter()
        response = client.generate(prompt, **options)
        wall = time.perf_counter() - start
        s = response.stats
        return DraftRun(index, wall, s.tokens, list(response.token_ids), s.steps, s.target_passes,
                        s.draft_passes, s.proposed, s.accepted, s.draft_ms / 1e3, s.verify_ms / 1e3,
                        s.total_ms / 1e3, s.wire_bytes, None,
                        drafting_steps=s.proposed_per_position[0] if s.proposed_per_position else 0)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        for process in reversed(self.processes):
            process.stop()
        self.logs.cleanup()


def drafting_cells(settings: Settings, methods: list[str]) -> list[DraftCell]:
    cells = []
    for temperature in settings.temperatures:
        cells.append(DraftCell(temperature, TARGET, None))
        cells += [DraftCell(temperature, m, k) for m in methods for k in settings.ks]
    return cells


def run_drafting(workload: Workload, settings: Settings, env: dict[str, str], methods: list[str],
                 draft_args: list[str]) -> dict[str, Any]:
    """Every cell of the workload (see the module docstring); the cells' figures and runs."""
    started = time.perf_counter()
    logger.info("%s: starting a target, drafts (%s) and their orchestrators", workload.name, ", ".join(methods))
    services = DraftServices(workload, methods, settings.dtype, env, draft_args)
    cells = drafting_cells(settings, methods)
    runs: dict[DraftCell, list[list[DraftRun]]] = {cell: [] for cell in cells}
    try:
        logger.info("%s: ready in %.1f s", workload.name, time.perf_counter() - started)
        for cell in cells:  # warm-up
            services.generate(cell, workload.prompts[0], 0, min(8, workload.max_tokens), seed(-1, 0))
        rounds = settings.repeats * len(workload.prompts)
        for repeat in range(settings.repeats):
            for cell in cells:
                runs[cell].append([])
            for prompt in range(len(workload.prompts)):
                turn = repeat * len(workload.prompts) + prompt
                for cell in cells[turn % len(cells):] + cells[: turn % len(cells)]:
                    runs[cell][repeat].append(services.generate(cell, workload.prompts[prompt], prompt,
                                                                workload.max_tokens, seed(repeat, prompt)))
                logger.info("%s: round %d/%d done", workload.name, turn + 1, rounds)
    finally:
        services.close()
    for cell in cells:
        for repeat in runs[cell]:
            repeat.sort(key=lambda run: run.prompt)
    return {"methods": methods, "draft_args": draft_args, "cells": figures(cells, runs)}


def figures(cells: list[DraftCell], runs: dict[DraftCell, list[list[DraftRun]]]) -> list[dict[str, Any]]:
    out = []
    for cell in cells:
        summary = summarize(runs[cell])  # type: ignore[arg-type]
        alone = DraftCell(cell.temperature, TARGET, None)
        summary["speedup"] = summarize(runs[alone])["ms_per_token"] / summary["ms_per_token"]  # type: ignore[arg-type]
        steps = sum(r.steps for rep in runs[cell] for r in rep)
        summary["drafting_steps"] = sum(r.drafting_steps for rep in runs[cell] for r in rep) / steps if steps else None
        if cell.temperature == 0:
            mine, reference = runs[cell][0], runs[alone][0]
            summary["exact"] = sum(a.token_ids == b.token_ids for a, b in zip(mine, reference, strict=True)) / len(mine)
        out.append({"temperature": cell.temperature, "method": cell.method, "k": cell.k, **summary,
                    "runs": [asdict(run) for repeat in runs[cell] for run in repeat]})
    return out


def drafting_markdown(report: dict[str, Any]) -> str:
    """One table per workload and temperature: each method at each k against the target alone."""
    from .machine import machine_line

    s = report["settings"]
    lines = ["# specdec benchmark: draft methods", "", machine_line(report["machine"]), "",
             f"Settings: {s['prompts']} prompts x {s['repeats']} repeats per cell, k in {', '.join(s['ks'])}, "
             f"temperatures {', '.join(f'{t:g}' for t in s['temperatures'])}, MLX dtype {s['dtype'] or 'as stored'}; "
             f"{report['wall_s']:.0f} s in all. One target, one draft process per method and one orchestrator "
             "per draft, on loopback gRPC.", ""]
    for workload in report["workloads"]:
        results = workload["results"]
        lines += [f"## {workload['name']}: {workload['about']}", "",
                  f"draft `{workload['draft']}`, target `{workload['target']}`, max_tokens {workload['max_tokens']}; "
                  f"draft flags: `{' '.join(results['draft_args']) or '(defaults)'}`.", ""]
        for temperature in s["temperatures"]:
            cells = [c for c in results["cells"] if c["temperature"] == temperature]
            lines += [f"### T={temperature:g}", "",
                      "| draft | k | ms/token | speedup vs target alone | acceptance | tokens / target pass "
                      "| steps with a draft | draft ms/step | exact |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for c in cells:
                lines.append(
                    f"| {'target alone' if c['method'] == TARGET else c['method']} | {c['k'] or '-'} "
                    f"| {fmt(c['ms_per_token'], 1)} | {fmt(c['speedup'], 2, 'x')} | {fmt(c['alpha'])} "
                    f"| {fmt(c['tokens_per_target_pass'])} | {fmt(c['drafting_steps'])} "
                    f"| {fmt(c['draft_ms_per_step'])} | {fmt(c.get('exact'))} |")
            lines.append("")
    lines += ["Columns: ms/token = wall time per generated token seen by the caller (median over repeats); "
              "acceptance = accepted / proposed draft tokens; steps with a draft = share of steps whose "
              "Propose returned at least one token (an n-gram draft returns none where nothing matches); "
              "draft ms/step = the orchestrator's time in Propose per step (gRPC included); exact = share "
              "of prompts whose greedy output equals the target alone's.", ""]
    return "\n".join(lines)


def drafting_main(args: Any, settings: Settings, env: dict[str, str], info: dict[str, Any],
                  workloads: list[Workload], skipped: dict[str, str], out: Path, started: float) -> int:
    """``specdec-bench --drafting``: run every workload, write drafting.json and drafting.md."""
    import shlex

    methods = [m.strip() for m in args.draft_methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--draft-methods: choose from {', '.join(METHODS)}")
    report: dict[str, Any] = {"machine": info, "settings": {**asdict(settings), "quick": args.quick},
                              "skipped": skipped, "workloads": []}
    for workload in workloads:
        results = run_drafting(workload, settings, env, methods, shlex.split(args.draft_flags))
        report["workloads"].append(workload_entry(workload, results))
    report["wall_s"] = time.perf_counter() - started
    return write_outputs(out, "drafting", report, drafting_markdown(report))
