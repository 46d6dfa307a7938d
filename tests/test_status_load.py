"""Status reports each replica's live load (sessions, cache bytes used and their budget, typical
sessions that still fit, steps per second), read by the orchestrator's health watch from the replicas' own Info, and
``specdec status`` prints it. The reference is each worker's Info, asked directly."""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from harness import LoopThread, position_bytes, speculative_cluster, start_orchestrator_in, start_worker_in

from orchestrator import cli
from orchestrator.client import SpecdecClient
from orchestrator.replicas import Load
from specdec_core.cache_bytes import TYPICAL_PROMPT_TOKENS
from specdec_core.decoder_state import CHUNK
from specdec_core.session_host import HostLimits
from specdec_core.sizes import format_bytes
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc
from specdec_tools.tiny_checkpoints import corpus_lines

PROMPTS = corpus_lines()[11:200:19][:6]
HEALTH_S = 0.2
BUDGET = {"draft": 5 * 2**20, "target": 7 * 2**20}  # not the default, so the budget shown is the worker's


def wait_for(condition: Callable[[], object], what: str, deadline_s: float = 60.0) -> object:
    """Poll until ``condition()`` is truthy (the health watch reads every HEALTH_S seconds)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(HEALTH_S / 2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(loop: LoopThread, near_draft_dir: Path, target_dir: Path):
    with speculative_cluster(loop, near_draft_dir, target_dir, HostLimits(cache_memory_bytes=BUDGET["draft"]),
                             HostLimits(cache_memory_bytes=BUDGET["target"]), health_interval_s=HEALTH_S
                             ) as (client, draft, target, orch):
        channels = {w.role: grpc.insecure_channel(w.address) for w in (draft, target)}
        stubs = {"draft": pb_grpc.DraftStub(channels["draft"]), "target": pb_grpc.TargetStub(channels["target"])}
        yield client, orch, stubs, {"draft": draft, "target": target}
        for channel in channels.values():
            channel.close()


def by_role(client: SpecdecClient) -> dict[str, pb.ReplicaStatus]:
    return {r.role: r for r in client.status().replicas}


def agrees_with_info(client: SpecdecClient, stubs) -> bool:
    """Status's load equals each worker's own Info (while nothing changes it)."""
    status = by_role(client)
    for role, stub in stubs.items():
        info = stub.Info(pb.InfoRequest(), timeout=10)
        r = status[role]
        if (r.live_sessions, r.cache_bytes_used, r.cache_memory_bytes, r.typical_sessions_free) != (
                info.live_sessions, info.cache_bytes_used, info.limits.cache_memory_bytes, info.typical_sessions_free):
            return False
    return True


def test_status_reports_the_workers_sessions_and_cache(cluster, target_dir: Path) -> None:
    client, orch, stubs, _ = cluster
    for prompt in PROMPTS[:3]:
        client.generate(prompt, max_tokens=12, num_draft=3)
    # Sessions another orchestrator holds open (opened here directly): the load Status shows is
    # the replica's own, not only this orchestrator's.
    opened = {role: [stub.OpenSession(pb.OpenSessionRequest(prompt_ids=[5 + i, 6, 7, 1]), timeout=10).session_id
                     for i in range(2)] for role, stub in stubs.items()}
    try:
        wait_for(lambda: agrees_with_info(client, stubs) and by_role(client)["target"].live_sessions == 2,
                 "Status to show the 2 open sessions per replica")
        status = by_role(client)
        for role in stubs:
            r = status[role]
            assert r.healthy and r.live_sessions == 2 and r.active_sessions == 0  # none of them ours
            assert r.cache_memory_bytes == BUDGET[role] and 0 < r.cache_bytes_used < r.cache_memory_bytes
            # a typical prompt and one chunk of decoder positions (the draft has the target's shape)
            typical = (TYPICAL_PROMPT_TOKENS + CHUNK) * position_bytes(target_dir)
            assert r.typical_sessions_free == (BUDGET[role] - r.cache_bytes_used) // typical > 0
        # specdec status prints them: sessions, the cache bytes used (share of the budget) and free,
        # and the typical sessions that still fit, per replica.
        table = capsys_free_status(orch.address)
        for role in stubs:
            r = status[role]
            row = next(line for line in table.splitlines() if line.startswith(role))
            assert row.split()[1:4] == [r.address, "serving", "2"]
            cells = [cell.strip() for cell in re.split(r"\s{2,}", row)]
            assert cells[5:8] == [f"{format_bytes(r.cache_bytes_used)} ({100 * r.cache_bytes_used / BUDGET[role]:.1f}%)",
                                  format_bytes(BUDGET[role] - r.cache_bytes_used), str(r.typical_sessions_free)]
    finally:
        for role, ids in opened.items():
            for session_id in ids:
                stubs[role].CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=10)
    wait_for(lambda: agrees_with_info(client, stubs) and by_role(client)["draft"].live_sessions == 0,
             "Status to show the sessions closed")
    assert all(r.cache_bytes_used == 0 for r in client.status().replicas)


def capsys_free_status(address: str) -> str:
    """``specdec status``'s table."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli.main(["status", "--address", address])
    assert exit_info.value.code == 0
    return out.getvalue()


