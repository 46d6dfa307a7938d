"""What Prometheus metrics cost: generation throughput with ``--metrics-port`` on and off.

Starts two clusters of real processes on the same checkpoints (the bundled demo pair unless
--draft/--target name others): draft + target + orchestrator with metrics on (each scraped
every --scrape-s seconds by a thread here, as Prometheus would, only harder), and the same
three with metrics off. Then sends the same sequential greedy requests to one and the other,
alternating request by request (which goes first swaps every time, so drift in machine load
hits both alike), and reports tokens per second of each, overall and per round of requests,
and the CPU seconds each cluster's three processes used per token (Linux: less sensitive than
wall time to what else the machine runs). It also times the metric
hooks themselves (per request and per step) against the measured time per request.

Usage: python -m specdec_tools.metrics_overhead [--rounds 12] [--requests 30] [--num-draft 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

START_TIMEOUT_S = 120.0


def start_cluster(name: str, draft: Path, target: Path, log_dir: Path, metrics: bool) -> list:
    from specdec_tools.service_process import ServiceProcess

    extra = ["--log-level", "WARNING", "--port", "0"] + (["--metrics-port", "0"] if metrics else [])
    workers = [ServiceProcess(role, ["--model", str(model), *extra], log_dir / f"{name}-{role}.log")
               for role, model in (("draft", draft), ("target", target))]
    for worker in workers:
        worker.wait_port(START_TIMEOUT_S)
    orchestrator = ServiceProcess("orchestrator", [*extra, "--draft", workers[0].address, "--target",
                                                   workers[1].address], log_dir / f"{name}-orchestrator.log")
    orchestrator.wait_port(START_TIMEOUT_S)
    return [*workers, orchestrator]


def cpu_seconds(procs: list) -> float:
    """User + system CPU time the processes have used so far (Linux /proc; NaN elsewhere)."""
    total = 0.0
    for proc in procs:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_round(clients: dict, prompts: list[str], num_draft: int, max_tokens: int
              ) -> dict[str, tuple[int, float, int]]:
    """Per client: tokens, seconds, steps of the prompts, each sent to every client in turn."""
    totals = {name: [0, 0.0, 0] for name in clients}
    names = list(clients)
    for i, prompt in enumerate(prompts):
        for name in names if i % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            stats = clients[name].generate(prompt, max_tokens=max_tokens, num_draft=num_draft).stats
            totals[name][1] += time.perf_counter() - started
            totals[name][0] += stats.tokens
            totals[name][2] += stats.steps
    return {name: (t[0], t[1], t[2]) for name, t in totals.items()}


def hook_costs(steps_per_request: float, per_pos: int) -> tuple[float, float, float]:
    """Microseconds per request_ended (a request of typical shape) and per worker step_done, and
    milliseconds to render the orchestrator's /metrics page."""
    import asyncio

    from orchestrator.speculative import GenerationParams, Stats
    from specdec_core.session_host import StepTiming
    from specdec_grpc.metrics import OrchestratorMetrics, WorkerMetrics

    orchestrator = OrchestratorMetrics()
    stats = Stats(tokens=40, steps=int(steps_per_request), proposed=30, accepted=25, time_to_first_token_s=0.01,
                  draft_replica="a", proposed_per_position=[6] * per_pos, accepted_per_position=[5] * per_pos)
    params = GenerationParams(max_tokens=64, num_draft=per_pos)
    n = 20000
    started = time.perf_counter()
    for _ in range(n):
        orchestrator.request_ended(params, stats, None, 0.2)
    per_request_us = (time.perf_counter() - started) / n * 1e6
    from prometheus_client import generate_latest

    started = time.perf_counter()
    for _ in range(200):
        generate_latest(orchestrator.registry)
    render_ms = (time.perf_counter() - started) / 200 * 1e3

    class Host:  # what WorkerMetrics reads of a SessionHost
        role = "target"
        step_listeners: list = []

    async def make() -> WorkerMetrics:
        return WorkerMetrics(Host())

    worker = asyncio.run(make())
    timing = StepTiming("verify", 0.0001, 0.005, True)
    started = time.perf_counter()
    for _ in range(n):
        worker.step_done(timing)
    per_step_us = (time.perf_counter() - started) / n * 1e6
    return per_request_us, per_step_us, render_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", type=Path, default=REPO / "models" / "demo-draft")
    parser.add_argument("--target", type=Path, default=REPO / "models" / "demo-target")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=30, help="requests per round and cluster")
    parser.add_argument("--num-draft", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--scrape-s", type=float, default=1.0, help="seconds between scrapes of each service")
    parser.add_argument("--control", action="store_true",
                        help="start the 'on' cluster without metrics too (an A/A run: the noise floor)")
    parser.add_argument("--off-first", action="store_true", help="start the metrics-off cluster first")
    args = parser.parse_args()

    from specdec_core import blas

    blas.preload()  # before hook_costs imports MLX (see specdec_core.blas)
    from orchestrator.client import SpecdecClient

    rng = random.Random(0)
    prompts = [f"spell {rng.randrange(1_000_000)}" for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        clusters = {}
        for name in (("off", "on") if args.off_first else ("on", "off")):
            clusters[name] = start_cluster(name, args.draft, args.target, Path(tmp),
                                           name == "on" and not args.control)
        stop = threading.Event()
        scrapes = [0]

        def scrape() -> None:
            urls = [f"http://{p.metrics_address}/metrics" for p in clusters["on"] if p.metrics_address]
            while not stop.wait(args.scrape_s):
                for url in urls:
                    with urllib.request.urlopen(url, timeout=10) as reply:
                        reply.read()
                    scrapes[0] += 1

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        clients = {name: SpecdecClient(procs[-1].address, timeout=120) for name, procs in clusters.items()}
        try:
            run_round(clients, prompts[:5], args.num_draft, args.max_tokens)  # warm-up
            results: dict[str, list[tuple[int, float, int]]] = {"on": [], "off": []}
            cpu_before = {name: cpu_seconds(procs) for name, procs in clusters.items()}
            for _ in range(args.rounds):
                for name, result in run_round(clients, prompts, args.num_draft, args.max_tokens).items():
                    results[name].append(result)
            cpu = {name: cpu_seconds(procs) - cpu_before[name] for name, procs in clusters.items()}
        finally:
            stop.set()
            for client in clients.values():
                client.close()
            for procs in clusters.values():
                for proc in reversed(procs):
                    proc.stop()

    rate = {name: [t / s for t, s, _ in rounds] for name, rounds in results.items()}
    ratios = [on / off for on, off in zip(rate["on"], rate["off"], strict=True)]
    total = {name: sum(t for t, _, _ in rounds) / sum(s for _, s, _ in rounds) for name, rounds in results.items()}
    tokens, seconds, steps = (sum(x[j] for x in results["on"]) for j in range(3))
    n_requests = args.rounds * args.requests
    per_request_us, per_step_us, render_ms = hook_costs(steps / n_requests, args.num_draft)
    hook_us = per_request_us + 2 * per_step_us * steps / n_requests  # a draft and a target step per step
    if args.control:
        print("CONTROL RUN: neither cluster has metrics")
    print(f"{args.rounds} rounds x {args.requests} greedy requests (k={args.num_draft}, max {args.max_tokens} "
          f"tokens) to each cluster, alternated request by request; metrics-on cluster scraped {scrapes[0]} times ({args.scrape_s:g} s period)")
    print(f"metrics on : {total['on']:.1f} tok/s overall, per round median {statistics.median(rate['on']):.1f}")
    print(f"metrics off: {total['off']:.1f} tok/s overall, per round median {statistics.median(rate['off']):.1f}")
    print(f"on/off: overall {total['on'] / total['off']:.4f}, per-round median {statistics.median(ratios):.4f} "
          f"(min {min(ratios):.4f}, max {max(ratios):.4f})")
    cpu_per_token = {name: cpu[name] / sum(t for t, _, _ in results[name]) for name in cpu}
    print(f"CPU per token (3 processes): on {cpu_per_token['on'] * 1e3:.3f} ms, off "
          f"{cpu_per_token['off'] * 1e3:.3f} ms, on/off {cpu_per_token['on'] / cpu_per_token['off']:.4f}")
    print(f"hooks: {per_request_us:.1f} us per request end, {per_step_us:.2f} us per worker step; "
          f"{hook_us:.0f} us per request of {seconds / n_requests * 1e3:.1f} ms "
          f"= {hook_us / (seconds / n_requests * 1e6):.3%} of a request; a scrape renders the "
          f"orchestrator's page in {render_ms:.2f} ms")


if __name__ == "__main__":
    main()
