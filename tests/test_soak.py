"""Soak: 16 clients with random deadlines and cancels for minutes, while a draft, a target and the
orchestrator are killed (SIGKILL) and restarted on their addresses; the bundled demo pair, all
real processes on loopback. Deselected by default; run with ``-m soak`` (``SPECDEC_SOAK_S`` sets
the churn's length, default 180 s; docs/bench/soak.md has the recorded figures).

Afterwards, as an operator would check after weeks:
- every worker holds 0 sessions within the owner lease (+ one sweep), and the orchestrator holds
  no replica (``Status``: 0 active sessions and generations);
- the workers that ran the whole soak use no more memory than at its start plus a stated bound;
- greedy outputs of a fixed prompt set equal those of the fresh cluster before the churn;
- no service log has an ERROR line or a traceback, except the orchestrator's lines that name a
  replica it saw killed.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from procs import ServiceProcess, free_port, start_all, start_orchestrator, start_worker, wait_until

from orchestrator.client import SpecdecClient, build_request
from specdec_pb import specdec_pb2_grpc as pb_grpc

MODELS = Path(__file__).resolve().parents[1] / "models"
CLIENTS = 16
SOAK_S = float(os.environ.get("SPECDEC_SOAK_S", "180"))
MAX_REQUESTS_PER_CLIENT = 100_000  # the loops are bounded by time and by count
OWNER_LEASE_S = 3.0
# A worker's resident memory may grow by this much over the soak: MLX's buffer cache and the
# allocator keep freed blocks; a leak of sessions or caches would grow without bound.
MEMORY_BOUND_MB = 150.0
PROMPTS = [f"spell {n}" for n in (7, 42, 315, 9071, 12_345, 704_316, 999_999, 80_008)]
MAX_TOKENS = 24

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(SOAK_S) + 900)]


class Cluster:
    """Two drafts, two targets and an orchestrator on fixed ports, so a killed one restarts on its
    address (the orchestrator's replica list and the clients' address stay valid)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.ports = {name: free_port() for name in ("draft0", "draft1", "target0", "target1", "orch")}
        self.procs: dict[str, ServiceProcess] = {}
        self.dead: list[ServiceProcess] = []

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start_worker(self, name: str, wait: bool = True) -> ServiceProcess:
        model = MODELS / ("demo-draft" if name.startswith("draft") else "demo-target")
        self.procs[name] = start_worker(name[:-1], model, self.log_dir, port=self.ports[name],
                                        extra=["--owner-lease", f"{OWNER_LEASE_S:g}"], wait=wait)
        return self.procs[name]

    def start_orchestrator(self) -> ServiceProcess:
        self.procs["orch"] = start_orchestrator(
            [self.address("draft0"), self.address("draft1")],
            [self.address("target0"), self.address("target1")], self.log_dir, port=self.ports["orch"])
        return self.procs["orch"]

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.dead.append(self.procs[name])

    def workers(self) -> list[ServiceProcess]:
        return [p for n, p in self.procs.items() if n != "orch"]

    def stop(self) -> None:
        for process in [*self.procs.values(), *self.dead]:
            process.kill()


def greedy_outputs(address: str) -> dict[str, list[int]]:
    with SpecdecClient(address, timeout=60) as api:
        return {p: list(api.generate(p, max_tokens=MAX_TOKENS, num_draft=3).token_ids) for p in PROMPTS}


