"""``specdec-bench --concurrency 1,2,4,8,16``: throughput and latency under concurrent streaming clients.

For each workload: one draft, one target and one orchestrator, three processes on loopback gRPC
(``services.Services``; ``--worker-flags`` are added to draft and target, e.g. ``--max-batch 8
--batch-wait-ms 2``). Then, for each temperature and each concurrency C (ascending), two phases,
one per system: ``speculative`` at each k of ``--ks`` (default ``auto``; a phase per k) and
``target`` (the target alone, ``speculative=false``, through the same services). The order of the
phases reverses from one concurrency to the next, so a slow drift of the machine hits all alike.

A phase: C client threads, each with its own channel, run one short warm-up request, wait for
each other, then send ``--requests`` GenerateStream requests back to back. Request j of the phase
(client c's r-th, j = r * C + c) takes prompt j mod P and seed ``cells.seed(j, prompt)``, so both
systems get the same prompts and seeds at the same C. The draft's and the target's Info are read
once every warm-up is done and again when the last client is done.

Per request: ``ttft`` (request sent to the first message holding a token), ``tokens``
(``stats.tokens``: generated tokens, EOS counted) and ``tpot``, time per output token after the
first: (last message - first token) / (tokens - 1), the last message being the one with the stats.
Per phase: aggregate tokens/s = all tokens / (last request's end - first request's start); p50 and
p99 tpot and p50/p99 ttft over the phase's requests; ``scaling``: its tokens/s over the same
system's at the lowest concurrency measured; per worker the mean batch size, delta
``Metrics.batched_steps`` / delta ``Metrics.batches`` (None when no batch ran: a draft behind
the target alone, or a worker that does not count batches); at T=0 ``exact_greedy``, the share
of requests whose tokens equal the target alone's at the lowest concurrency on that prompt.
Per temperature, ``crossover``: for each k, speculative tokens/s over the target alone's at each
concurrency and where it falls below; with auto and fixed ks both run, auto's tokens/s over the best
fixed k's (the target alone counted as k=0) at each concurrency.

The clients run in this process, on the same cores as the services: on a small machine the
figures include their CPU time (a client is one thread that mostly waits on its stream).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specdec_tools.service_process import ServiceProcess

from .cells import Settings, seed
from .report import workload_entry, write_outputs
from .services import Services
from .workloads import Workload

logger = logging.getLogger("specdec.bench")

SERVING_SYSTEMS = {"speculative": "speculative", "target": "target alone"}
FULL_REQUESTS = 4  # per client and phase
QUICK_REQUESTS = 2
WARM_UP_TOKENS = 8
REQUEST_TIMEOUT_S = 600.0


@dataclass
class ServingSettings:
    """What the serving mode runs on top of ``Settings``: the client counts, each client's requests,
    the speculative system's k, and extra flags for both workers and for the orchestrator."""

    concurrency: list[int]
    requests: int
    ks: list[str]  # the speculative system's k at each of its phases: "auto" or "1".."16"
    worker_flags: list[str]
    orchestrator_flags: list[str] = field(default_factory=list)


@dataclass
class ServedRequest:
    """One streamed request of a phase, timed from this side of the wire (seconds since the phase began)."""

    client: int
    index: int  # j in the phase: client + r * concurrency
    prompt: int
    seed: int
    start_s: float
    end_s: float  # the stream's last message arrived
    ttft_s: float | None  # the first message holding a token arrived, after start_s
    tpot_s: float | None  # (end - first token) / (tokens - 1); None below two tokens
    tokens: int  # stats.tokens: generated tokens, EOS counted
    token_ids: list[int]  # as streamed (EOS excluded)
    proposed: int
    accepted: int
    finish_reason: str
    steps: int = 0  # stats.steps: target passes
    steps_per_k: list[int] = field(default_factory=list)  # stats.steps_per_num_draft: the k each step drafted
    predrafts: int = 0  # blocks drafted ahead, and how many were used
    predraft_hits: int = 0
    error: str | None = None


