"""Load: 32 concurrent streaming clients for 30 s against 2 drafts + 2 targets + 1 orchestrator,
all real processes on loopback, tiny models. Deselected by default; run with ``-m load``.

Every client loops (bounded by time and count) over prompts, two greedy requests out of three
(checked token for token against the target alone) and one sampled. At the end: no unexpected
error, no session left on any service, and the figures (clients x seconds, tokens/s, errors,
leaked sessions, peak RSS per process, and each worker's mean batch size under load: steps per
batched forward pass, from its Info counters before and after) are printed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from procs import GreedyReference, ServiceProcess, start_all, start_orchestrator, start_worker, wait_until

from orchestrator.client import SpecdecClient
from specdec_pb import specdec_pb2 as pb
from specdec_tools.tiny_checkpoints import corpus_lines

CLIENTS = 32
DURATION_S = 30.0
MAX_REQUESTS_PER_CLIENT = 10_000  # the loops are bounded by time and by count
MAX_TOKENS = 24
PROMPTS = corpus_lines()[7:700:29][:16]

# A plain ``pytest`` leaves this out: pyproject's addopts has ``-m 'not load'`` (checked by
# tests/test_load_selection.py); ``-m load`` selects it.
pytestmark = [pytest.mark.load, pytest.mark.timeout(900)]


def test_32_streaming_clients_for_30_seconds(tmp_path: Path, near_draft_dir: Path, target_dir: Path) -> None:
    reference = GreedyReference(target_dir)
    expected = {p: reference(p, MAX_TOKENS) for p in PROMPTS}
    workers = [start_worker(role, near_draft_dir if role == "draft" else target_dir, tmp_path, wait=False)
               for role in ("draft", "draft", "target", "target")]
    processes: list[ServiceProcess] = list(workers)
    try:
        start_all(workers)
        drafts, targets = [w.address for w in workers[:2]], [w.address for w in workers[2:]]
        orch = start_orchestrator(drafts, targets, tmp_path)
        processes.append(orch)

        stop_at = time.monotonic() + DURATION_S
        tokens = Counter[str]()
        errors: list[str] = []
        mismatches: list[str] = []
        lock = threading.Lock()

        def client(index: int) -> int:
            requests = 0
            with SpecdecClient(orch.address, timeout=60) as api:
                while time.monotonic() < stop_at and requests < MAX_REQUESTS_PER_CLIENT:
                    prompt = PROMPTS[(index + requests) % len(PROMPTS)]
                    greedy = requests % 3 != 2
                    options = dict(max_tokens=MAX_TOKENS, num_draft=3) if greedy else dict(
                        max_tokens=MAX_TOKENS, num_draft="auto", temperature=1.0, seed=index * 100_000 + requests)
                    requests += 1
                    try:
                        chunks = list(api.stream(prompt, **options))
                    except grpc.RpcError as error:
                        with lock:
                            errors.append(f"{error.code().name}: {error.details()}")
                        continue
                    got = [t for c in chunks for t in c.token_ids]
                    with lock:
                        tokens["greedy" if greedy else "sampled"] += len(got)
                        if greedy and got != expected[prompt]:
                            mismatches.append(prompt)
                        if not chunks or chunks[-1].finish_reason not in ("eos", "length"):
                            errors.append(f"stream without a finish reason: {prompt!r}")
            return requests

        cpu_before = {p.pid: p.cpu_seconds() for p in processes}
        batches_before = {w.pid: w.info().metrics for w in workers}
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            requests = sum(pool.map(client, range(CLIENTS)))
        elapsed = time.monotonic() - started

        with SpecdecClient(orch.address, timeout=10) as api:
            wait_until(lambda: api.status().active_generations == 0, 5, what="no generation in flight")
            status = api.status()
        leaked = _sessions_left(workers, within_s=5)
        usage = {f"{p.role} {p.address}": (p.peak_rss_mb(), p.cpu_seconds() - cpu_before[p.pid]) for p in processes}
        batching = {f"{w.role} {w.address}": _mean_batch(batches_before[w.pid], w.info().metrics) for w in workers}
        total = sum(tokens.values())
        print(f"\nload: {CLIENTS} clients x {elapsed:.1f} s, {requests} requests, {total} tokens "
              f"({total / elapsed:.0f} tokens/s; greedy {tokens['greedy']}, sampled {tokens['sampled']}), "
              f"{len(errors)} errors, {len(mismatches)} greedy mismatches, leaked sessions {leaked}")
        for name, (mb, cpu) in usage.items():
            print(f"  {name}: peak RSS {mb:.0f} MiB, {cpu:.1f} CPU s under load"
                  + (f", {batching[name]}" if name in batching else ""))
        assert not errors, Counter(errors).most_common(5)
        assert leaked == 0
        assert not mismatches, mismatches[:5]
        assert all(r.active_sessions == 0 and r.healthy for r in status.replicas)
        assert requests >= CLIENTS and total > 0
    finally:
        for process in processes:
            process.kill()


def _mean_batch(before: pb.Metrics, after: pb.Metrics) -> str:
    """Steps per batched forward pass between two Info reads: n/a where no batch was counted
    (a worker that runs every step alone does not count batches)."""
    batches, steps = after.batches - before.batches, after.batched_steps - before.batched_steps
    if batches <= 0:
        return f"mean batch n/a ({after.steps - before.steps} steps, no batches counted)"
    return f"mean batch {steps / batches:.2f} ({steps} steps in {batches} batches)"


def _sessions_left(workers: list[ServiceProcess], within_s: float) -> int:
    """Sessions still open on the services once ``within_s`` passed (or as soon as none are)."""
    deadline = time.monotonic() + within_s
    while True:
        live = sum(w.live_sessions() for w in workers)
        if live == 0 or time.monotonic() > deadline:
            return live
        time.sleep(0.1)
