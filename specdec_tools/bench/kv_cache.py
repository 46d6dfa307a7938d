"""``specdec-bench --concurrency 1,8 --kv-bits none,8,4``: the target's K/V cache settings side by side.

For each workload: one draft (its cache in the model's dtype), and per setting a target started
with that ``--kv-bits`` (``none``: the model's dtype) and an orchestrator in front of the shared
draft and that target. All run at once, so the settings take turns through one run and a drift
of the machine hits them alike:

- **Agreement.** Each setting's target alone decodes every prompt of the workload greedily, once
  (also the warm-up). Per quantized setting against the first one (the baseline, normally
  ``none``): the share of prompts with identical output, and the token agreement, the tokens
  before the first difference over the baseline's tokens, summed over the prompts.
- **Speed.** Then, per temperature and concurrency C, the serving benchmark's phases (``serving.
  run_phase``: C streaming clients; speculative at each k and the target alone) for every
  setting, the settings in a rotating order. Per setting its phases get the serving figures
  (``serving.compare_phases``), among them ``exact_greedy``: at T=0 the share of requests whose
  output equals that setting's own target alone (the guarantee: a quantized cache changes the
  target, speculation must not change it further). Against the baseline: tokens/s and p50 time
  per token of the same (system, k, C).
- **Bytes.** Each target's Info: what a cached position costs and a typical session's bytes (a
  512-token prompt and one chunk of 256 decoder slots), the formula its cache budget counts.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specdec_tools.service_process import ServiceProcess

from .cells import Settings
from .machine import machine_line
from .report import fmt, workload_entry, write_outputs
from .services import START_TIMEOUT_S
from .serving import ServingSettings, compare_phases, run_phase
from .workloads import Workload

logger = logging.getLogger("specdec.bench")

KV_SETTINGS = {"none": None, "8": 8, "4": 4}


def parse_kv_bits(text: str) -> list[int | None]:
    """``none,8,4`` -> [None, 8, 4]: the settings, the first the baseline."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in KV_SETTINGS]
    if unknown or not names:
        raise SystemExit(f"--kv-bits: comma-separated settings from {', '.join(KV_SETTINGS)}, not {text!r}")
    return [KV_SETTINGS[name] for name in names]


def setting_name(bits: int | None) -> str:
    return "none" if bits is None else str(bits)