class ServingServices(Services):
    """``Services`` with room for every client: sessions and generations for the largest C (each
    request holds a session on each worker), plus the user's ``--worker-flags`` and
    ``--orchestrator-flags`` (last, so they win)."""

    def __init__(self, workload: Workload, dtype: str | None, env: dict[str, str], most_clients: int,
                 worker_flags: list[str], log_dir: Path | None = None, orchestrator_flags: list[str] | None = None):
        # twice the clients: a finished request's sessions and slot are freed just after its last message
        self.room = str(max(64, 2 * most_clients))
        self.worker_flags = worker_flags
        self.orchestrator_flags = orchestrator_flags or []
        super().__init__(workload.draft, workload.target, dtype, env, unary_steps_baseline=False, log_dir=log_dir,
                         log_prefix=f"{workload.name}-")

    def _start(self, role: str, args: list[str], log_name: str = "") -> ServiceProcess:
        if role == "orchestrator":
            return super()._start(role, [*args, "--max-generations", self.room, *self.orchestrator_flags], log_name)
        return super()._start(role, [*args, "--max-sessions", self.room, *self.worker_flags], log_name)

    def address(self, role: str) -> str:
        return next(p.address for p in self.processes if p.role == role)


def worker_counters(address: str, role: str) -> dict[str, int]:
    """The worker's step and batch counters since it started (its Info)."""
    import grpc

    from specdec_pb import specdec_pb2 as pb
    from specdec_pb import specdec_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DraftStub(channel) if role == "draft" else pb_grpc.TargetStub(channel)
        metrics = stub.Info(pb.InfoRequest(), timeout=30).metrics
    return {"steps": metrics.steps, "batches": metrics.batches, "batched_steps": metrics.batched_steps}


def mean_batch(before: dict[str, int], after: dict[str, int]) -> float | None:
    """Steps per batch over an interval; None when no batch ran in it."""
    batches = after["batches"] - before["batches"]
    return (after["batched_steps"] - before["batched_steps"]) / batches if batches > 0 else None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linear between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stream_one(client: Any, prompt: str, options: dict[str, Any], phase_start: float) -> ServedRequest:
    """One GenerateStream; only the timing fields and the tokens are filled (the caller adds the rest)."""
    start = time.perf_counter()
    first: float | None = None
    token_ids: list[int] = []
    last: Any = None
    for message in client.stream(prompt, timeout=REQUEST_TIMEOUT_S, **options):
        if message.token_ids and first is None:
            first = time.perf_counter()
        token_ids.extend(message.token_ids)
        last = message
    end = time.perf_counter()
    stats = last.stats if last is not None else None
    tokens = stats.tokens if stats is not None else len(token_ids)
    return ServedRequest(
        client=-1, index=-1, prompt=-1, seed=-1, start_s=start - phase_start, end_s=end - phase_start,
        ttft_s=first - start if first is not None else None,
        tpot_s=(end - first) / (tokens - 1) if first is not None and tokens > 1 else None,
        tokens=tokens, token_ids=token_ids, proposed=stats.proposed if stats else 0,
        accepted=stats.accepted if stats else 0, finish_reason=last.finish_reason if last is not None else "",
        steps=stats.steps if stats else 0, steps_per_k=list(stats.steps_per_num_draft) if stats else [],
        predrafts=stats.predrafts if stats else 0, predraft_hits=stats.predraft_hits if stats else 0,
    )


def run_phase(services: ServingServices, workload: Workload, system: str, k: str | None, concurrency: int,
              temperature: float, settings: ServingSettings) -> dict[str, Any]:
    """C clients, a warm-up each, then ``settings.requests`` timed requests each; the phase's figures."""
    import grpc

    from orchestrator.client import SpecdecClient

    workers = {role: services.address(role) for role in ("draft", "target")}
    before: dict[str, dict[str, int]] = {}
    clock: dict[str, float] = {}

    def begin() -> None:  # once every warm-up is done, before any timed request
        before.update({role: worker_counters(address, role) for role, address in workers.items()})
        clock["start"] = time.perf_counter()

    barrier = threading.Barrier(concurrency, action=begin)
    common = dict(temperature=temperature, speculative=system == "speculative", num_draft=k or "auto")
    prompts = workload.prompts

    def client(index: int) -> list[ServedRequest]:
        served = []
        with SpecdecClient(services.address("orchestrator"), timeout=REQUEST_TIMEOUT_S) as api:
            try:  # the channel connects and every process has its first call behind it
                stream_one(api, prompts[index % len(prompts)],
                           dict(common, max_tokens=min(WARM_UP_TOKENS, workload.max_tokens), seed=seed(-1, 0)),
                           time.perf_counter())
                barrier.wait(timeout=REQUEST_TIMEOUT_S)
            except BaseException:
                barrier.abort()  # the other clients stop waiting and fail too
                raise
            for r in range(settings.requests):
                j = r * concurrency + index
                prompt = j % len(prompts)
                options = dict(common, max_tokens=workload.max_tokens, seed=seed(j, prompt))
                try:
                    request = stream_one(api, prompts[prompt], options, clock["start"])
                except grpc.RpcError as error:  # counted, not fatal: a refusal under load is a result
                    now = time.perf_counter() - clock["start"]
                    request = ServedRequest(
                        client=index, index=j, prompt=prompt, seed=options["seed"], start_s=now, end_s=now,
                        ttft_s=None, tpot_s=None, tokens=0, token_ids=[], proposed=0, accepted=0,
                        finish_reason="", error=f"{error.code().name}: {error.details()}")
                request.client, request.index, request.prompt, request.seed = index, j, prompt, options["seed"]
                served.append(request)
        return served

    with ThreadPoolExecutor(concurrency) as pool:
        runs = [run for served in pool.map(client, range(concurrency)) for run in served]
    after = {role: worker_counters(address, role) for role, address in workers.items()}
    runs.sort(key=lambda run: run.index)
    counters = {role: {"before": before[role], "after": after[role],
                       "steps": after[role]["steps"] - before[role]["steps"],
                       "mean_batch": mean_batch(before[role], after[role])} for role in workers}
    return {"temperature": temperature, "concurrency": concurrency, "system": system, "k": k, **phase_figures(runs),
            "workers": counters, "runs": [asdict(run) for run in runs]}


