"""One workload through every system: warm-up, then every prompt in every cell, cells in rotating order."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .analysis import derive, exactness, summarize
from .cells import SYSTEMS, Cell, Run, Settings, cells_for, seed
from .hugging_face import HuggingFace
from .in_process import InProcess
from .progress import Progress
from .report import fmt
from .services import Services
from .workloads import Workload

logger = logging.getLogger("specdec.bench")


def start_hugging_face(workload: Workload) -> tuple[HuggingFace | None, str]:
    """Systems (d) and (e), or None and why not: a pair transformers cannot load (a quantized
    specdec checkpoint, no torch, ...) skips them, and the rest of the comparison still runs."""
    try:
        return HuggingFace(workload.draft, workload.target), ""
    except Exception as error:  # noqa: BLE001 - any failure to load means these systems cannot run
        reason = f"skipped: transformers cannot load this pair ({type(error).__name__}: {error})"
        logger.warning("%s: %s", workload.name, reason)
        return None, reason


def run_workload(workload: Workload, settings: Settings, env: dict[str, str], log_dir: Path | None = None
                 ) -> dict[str, Any]:
    """Start every system on the workload's pair, run all cells (see the package docstring for
    the order), stop the systems, and return the cells' runs and figures (``bench.json``'s). The
    services log into ``log_dir`` (a temporary directory when None)."""
    log = logger.info
    wanted = {system.split("-")[0] for system in settings.systems}  # services, inproc, hf
    log("%s: starting %s", workload.name, ", ".join(
        name for family, name in (("services", "the services (3 processes)"), ("inproc", "the in-process hosts"),
                                  ("hf", "transformers")) if family in wanted))
    started = time.perf_counter()
    systems: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    floor: dict[str, Any] = {"wall_ms_p50": None, "cpu_ms": None}  # no services: no gRPC floor
    try:
        if "services" in wanted:
            systems["services"] = Services(workload.draft, workload.target, settings.dtype, env,
                                           unary_steps_baseline="services-unary" in settings.systems,
                                           log_dir=log_dir, log_prefix=f"{workload.name}-")
        systems["inproc"] = InProcess(workload.draft, workload.target, settings.dtype)
        if "hf" in wanted:
            hf, reason = start_hugging_face(workload)
            if hf is not None:
                systems["hf"] = hf
            else:
                skipped = {system: reason for system in SYSTEMS if system.startswith("hf-")}
        if "services" in systems:
            systems["services"].connect()
            floor = systems["services"].empty_call_floor()
            log("%s: an empty gRPC call to the target: p50 %.2f ms wall, %s ms CPU", workload.name,
                floor["wall_ms_p50"], fmt(floor["cpu_ms"]))
        log("%s: ready in %.1f s", workload.name, time.perf_counter() - started)
        cells = cells_for(settings, {system for system in SYSTEMS if system.split("-")[0] in systems})
        runner = {cell: systems[cell.system.split("-")[0]] for cell in cells}

        def one(cell: Cell, prompt: int, repeat: int, max_tokens: int) -> Run:
            variant = {"services-serial": {"pipeline": False}, "services-unary": {"unary_steps": True}}
            return runner[cell].generate(workload.prompts[prompt], prompt, max_tokens, cell.k,
                                         cell.temperature, seed(repeat, prompt), **variant.get(cell.system, {}))

        for cell in cells:  # warm-up: first calls pay for allocation and lazy set-up
            one(cell, 0, -1, min(8, workload.max_tokens))
        runs: dict[Cell, list[list[Run]]] = {cell: [] for cell in cells}
        rounds = settings.repeats * len(workload.prompts)
        timer = time.perf_counter()
        progress = Progress(f"{workload.name}: timed rounds")
        for repeat in range(settings.repeats):
            for cell in cells:
                runs[cell].append([])
            for prompt in range(len(workload.prompts)):
                turn = repeat * len(workload.prompts) + prompt
                order = cells[turn % len(cells):] + cells[: turn % len(cells)]
                for cell in order:
                    runs[cell][repeat].append(one(cell, prompt, repeat, workload.max_tokens))
                done = turn + 1
                eta = (time.perf_counter() - timer) / done * (rounds - done)
                progress.update(f"{done}/{rounds} done, about {eta:.0f} s left")
        progress.done(f"{rounds}/{rounds} done in {time.perf_counter() - timer:.0f} s")
        for cell in cells:
            for repeat in runs[cell]:
                repeat.sort(key=lambda run: run.prompt)
    finally:
        for system in systems.values():
            system.close()
    return results_of(runs, settings, skipped, floor)


def results_of(runs: dict[Cell, list[list[Run]]], settings: Settings, skipped: dict[str, str],
               floor: dict[str, Any]) -> dict[str, Any]:
    """A workload's figures (``bench.json``'s ``results``) from its cells' runs."""
    cells = list(runs)
    summaries = {cell: summarize(runs[cell]) for cell in cells}
    derived = derive(summaries, settings.temperatures, settings.ks)
    return {
        "skipped_systems": skipped,
        "empty_grpc_call": floor,
        "per_temperature": derived,
        "exact_greedy": exactness(runs, settings.ks),
        "cells": [
            {"temperature": cell.temperature, "system": cell.system, "k": cell.k, **summaries[cell],
             "runs": [asdict(run) for repeat in runs[cell] for run in repeat]}
            for cell in cells
        ],
    }


def rederive(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` (a ``bench.json``) with every workload's figures derived again from its stored
    runs, so a change to the analysis applies to a run already made (``--report-from``)."""
    known = set(Settings.__dataclass_fields__)
    settings = Settings(**{key: value for key, value in report["settings"].items() if key in known})
    for workload in report["workloads"]:
        results = workload["results"]
        runs: dict[Cell, list[list[Run]]] = {}
        for stored in results["cells"]:
            cell = Cell(stored["temperature"], stored["system"], stored["k"])
            flat = [Run(**run) for run in stored["runs"]]
            per_repeat = len(workload["prompts"])
            runs[cell] = [flat[i:i + per_repeat] for i in range(0, len(flat), per_repeat)]
        workload["results"] = results_of(runs, settings, results["skipped_systems"], results["empty_grpc_call"])
    return report
