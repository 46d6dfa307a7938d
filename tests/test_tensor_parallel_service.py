"""A tensor-parallel target service (``specdec-target --tensor-parallel 2``) as a real process.

Rank 0 serves gRPC and starts rank 1 on a loopback MLX ring; every step is mirrored to rank 1
(specdec_core/rank_mirror.py). A draft, a single-process target replica and an orchestrator
(in this process, paced like tests/test_faults.py so a kill lands mid-stream) sit around it.

Reference: transformers' greedy ``generate`` of the target alone. The 2-rank target must give
it token for token, alone and with concurrent requests (batches), and seeded sampling must
give what the 1-rank target gives. Killing rank 1 mid-stream fails the request over to the
single-process replica with the same output, and the broken 2-rank target reports NOT_SERVING.
The tests skip only where MLX has no ring backend; one that does not start fails them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import LoopThread, RunningOrchestrator, start_orchestrator_in
from procs import START_TIMEOUT_S, GreedyReference, Pacer, ServiceProcess, start_all, start_worker, wait_until
from ring import fail_ring_start, skip_without_ring_backend

from orchestrator.client import SpecdecClient
from specdec_pb import specdec_pb2 as pb
from specdec_tools.tiny_checkpoints import corpus_lines

RANKS = 2
MAX_TOKENS = 48
NUM_DRAFT = 3
PACE_S = 0.03
CANDIDATES = corpus_lines()[13:1300:13]
PROMPTS = CANDIDATES[:6]

pytestmark = pytest.mark.timeout(300)


@dataclass
class Services:
    loop: LoopThread
    tp: ServiceProcess  # rank 0 of the 2-rank target (its own process group: every rank)
    follower_pid: int
    single: ServiceProcess  # a 1-rank target replica
    draft: ServiceProcess


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service="")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def _kill_group(process: ServiceProcess) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.kill()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, near_draft_dir: Path, target_dir: Path
             ) -> Iterator[Services]:
    skip_without_ring_backend()  # a ring that is available but does not start fails (tests/ring.py)
    log_dir = tmp_path_factory.mktemp("tp-service-logs")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")  # two ranks on two shared cores
    tp = ServiceProcess("target", ["--model", str(target_dir), "--port", "0", "--log-level", "INFO",
                                   "--tensor-parallel", str(RANKS)],
                        log_dir / "target-tp.log", env=env, new_session=True)
    others = [start_worker("target", target_dir, log_dir, wait=False),
              start_worker("draft", near_draft_dir, log_dir, wait=False)]
    loop = LoopThread()
    try:
        try:
            tp.wait_port(START_TIMEOUT_S)
        except RuntimeError as error:
            if "joined the ring" not in tp.log.read_text(errors="replace"):
                fail_ring_start(str(error))
            raise
        single, draft = start_all(others)
        found = re.search(r"follower rank\(s\) \(pids (\d+)\)", tp.log.read_text())
        assert found, "rank 0 did not log its follower's pid"
        yield Services(loop, tp, int(found.group(1)), single, draft)
    finally:
        loop.close()
        _kill_group(tp)
        for other in others:
            other.kill()


@pytest.fixture(scope="module")
def reference(target_dir: Path) -> GreedyReference:
    return GreedyReference(target_dir)


def _client(orch: RunningOrchestrator) -> SpecdecClient:
    return SpecdecClient(orch.address, timeout=60)


def test_info_reports_the_world_size(services: Services) -> None:
    info = services.tp.info()
    assert info.tensor_parallel == RANKS and info.role == "target"
    assert services.single.info().tensor_parallel == 1


def test_greedy_equals_the_target_alone(services: Services, reference: GreedyReference) -> None:
    """One request at a time, then all at once (steps of several sessions form batches)."""
    orch = start_orchestrator_in(services.loop, [services.draft.address], [services.tp.address],
                                 connect_timeout_s=30)
    try:
        with _client(orch) as client:
            for prompt in PROMPTS[:3]:
                response = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT)
                assert list(response.token_ids) == reference(prompt, MAX_TOKENS), prompt
                assert response.stats.target_replica == services.tp.address
            before = services.tp.info().metrics
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                responses = list(pool.map(
                    lambda p: client.generate(p, max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT), PROMPTS))
            for prompt, response in zip(PROMPTS, responses, strict=True):
                assert list(response.token_ids) == reference(prompt, MAX_TOKENS), prompt
            after = services.tp.info()
            batched = after.metrics.batched_steps - before.batched_steps
            batches = after.metrics.batches - before.batches
            print(f"concurrent: {batched} steps in {batches} batches")
            wait_until(lambda: services.tp.live_sessions() == 0, 30, what="sessions closed")
    finally:
        orch.stop()


def test_seeded_sampling_equals_the_one_rank_target(services: Services) -> None:
    """T=1 with a seed: the draws are keyed by position, so both targets give the same tokens."""
    outputs = {}
    for target in (services.tp, services.single):
        orch = start_orchestrator_in(services.loop, [services.draft.address], [target.address],
                                     connect_timeout_s=30)
        try:
            with _client(orch) as client:
                outputs[target.address] = [
                    list(client.generate(p, max_tokens=24, num_draft=NUM_DRAFT, temperature=1.0, seed=s).token_ids)
                    for p, s in zip(PROMPTS[:3], (1, 2, 3), strict=True)
                ]
        finally:
            orch.stop()
    assert outputs[services.tp.address] == outputs[services.single.address]


def test_sampling_on_two_ranks_matches_the_target_distribution(services: Services, target_dir: Path) -> None:
    """T=1 through the 2-rank target: the first two tokens follow the target's own sampling
    distribution (transformers, exactly enumerated): chi-square, as for the 1-rank target."""
    from types import SimpleNamespace

    from test_orchestrator import PROMPTS as SAMPLE_PROMPTS
    from test_orchestrator import (
        SAMPLE_PROMPT_INDEX,
        _chi_square_p,
        _exact_two_token_distribution,
        _sample_pairs,
    )
    from transformers import T5ForConditionalGeneration

    from specdec_core.tokenizer import load_tokenizer

    prompt = SAMPLE_PROMPTS[SAMPLE_PROMPT_INDEX]
    hf = SimpleNamespace(model=T5ForConditionalGeneration.from_pretrained(target_dir).eval(),
                         tokenizer=load_tokenizer(target_dir))
    exact = _exact_two_token_distribution(hf, prompt)
    orch = start_orchestrator_in(services.loop, [services.draft.address], [services.tp.address],
                                 connect_timeout_s=30)
    try:
        with _client(orch) as client:
            observed = _sample_pairs(client, prompt, n=1000, num_draft=2)
    finally:
        orch.stop()
    assert _chi_square_p(observed, exact) > 1e-3


def _greedy_alone(engine: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The target alone in this process, one token per pass (EOS cut, as the stream sends)."""
    state, out = engine.start(prompt_ids), []
    while len(out) < max_tokens:
        token = int(np.argmax(engine.forward(state, 1)[-1]))
        if token == engine.args.eos_token_id:
            break
        out.append(token)
        state.tokens.append(token)
    return out