def rss_mb(process: ServiceProcess) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_soak_churn_kills_and_restarts(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        start_all([cluster.start_worker(n, wait=False) for n in ("draft0", "draft1", "target0", "target1")])
        cluster.start_orchestrator()
        orch = cluster.address("orch")
        fresh = greedy_outputs(orch)
        # Survivors: the replicas never killed; their memory is compared before and after.
        survivors = {n: cluster.procs[n] for n in ("draft1", "target1")}
        memory_before = {n: rss_mb(p) for n, p in survivors.items()}
        memory_during: dict[str, list[float]] = {n: [] for n in survivors}  # at 1/4, 1/2 and 3/4

        outcomes = Counter[str]()
        lock = threading.Lock()
        stop_at = time.monotonic() + SOAK_S

        def client(index: int) -> None:
            rng = random.Random(index)
            # Reconnect soon after the orchestrator's restart (gRPC's default backoff grows to minutes).
            channel = grpc.insecure_channel(orch, options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                           ("grpc.max_reconnect_backoff_ms", 500)])
            stub = pb_grpc.OrchestratorStub(channel)
            for n in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() >= stop_at:
                    break
                sent = time.monotonic()
                outcome = one_request(stub, rng, seed=index * 1_000_000 + n)
                with lock:
                    outcomes[outcome] += 1
                    if outcome not in ("ok", "cancelled", "deadline"):
                        failures.append((sent, outcome))
                if outcome not in ("ok", "cancelled", "deadline"):
                    time.sleep(0.05)  # a client backs off from a service that is down
            channel.close()

        kills: list[tuple[float, str]] = []
        failures: list[tuple[float, str]] = []
        orchestrator_down: list[float] = []  # from its kill until it serves again

        def chaos() -> None:
            # A draft, then a target, then the orchestrator: killed at 1/4, 1/2 and 3/4 of the soak,
            # each restarted on its address after a pause.
            for fraction, name in ((0.25, "draft0"), (0.5, "target0"), (0.75, "orch")):
                time.sleep(max(0.0, stop_at - SOAK_S * (1 - fraction) - time.monotonic()))
                for survivor, process in survivors.items():
                    memory_during[survivor].append(rss_mb(process))
                cluster.kill(name)
                kills.append((time.monotonic(), name))
                time.sleep(2.0)
                if name == "orch":
                    cluster.start_orchestrator()
                    orchestrator_down.extend((kills[-1][0], time.monotonic()))
                else:
                    cluster.start_worker(name)

        with ThreadPoolExecutor(CLIENTS + 1) as pool:
            chaos_done = pool.submit(chaos)
            for _ in pool.map(client, range(CLIENTS)):
                pass
            chaos_done.result()

        # Sessions: every worker back to 0 within the lease (the killed orchestrator's too).
        settle_started = time.monotonic()
        wait_until(lambda: sum(w.live_sessions() for w in cluster.workers()) == 0,
                   OWNER_LEASE_S + 10, interval=0.1,
                   what=f"worker sessions back to 0 ({ {n: w.live_sessions() for n, w in cluster.procs.items() if n != 'orch'} } at the end of the churn)")
        settled_s = time.monotonic() - settle_started
        with SpecdecClient(orch, timeout=10) as api:
            wait_until(lambda: api.status().active_generations == 0, 10, what="no generation in flight")
            status = api.status()
        assert all(r.active_sessions == 0 for r in status.replicas), status
        reclaimed = sum(w.info().metrics.sessions_reclaimed for w in cluster.workers())

        memory_after = {n: rss_mb(p) for n, p in survivors.items()}
        after = greedy_outputs(orch)
        errors = error_lines(cluster)

        # Only while the orchestrator was down may a request fail otherwise than by its own
        # deadline or cancel (a killed draft or target is failed over).
        down_from, down_to = orchestrator_down
        unexpected = Counter(o for t, o in failures if not down_from - 1.0 <= t <= down_to + 2.0)
        requests = sum(outcomes.values())
        print(f"\nsoak: {CLIENTS} clients x {SOAK_S:.0f} s, {requests} requests: "
              + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
              + f" (failed while the orchestrator was down for {down_to - down_from:.1f} s, else {dict(unexpected)})")
        print(f"  kills: {', '.join(name for _, name in kills)}; sessions reclaimed by the owner lease "
              f"(surviving workers): {reclaimed}; sessions back to 0 {settled_s:.1f} s after the churn")
        for name in survivors:
            during = ", ".join(f"{mb:.0f}" for mb in memory_during[name])
            print(f"  {name}: resident {memory_before[name]:.0f} MiB before, {during} at 1/4, 1/2 and 3/4, "
                  f"{memory_after[name]:.0f} MiB after")
        assert len(kills) == 3
        assert outcomes["ok"] > 0 and outcomes["cancelled"] > 0 and outcomes["deadline"] > 0, outcomes
        assert not unexpected, (unexpected, Counter(details).most_common(5))
        assert after == fresh
        for name in survivors:
            assert memory_after[name] <= memory_before[name] + MEMORY_BOUND_MB, (name, memory_before, memory_after)
        assert not errors, errors[:10]
    finally:
        cluster.stop()


details: list[str] = []


def one_request(stub: pb_grpc.OrchestratorStub, rng: random.Random, seed: int) -> str:
    """One request that completes, runs out of time or is cancelled; what happened."""
    prompt = f"spell {rng.randrange(1_000_000)}"
    sampled = rng.random() < 0.3
    request = build_request(prompt, max_tokens=rng.choice((8, 16, 32)), num_draft=rng.choice((3, "auto")),
                            temperature=1.0 if sampled else 0.0, seed=seed if sampled else None)
    fate = rng.random()
    deadline = rng.uniform(0.005, 0.3) if fate < 0.3 else 30.0
    try:
        if fate < 0.6:
            call = stub.GenerateStream(request, timeout=deadline)
            if 0.3 <= fate < 0.6:  # cancelled after 0-15 ms, or after its first chunk
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0, 0.015))
                else:
                    next(call, None)
                call.cancel()
                return "cancelled"
            for _ in call:
                pass
        else:
            future = stub.Generate.future(request, timeout=deadline)
            if fate > 0.85:
                time.sleep(rng.uniform(0, 0.015))
                future.cancel()
                return "cancelled"
            future.result()
        return "ok"
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.CANCELLED:
            return "cancelled"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "deadline"
        details.append(f"{code.name}: {error.details()}")
        return code.name.lower()  # UNAVAILABLE while the orchestrator restarts; counted, not failed


def error_lines(cluster: Cluster) -> list[str]:
    """ERROR lines and tracebacks in every log, less the orchestrator's lines naming a killed replica."""
    killed = {cluster.address(name) for name in ("draft0", "target0")}
    found = []
    for log in sorted(cluster.log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if not re.search(r"\bERROR\b|Traceback", line):
                continue
            if log.name.startswith("orchestrator") and any(a in line for a in killed):
                continue
            found.append(f"{log.name}: {line}")
    return found