def phase_figures(runs: list[ServedRequest]) -> dict[str, Any]:
    """Aggregate throughput and the latency percentiles of one phase's requests."""
    ok = [run for run in runs if run.error is None]
    tokens = sum(run.tokens for run in ok)
    wall = max(run.end_s for run in runs) - min(run.start_s for run in runs)
    tpot = [1e3 * run.tpot_s for run in ok if run.tpot_s is not None]
    ttft = [1e3 * run.ttft_s for run in ok if run.ttft_s is not None]
    proposed = sum(run.proposed for run in ok)
    return {
        "requests": len(runs), "errors": len(runs) - len(ok),
        "error_examples": sorted({run.error for run in runs if run.error})[:3],
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
        "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p99": percentile(tpot, 99),
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "acceptance": sum(run.accepted for run in ok) / proposed if proposed else None,
        # the mean k drafted (auto's choice under this load), and tokens per target pass
        "drafted_per_step": proposed / steps if (steps := sum(run.steps for run in ok)) else None,
        "tokens_per_step": tokens / steps if steps else None,
        "steps_per_k": [sum(run.steps_per_k[k] for run in ok if k < len(run.steps_per_k))
                        for k in range(max((len(run.steps_per_k) for run in ok), default=0))],
        "predraft_hit_rate": (sum(run.predraft_hits for run in ok) / predrafts
                              if (predrafts := sum(run.predrafts for run in ok)) else None),
    }