def test_a_quantized_cache_on_two_ranks_gives_the_one_process_targets_output_with_that_cache(
        services: Services, reference: GreedyReference, target_dir: Path, tmp_path: Path) -> None:
    """``--tensor-parallel 2 --kv-bits 4``: both ranks quantize their heads' K/V (the follower gets
    the flag from rank 0's command line); speculative greedy output, alone and batched, is the
    4-bit-cache target's own (in this process), which here is not the unquantized target's."""
    from specdec_core.checkpoint import load_model
    from specdec_core.engine import ModelEngine

    tp = ServiceProcess("target", ["--model", str(target_dir), "--port", "0", "--log-level", "INFO",
                                   "--tensor-parallel", str(RANKS), "--kv-bits", "4"],
                        tmp_path / "tp-kv4.log", env=dict(os.environ, OPENBLAS_NUM_THREADS="1"), new_session=True)
    try:
        tp.wait_port(START_TIMEOUT_S)
        info = tp.info()
        assert (info.tensor_parallel, info.kv_bits, info.kv_group_size) == (RANKS, 4, 32)
        engine = ModelEngine(load_model(target_dir), kv_bits=4)
        expected = {p: _greedy_alone(engine, reference.tokenizer(p).input_ids, MAX_TOKENS) for p in PROMPTS}
        assert any(expected[p] != reference(p, MAX_TOKENS) for p in PROMPTS)
        orch = start_orchestrator_in(services.loop, [services.draft.address], [tp.address], connect_timeout_s=30)
        try:
            with _client(orch) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
                assert list(client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT).token_ids
                            ) == expected[PROMPTS[0]]
                responses = list(pool.map(
                    lambda p: client.generate(p, max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT), PROMPTS))
            for prompt, response in zip(PROMPTS, responses, strict=True):
                assert list(response.token_ids) == expected[prompt], prompt
        finally:
            orch.stop()
    finally:
        _kill_group(tp)