class KVServices:
    """The shared draft; per setting a target and an orchestrator. ``view(bits)`` is what
    ``serving.run_phase`` calls its services: the addresses of one setting's processes."""

    def __init__(self, workload: Workload, settings: list[int | None], dtype: str | None, env: dict[str, str],
                 most_clients: int, worker_flags: list[str]):
        room = max(64, 2 * most_clients)  # as ServingServices: every client's sessions, with slack
        model_args = ["--dtype", dtype] if dtype else []
        self.env = env
        self.logs = tempfile.TemporaryDirectory(prefix="specdec-bench-kv-")  # shown if a start fails
        self.processes: list[ServiceProcess] = []
        self.addresses: dict[str, dict[str, str]] = {}
        try:
            draft = self._start("draft", ["--model", str(workload.draft), *model_args,
                                          "--max-sessions", str(room * len(settings)), *worker_flags])
            targets = {bits: self._start("target", ["--model", str(workload.target), *model_args,
                                                    "--max-sessions", str(room), *worker_flags,
                                                    *([] if bits is None else ["--kv-bits", str(bits)])],
                                         f"target-kv-{setting_name(bits)}")
                       for bits in settings}
            for process in (draft, *targets.values()):
                process.wait_port(START_TIMEOUT_S)
            for bits, target in targets.items():
                orchestrator = self._start("orchestrator", ["--draft", draft.address, "--target", target.address,
                                                            "--max-generations", str(room)],
                                           f"orchestrator-kv-{setting_name(bits)}")
                orchestrator.wait_port(START_TIMEOUT_S)
                self.addresses[setting_name(bits)] = {"draft": draft.address, "target": target.address,
                                                      "orchestrator": orchestrator.address}
        except BaseException:
            self.close()
            raise

    def _start(self, role: str, args: list[str], log_name: str = "") -> ServiceProcess:
        process = ServiceProcess(role, [*args, "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                                 Path(self.logs.name) / f"{log_name or role}.log", env=self.env)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.logs.cleanup()

    def view(self, bits: int | None) -> SettingView:
        return SettingView(self.addresses[setting_name(bits)])


class SettingView:
    """One setting's processes, as ``serving.run_phase`` addresses them."""

    def __init__(self, addresses: dict[str, str]):
        self.addresses = addresses

    def address(self, role: str) -> str:
        return self.addresses[role]


def target_info(address: str) -> dict[str, Any]:
    """What the target says of its cache (fields a worker without them reports as 0)."""
    import grpc

    from specdec_pb import specdec_pb2 as pb
    from specdec_pb import specdec_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.TargetStub(channel).Info(pb.InfoRequest(), timeout=30)
    return {"kv_bits": info.kv_bits, "kv_group_size": info.kv_group_size, "dtype": info.dtype,
            "cache_bytes_per_position": getattr(info, "cache_bytes_per_position", 0) or None,
            "typical_session_bytes": getattr(info, "typical_session_bytes", 0) or None}


def greedy_alone(services: KVServices, bits: int | None, workload: Workload) -> list[list[int]]:
    """The setting's target alone, greedy, on every prompt once."""
    from orchestrator.client import SpecdecClient

    with SpecdecClient(services.view(bits).address("orchestrator"), timeout=600) as client:
        return [list(client.generate(prompt, max_tokens=workload.max_tokens, temperature=0.0,
                                     speculative=False).token_ids) for prompt in workload.prompts]


def agreement(tokens: list[list[int]], baseline: list[list[int]]) -> dict[str, Any]:
    """Identical outputs, and the baseline's tokens matched before each prompt's first difference."""
    matched = 0
    for mine, theirs in zip(tokens, baseline, strict=True):
        common = min(len(mine), len(theirs))  # (a prefix of the other matches up to its end)
        matched += next((i for i in range(common) if mine[i] != theirs[i]), common)
    total = sum(len(theirs) for theirs in baseline)
    identical = sum(mine == theirs for mine, theirs in zip(tokens, baseline, strict=True))
    return {"prompts": len(tokens), "identical": identical, "identical_share": identical / len(tokens),
            "tokens_matched": matched, "baseline_tokens": total,
            "token_agreement": matched / total if total else None}


def run_kv_cache(workload: Workload, settings: Settings, serving: ServingSettings, kv_settings: list[int | None],
                 env: dict[str, str]) -> dict[str, Any]:
    """Every part of one workload (see the module docstring)."""
    started = time.perf_counter()
    logger.info("%s: starting a draft and, per K/V setting (%s), a target and an orchestrator", workload.name,
                ", ".join(map(setting_name, kv_settings)))
    services = KVServices(workload, kv_settings, settings.dtype, env, max(serving.concurrency), serving.worker_flags)
    phases: dict[str, list[dict[str, Any]]] = {setting_name(bits): [] for bits in kv_settings}
    try:
        logger.info("%s: ready in %.1f s", workload.name, time.perf_counter() - started)
        infos = {setting_name(bits): target_info(services.view(bits).address("target")) for bits in kv_settings}
        alone = {}
        for bits in kv_settings:
            alone[setting_name(bits)] = greedy_alone(services, bits, workload)
            logger.info("%s: kv %s: the target alone on %d prompts done", workload.name, setting_name(bits),
                        len(workload.prompts))
        turn = 0
        for temperature in settings.temperatures:
            for concurrency in serving.concurrency:
                cells = [(bits, system, k) for bits in kv_settings
                         for system, k in [("speculative", k) for k in serving.ks] + [("target", None)]]
                for bits, system, k in cells[turn % len(cells):] + cells[: turn % len(cells)]:
                    phase = run_phase(services.view(bits), workload, system, k, concurrency, temperature, serving)
                    logger.info("%s: kv %s T=%g C=%d %s%s: %.1f tokens/s, p50 %.1f ms/token, %d errors",
                                workload.name, setting_name(bits), temperature, concurrency, system,
                                f" k={k}" if k else "", phase["tokens_per_s"] or 0.0, phase["tpot_ms_p50"] or 0.0,
                                phase["errors"])
                    phases[setting_name(bits)].append(phase)
                turn += 1
    finally:
        services.close()
    baseline = setting_name(kv_settings[0])
    results: dict[str, Any] = {"baseline": baseline, "settings": []}
    for bits in kv_settings:
        name = setting_name(bits)
        crossover = compare_phases(phases[name])
        results["settings"].append({
            "kv_bits": name, "target": infos[name], "greedy_alone": alone[name],
            "agreement": agreement(alone[name], alone[baseline]),
            "versus_baseline": versus(phases[name], phases[baseline]),
            "phases": phases[name], "crossover": crossover,
        })
    return results


def versus(mine: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each phase's tokens/s and p50 time per token over the baseline setting's same phase."""
    key = ("temperature", "concurrency", "system", "k")
    theirs = {tuple(p[k] for k in key): p for p in baseline}
    out = []
    for phase in mine:
        other = theirs.get(tuple(phase[k] for k in key))
        if other is None:
            continue
        out.append({**{k: phase[k] for k in key},
                    "tokens_per_s": ratio(phase["tokens_per_s"], other["tokens_per_s"]),
                    "tpot_ms_p50": ratio(phase["tpot_ms_p50"], other["tpot_ms_p50"])})
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def kv_cache_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# specdec benchmark: K/V cache settings", "", machine_line(report["machine"]), "",
        f"Settings: the target's --kv-bits {', '.join(s['kv_bits'])} (the first is the baseline); concurrency "
        f"{', '.join(map(str, s['concurrency']))}; per phase every client sends one warm-up request, then "
        f"{s['requests']} timed streaming requests; speculative k {', '.join(s['ks'])}; temperatures "
        f"{', '.join(f'{t:g}' for t in s['temperatures'])}; MLX dtype {s['dtype'] or 'as stored'}; worker flags: "
        f"`{s['worker_flags'] or '(defaults)'}`; {report['wall_s']:.0f} s in all. One draft (its cache in the "
        "model's dtype); per setting a target and an orchestrator, all running at once, the settings' phases in "
        "a rotating order.", "",
    ]
    for name, reason in report.get("skipped", {}).items():
        lines += [f"## {name}", "", reason, ""]
    for workload in report["workloads"]:
        results = workload["results"]
        lines += [f"## {workload['name']}: {workload['about']}", "",
                  f"draft `{workload['draft']}`, target `{workload['target']}`, {len(workload['prompts'])} "
                  f"prompts, max_tokens {workload['max_tokens']}.", "",
                  "| target --kv-bits | bytes per cached position | typical session (512 + 256) | vs baseline "
                  "| greedy outputs identical to the baseline's | token agreement | speculative = its own target "
                  "alone (T=0) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        base_bytes = results["settings"][0]["target"]["typical_session_bytes"]
        for entry in results["settings"]:
            a, info = entry["agreement"], entry["target"]
            exact = [p["exact_greedy"] for p in entry["phases"] if p["exact_greedy"] is not None
                     and p["system"] == "speculative"]
            lines.append(
                f"| {entry['kv_bits']} | {mib(info['cache_bytes_per_position'], 1 / 1024, ' KiB')} "
                f"| {mib(info['typical_session_bytes'], 1 / 1024 ** 2, ' MiB')} "
                f"| {fmt(ratio(info['typical_session_bytes'], base_bytes), 3, 'x')} "
                f"| {a['identical']}/{a['prompts']} | {fmt(a['token_agreement'], 3)} "
                f"({a['tokens_matched']}/{a['baseline_tokens']}) | {fmt(min(exact) if exact else None)} |")
        lines += ["", "| T | C | system | " + " | ".join(
            f"kv {e['kv_bits']} ms/token p50 | tokens/s" for e in results["settings"]) + " | "
            + " | ".join(f"kv {e['kv_bits']} tokens/s vs baseline" for e in results["settings"][1:]) + " |",
            "|---|---:|---|" + "---:|---:|" * len(results["settings"]) + "---:|" * (len(results["settings"]) - 1)]
        first = results["settings"][0]["phases"]
        for phase in first:
            row = [f"{phase['temperature']:g}", str(phase["concurrency"]),
                   "speculative k=" + phase["k"] if phase["system"] == "speculative" else "target alone"]
            same = [next((p for p in e["phases"] if all(p[k] == phase[k] for k in
                                                       ("temperature", "concurrency", "system", "k"))), None)
                    for e in results["settings"]]
            row += [cell for p in same for cell in (fmt(p and p["tpot_ms_p50"], 1), fmt(p and p["tokens_per_s"], 1))]
            row += [fmt(ratio(p and p["tokens_per_s"], phase["tokens_per_s"]), 2, "x") for p in same[1:]]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Columns: bytes per cached position and the typical session are the targets' own Info (the formula "
              "their --cache-memory budget counts; scales and biases of the quantization groups included); token "
              "agreement = the baseline's greedy tokens matched before each prompt's first difference, over all its "
              "tokens (the target alone, every prompt once); speculative = its own target alone = the share of "
              "speculative requests at T=0 (lowest over the phases) whose tokens equal that setting's target alone "
              "on the same prompt; ms/token p50 = time per output token after the first, median over a phase's "
              "requests; tokens/s = all the phase's tokens over its wall time.", ""]
    return "\n".join(lines)


def mib(value: float | None, scale: float, suffix: str) -> str:
    return "-" if value is None else f"{value * scale:.1f}{suffix}"


def kv_cache_main(args: Any, settings: Settings, serving: ServingSettings, env: dict[str, str],
                  info: dict[str, Any], workloads: list[Workload], skipped: dict[str, str], out: Path,
                  started: float) -> int:
    """``specdec-bench --concurrency ... --kv-bits ...``: every workload; kv_cache.json and kv_cache.md."""
    import shlex

    kv_settings = parse_kv_bits(args.kv_bits)
    report: dict[str, Any] = {
        "machine": info,
        "settings": {**{key: value for key, value in asdict(settings).items() if key not in ("ks", "repeats")},
                     **asdict(serving), "kv_bits": [setting_name(b) for b in kv_settings], "quick": args.quick,
                     "tiny": args.tiny, "worker_flags": shlex.join(serving.worker_flags)},
        "skipped": skipped, "workloads": [],
    }
    for workload in workloads:
        results = run_kv_cache(workload, settings, serving, kv_settings, env)
        report["workloads"].append(workload_entry(workload, results))
    report["wall_s"] = time.perf_counter() - started
    return write_outputs(out, "kv_cache", report, kv_cache_markdown(report))