def compare_phases(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill each phase's ``scaling`` and (T=0) ``exact_greedy``; return the crossover per temperature."""
    crossovers = []
    for temperature in dict.fromkeys(p["temperature"] for p in phases):
        mine = [p for p in phases if p["temperature"] == temperature]
        lowest = min(p["concurrency"] for p in mine)
        base = {(p["system"], p["k"]): p["tokens_per_s"] for p in mine if p["concurrency"] == lowest}
        reference: dict[int, list[int]] = {}  # prompt -> the target alone's tokens at the lowest C that ran it
        for phase in sorted((p for p in mine if p["system"] == "target"), key=lambda p: p["concurrency"]):
            for run in phase["runs"]:
                if run["error"] is None:
                    reference.setdefault(run["prompt"], run["token_ids"])
        for phase in mine:
            rate, first = phase["tokens_per_s"], base.get((phase["system"], phase["k"]))
            phase["scaling_base"] = lowest
            phase["scaling"] = rate / first if rate and first else None
            compared = [run["token_ids"] == reference[run["prompt"]] for run in phase["runs"]
                        if temperature == 0 and run["error"] is None and run["prompt"] in reference]
            phase["exact_greedy"] = sum(compared) / len(compared) if compared else None
        by_k = []  # lists, not dicts: JSON would turn integer keys into strings
        for k in dict.fromkeys(p["k"] for p in mine if p["system"] == "speculative"):
            ratios = []
            for concurrency in sorted(dict.fromkeys(p["concurrency"] for p in mine)):
                rates = {p["system"]: p["tokens_per_s"] for p in mine if p["concurrency"] == concurrency
                         and p["k"] in (k, None)}
                if rates.get("speculative") and rates.get("target"):
                    ratios.append({"concurrency": concurrency, "ratio": rates["speculative"] / rates["target"]})
            losing = [r["concurrency"] for r in ratios if r["ratio"] < 1.0]
            by_k.append({"k": k, "speculative_over_target": ratios, "losing": losing,
                         "stops_paying_at": losing[0] if losing else None})
        crossovers.append({"temperature": temperature, **by_k[0], "by_k": by_k,
                           "auto_over_best_fixed": auto_over_best_fixed(mine)})
    return crossovers


def auto_over_best_fixed(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each concurrency that ran auto and a fixed k: auto's tokens/s over the best fixed k's, the
    target alone counted as k=0 (a policy that may choose k=0 must beat that too)."""
    out = []
    for concurrency in sorted(dict.fromkeys(p["concurrency"] for p in phases)):
        rates = {p["k"] if p["system"] == "speculative" else "0": p["tokens_per_s"] for p in phases
                 if p["concurrency"] == concurrency and p["tokens_per_s"]}
        fixed = {k: rate for k, rate in rates.items() if k != "auto"}
        if "auto" in rates and len(fixed) > 1:
            best = max(fixed, key=lambda k: fixed[k])
            out.append({"concurrency": concurrency, "best_fixed_k": best, "ratio": rates["auto"] / fixed[best]})
    return out


def run_serving(workload: Workload, settings: Settings, serving: ServingSettings,
                env: dict[str, str], log_dir: Path | None = None) -> dict[str, Any]:
    """Every phase of one workload (see the module docstring) on one set of services, which log
    into ``log_dir`` (a temporary directory when None)."""
    started = time.perf_counter()
    logger.info("%s: starting the services (3 processes)", workload.name)
    services = ServingServices(workload, settings.dtype, env, max(serving.concurrency), serving.worker_flags,
                               log_dir, serving.orchestrator_flags)
    phases = []
    try:
        services.connect()
        logger.info("%s: ready in %.1f s", workload.name, time.perf_counter() - started)
        for temperature in settings.temperatures:
            for turn, concurrency in enumerate(serving.concurrency):
                systems = [("speculative", k) for k in serving.ks] + [("target", None)]
                for system, k in systems if turn % 2 == 0 else reversed(systems):
                    phase = run_phase(services, workload, system, k, concurrency, temperature, serving)
                    logger.info("%s: T=%g C=%d %s%s: %.1f tokens/s, p50 %.1f ms/token, %d errors", workload.name,
                                temperature, concurrency, system, f" k={k}" if k else "",
                                phase["tokens_per_s"] or 0.0, phase["tpot_ms_p50"] or 0.0, phase["errors"])
                    phases.append(phase)
    finally:
        services.close()
    crossover = compare_phases(phases)
    return {"phases": phases, "crossover": crossover}


def parse_concurrency(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise SystemExit(f"--concurrency: {text!r} is not a comma-separated list of client counts >= 1")
    return values


def serving_main(args: Any, settings: Settings, serving: ServingSettings, env: dict[str, str],
                 info: dict[str, Any], workloads: list[Workload], skipped: dict[str, str], out: Path,
                 started: float) -> int:
    """``specdec-bench --concurrency ...``: run every workload, write serving.json, serving.md, serving.png."""
    import shlex

    from .serving_report import serving_markdown, serving_plot

    report: dict[str, Any] = {
        "machine": info,
        "settings": {**{key: value for key, value in asdict(settings).items() if key not in ("ks", "repeats")},
                     **asdict(serving), "quick": args.quick, "tiny": args.tiny,
                     "worker_flags": shlex.join(serving.worker_flags),
                     "orchestrator_flags": shlex.join(serving.orchestrator_flags)},
        "systems": SERVING_SYSTEMS, "skipped": skipped, "workloads": [],
    }
    for workload in workloads:
        results = run_serving(workload, settings, serving, env, out / "logs")
        report["workloads"].append(workload_entry(workload, results))
    report["wall_s"] = time.perf_counter() - started
    return write_outputs(out, "serving", report, serving_markdown(report), serving_plot)


def serving_settings(args: Any) -> ServingSettings:
    """The serving flags, checked: the speculative system's ks, a positive request count."""
    import shlex

    ks = list(dict.fromkeys(k.strip() for k in (args.ks or "auto").split(",") if k.strip()))
    for k in ks:
        if k != "auto" and not (k.isdigit() and 1 <= int(k) <= 16):
            raise SystemExit(f"--ks with --concurrency: k in 1..16 or 'auto', not {k!r}")
    requests = args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS)
    if requests < 1:
        raise SystemExit("--requests: at least 1")
    return ServingSettings(parse_concurrency(args.concurrency), requests, ks, shlex.split(args.worker_flags),
                           shlex.split(args.orchestrator_flags))