def test_killed_rank_fails_over_and_reports_not_serving(services: Services, reference: GreedyReference) -> None:
    """kill -9 of rank 1 mid-stream: the request finishes on the 1-rank replica with the target's
    greedy output; the 2-rank target reports NOT_SERVING and refuses new sessions. Last: it
    leaves the 2-rank target broken."""
    orch = start_orchestrator_in(services.loop, [services.draft.address],
                                 [services.tp.address, services.single.address],
                                 health_interval_s=0.1, connect_timeout_s=30)
    pacer = Pacer(orch.pool, PACE_S)
    try:
        with _client(orch) as client:
            streams: dict[str, list[pb.GenerateStreamResponse]] = {}

            def stream(prompt: str) -> None:
                streams[prompt] = list(client.stream(prompt, max_tokens=MAX_TOKENS, num_draft=NUM_DRAFT))

            # Two at once: the least-loaded choice puts one on each target. Prompts the target
            # does not end early, so the kill lands mid-stream.
            long = [p for p in CANDIDATES if len(reference(p, MAX_TOKENS)) == MAX_TOKENS][:2]
            with ThreadPoolExecutor(2) as pool:
                running = [pool.submit(stream, p) for p in long]
                wait_until(lambda: sum(1 for r in client.status().replicas if r.role == "target"
                                       and r.active_sessions) == 2, 30, what="one generation on each target")
                wait_until(lambda: sum(1 for c in pacer.calls if c.method == "Verify"
                                       and c.address == services.tp.address) >= 2, 30,
                           what="the 2-rank target verifying")
                os.kill(services.follower_pid, signal.SIGKILL)
                killed_at = time.monotonic()
                for future in running:
                    future.result()
            for prompt, chunks in streams.items():
                assert [t for c in chunks for t in c.token_ids] == reference(prompt, MAX_TOKENS), prompt
                assert chunks[-1].stats.target_replica == services.single.address
            assert any(c.method == "Verify" and c.address == services.tp.address and c.time < killed_at
                       for c in pacer.calls), "the 2-rank target never verified before the kill"
        assert services.tp.alive(), "rank 0 must stay up and report its state"
        wait_until(lambda: _health(services.tp.address) == health_pb2.HealthCheckResponse.NOT_SERVING, 10,
                   what="the 2-rank target NOT_SERVING")
        with grpc.insecure_channel(services.tp.address) as channel, pytest.raises(grpc.RpcError) as info:
            from specdec_pb import specdec_pb2_grpc as pb_grpc

            pb_grpc.TargetStub(channel).OpenSession(pb.OpenSessionRequest(prompt_ids=[5, 6, 1]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "tensor-parallel" in info.value.details()
    finally:
        orch.stop()


def test_a_rank_that_dies_while_idle_turns_health_not_serving(tmp_path: Path, target_dir: Path) -> None:
    """Ranks started as ``mlx.launch`` starts them (each its own process with MLX_RANK and
    MLX_HOSTFILE; rank 0 is no parent of rank 1, so it cannot watch its pid). With no traffic at
    all, kill -9 of rank 1 must still turn rank 0's health NOT_SERVING (its idle pings fail)."""
    skip_without_ring_backend()  # a ring that is available but does not start fails (tests/ring.py)
    from specdec_core.rank_mirror import adjacent_free_ports

    port = adjacent_free_ports(RANKS)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + rank}"] for rank in range(RANKS)]))
    args = ["--model", str(target_dir), "--port", "0", "--log-level", "INFO", "--watchdog-s", "0"]
    ranks = [ServiceProcess("target", args, tmp_path / f"rank-{rank}.log", new_session=True,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1", MLX_RANK=str(rank),
                                     MLX_HOSTFILE=str(hostfile)))
             for rank in range(RANKS)]
    try:
        try:
            ranks[0].wait_port(START_TIMEOUT_S)
        except RuntimeError as error:
            if "joined the ring" not in ranks[0].log.read_text(errors="replace"):
                fail_ring_start(str(error))
            raise
        assert ranks[0].info().tensor_parallel == RANKS
        time.sleep(1.5)  # idle pings to a live rank keep it serving
        assert _health(ranks[0].address) == health_pb2.HealthCheckResponse.SERVING
        os.kill(ranks[1].pid, signal.SIGKILL)
        wait_until(lambda: _health(ranks[0].address) == health_pb2.HealthCheckResponse.NOT_SERVING, 15,
                   what="rank 0 NOT_SERVING after rank 1 died while idle")
        assert ranks[0].alive()
    finally:
        for rank in ranks:
            _kill_group(rank)


def test_followers_do_not_get_the_token_on_their_command_line(tmp_path: Path, target_dir: Path) -> None:
    """``--tensor-parallel 2 --auth-token T``: the follower rank 0 starts serves no RPC and needs
    no token, so ``ps`` (its /proc cmdline) must not show it; rank 0 still demands it."""
    skip_without_ring_backend()  # a ring that is available but does not start fails (tests/ring.py)
    secret = "tp-rank-token-s3cret"
    tp = ServiceProcess("target", ["--model", str(target_dir), "--port", "0", "--log-level", "INFO",
                                   "--tensor-parallel", str(RANKS), "--auth-token", secret],
                        tmp_path / "tp.log", env=dict(os.environ, OPENBLAS_NUM_THREADS="1"), new_session=True)
    try:
        try:
            tp.wait_port(START_TIMEOUT_S)
        except RuntimeError as error:
            if "joined the ring" not in tp.log.read_text(errors="replace"):
                fail_ring_start(str(error))
            raise
        found = re.search(r"follower rank\(s\) \(pids (\d+)\)", tp.log.read_text())
        assert found, "rank 0 did not log its follower's pid"
        cmdline = Path(f"/proc/{found.group(1)}/cmdline").read_bytes().split(b"\0")
        assert b"--tensor-parallel" in cmdline and not any(secret.encode() in arg for arg in cmdline)
        assert secret.encode() in Path(f"/proc/{tp.pid}/cmdline").read_bytes()  # (the test sees cmdlines)
        with pytest.raises(grpc.RpcError) as info:
            tp.info()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert tp.info(metadata=[("authorization", f"Bearer {secret}")]).tensor_parallel == RANKS
    finally:
        _kill_group(tp)