def test_steps_per_second_while_generations_run(cluster) -> None:
    client, orch, stubs, workers = cluster
    stop = threading.Event()
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            i = 0
            while not stop.is_set():
                client.generate(PROMPTS[i % len(PROMPTS)], max_tokens=16, num_draft=2)
                i += 1
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    try:
        busy = wait_for(lambda: (s := by_role(client)) and all(r.steps_per_s > 0 for r in s.values()) and s,
                        "steps_per_s > 0 on both replicas while generations run")
        assert all(r.healthy for r in busy.values())
        # A rate, not a counter: it cannot exceed the steps the worker answered in all.
        for role, worker in workers.items():
            assert busy[role].steps_per_s <= worker.host.snapshot()["steps"] / HEALTH_S * 2
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    # Idle again: no step in an interval between two checks reads as 0 steps per second.
    wait_for(lambda: all(r.steps_per_s == 0 for r in client.status().replicas), "steps_per_s back to 0")


def test_a_replica_that_stops_serving_shows_no_load(loop: LoopThread, near_draft_dir: Path, target_dir: Path) -> None:
    draft = start_worker_in(loop, "draft", near_draft_dir)
    target = start_worker_in(loop, "target", target_dir)
    orch = start_orchestrator_in(loop, [draft.address], [target.address], health_interval_s=HEALTH_S)
    try:
        with SpecdecClient(orch.address, timeout=60) as client:
            wait_for(lambda: by_role(client)["draft"].cache_memory_bytes > 0, "the draft's load")
            draft.stop()
            wait_for(lambda: not by_role(client)["draft"].healthy, "the draft marked down")
            down = wait_for(lambda: (r := by_role(client)["draft"]).cache_memory_bytes == 0 and r,
                            "the draft's load cleared")
            assert (down.live_sessions, down.cache_bytes_used, down.typical_sessions_free, down.steps_per_s) == (
                0, 0, 0, 0.0)
            assert by_role(client)["target"].cache_memory_bytes > 0
            table = capsys_free_status(orch.address)
            row = next(line for line in table.splitlines() if line.startswith("draft"))
            assert "down" in row and "%" not in row
    finally:
        orch.stop()
        target.stop()


def info(steps: int, sessions: int = 1, used: int = 10, budget: int = 100, typical: int = 3) -> pb.InfoResponse:
    return pb.InfoResponse(live_sessions=sessions, cache_bytes_used=used, limits=pb.Limits(cache_memory_bytes=budget),
                           typical_sessions_free=typical, metrics=pb.Metrics(steps=steps))


def test_load_rate_is_the_difference_of_two_readings() -> None:
    first = Load.read(info(40), at=10.0, before=None)
    assert first.steps_per_s == 0.0  # one reading: no rate yet
    second = Load.read(info(70), at=10.5, before=first)
    assert second.steps_per_s == pytest.approx(60.0)  # 30 steps in half a second
    assert (second.live_sessions, second.cache_bytes_used, second.cache_memory_bytes,
            second.typical_sessions_free) == (1, 10, 100, 3)
    restarted = Load.read(info(5), at=11.0, before=second)  # the counter went back: a restart
    assert restarted.steps_per_s == 0.0
    assert Load.read(info(20), at=12.0, before=restarted).steps_per_s == pytest.approx(15.0)
