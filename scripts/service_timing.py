#!/usr/bin/env python3
"""Round-trip cost and wire size of the draft and target services.

Starts ``specdec-draft`` and ``specdec-target`` as real processes (tiny random checkpoints
unless --draft/--target name others), then measures over loopback gRPC:

- p50 / p90 round trip of an empty Info call (what the RPC machinery itself costs);
- p50 / p90 of a Propose (k=5) and a Verify of 6 tokens (1 accepted + k=5 drafts), greedy,
  rolled back every time through ``rollback_to`` so the session does not grow;
- bytes per Verify (request + response, serialized) greedy and at temperature 1, where the
  request carries the draft's distributions q (dense float16, or sparse after top-k).

Usage: scripts/service_timing.py [--draft DIR] [--target DIR] [--calls 500] [--steps 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc
from specdec_tools.service_process import ServiceProcess

PROMPT = [37, 12, 99, 250, 8, 41, 1]
K = 5
START_TIMEOUT_S = 120.0


def service(role: str, model: Path, log_dir: Path) -> ServiceProcess:
    """``specdec-<role>`` on a free port, logging to ``log_dir``; wait for its address with ``wait_port``."""
    return ServiceProcess(role, ["--model", str(model), "--port", "0", "--log-level", "WARNING"],
                          log_dir / f"{role}.log")


def timed(call: Callable[[], object], n: int, warmup: int = 20) -> list[float]:
    """Milliseconds per call, after a warm-up."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    from specdec_tools.tiny_checkpoints import build_t5, train_tokenizer

    tokenizer = train_tokenizer(root / "tokenizer")
    target = build_t5(root / "target", tokenizer, "v1_1", seed=2)
    draft = build_t5(root / "draft", tokenizer, "v1_1", seed=3, d_model=32, d_kv=8, d_ff=64,
                     num_layers=1, num_heads=4)
    return draft, target


def measure(draft_address: str, target_address: str, calls: int, steps: int) -> None:
    draft_channel = grpc.insecure_channel(draft_address)
    target_channel = grpc.insecure_channel(target_address)
    draft = pb_grpc.DraftStub(draft_channel)
    target = pb_grpc.TargetStub(target_channel)
    draft_info, target_info = draft.Info(pb.InfoRequest()), target.Info(pb.InfoRequest())
    vocab = target_info.vocab_size
    rows: list[tuple[str, str, str]] = []

    for name, stub in (("draft", draft), ("target", target)):
        ms = timed(lambda stub=stub: stub.Info(pb.InfoRequest()), calls)
        rows.append((f"Info (empty), {name}", f"{statistics.median(ms):.3f}", f"{percentile(ms, 90):.3f}"))

    draft_id = draft.OpenSession(pb.OpenSessionRequest(prompt_ids=PROMPT)).session_id
    first = draft.Propose(pb.ProposeRequest(session_id=draft_id, expected_length=1, num_draft=K))
    propose = pb.ProposeRequest(session_id=draft_id, expected_length=first.length, rollback_to=1,
                                num_draft=K)
    ms = timed(lambda: draft.Propose(propose), steps)
    rows.append((f"Propose k={K} greedy", f"{statistics.median(ms):.3f}", f"{percentile(ms, 90):.3f}"))

    block = [first.tokens[0], *first.tokens]  # one accepted token + k drafts = 6 tokens
    target_id = target.OpenSession(pb.OpenSessionRequest(prompt_ids=PROMPT)).session_id
    length = target.Verify(pb.VerifyRequest(session_id=target_id, expected_length=1, append_tokens=block,
                                            num_draft=K)).length
    verify = pb.VerifyRequest(session_id=target_id, expected_length=length, rollback_to=1,
                              append_tokens=block, num_draft=K)
    ms = timed(lambda: target.Verify(verify), steps)
    rows.append((f"Verify {len(block)} tokens (k={K}) greedy", f"{statistics.median(ms):.3f}",
                 f"{percentile(ms, 90):.3f}"))

    sizes: list[tuple[str, int, int, int]] = []
    for label, sampling in (
        ("greedy", pb.SamplingParams()),
        ("temperature 1, dense q", pb.SamplingParams(temperature=1.0)),
        ("temperature 1, top_k 50", pb.SamplingParams(temperature=1.0, top_k=50)),
    ):
        proposal = draft.Propose(pb.ProposeRequest(session_id=draft_id, expected_length=propose.expected_length,
                                                   rollback_to=1, num_draft=K, sampling=sampling, seed=7))
        request = pb.VerifyRequest(session_id=target_id, expected_length=length, rollback_to=1,
                                   append_tokens=[block[0], *proposal.tokens], num_draft=len(proposal.tokens),
                                   sampling=sampling, seed=8, draft_distributions=proposal.distributions)
        response = target.Verify(request)
        length = response.length
        propose.expected_length = proposal.length
        sizes.append((label, request.ByteSize(), response.ByteSize(), len(proposal.tokens)))
        if sampling.temperature:
            again = pb.VerifyRequest()
            again.CopyFrom(request)
            again.expected_length = response.length  # rollback_to=1 keeps the length fixed
            ms = timed(lambda again=again: target.Verify(again), steps // 2, warmup=5)
            rows.append((f"Verify k={K}, {label}", f"{statistics.median(ms):.3f}", f"{percentile(ms, 90):.3f}"))

    print(f"host: {platform.machine()} {platform.system()}, Python {platform.python_version()}, "
          f"grpcio {grpc.__version__}, BLAS {target_info.blas}")
    print(f"draft:  {draft_info.num_parameters:,} parameters ({draft_info.dtype}); "
          f"target: {target_info.num_parameters:,} parameters ({target_info.dtype}); vocabulary {vocab}")
    print(f"loopback gRPC, separate processes; Info x{calls}, Propose/Verify x{steps}\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'round trip':<{width}}  {'p50 ms':>8}  {'p90 ms':>8}")
    for label, p50, p90 in rows:
        print(f"{label:<{width}}  {p50:>8}  {p90:>8}")
    print()
    width = max(len(s[0]) for s in sizes) + 14
    print(f"{'bytes per Verify':<{width}}  {'request':>8}  {'response':>8}  {'total':>8}")
    for label, request_bytes, response_bytes, k in sizes:
        print(f"{label + f' (k={k})':<{width}}  {request_bytes:>8}  {response_bytes:>8}  "
              f"{request_bytes + response_bytes:>8}")
    print(f"\ndense q costs 2 bytes x vocabulary per draft position: {2 * vocab} B here, "
          f"{2 * 32128} B at T5's 32,128")
    draft.CloseSession(pb.CloseSessionRequest(session_id=draft_id))
    target.CloseSession(pb.CloseSessionRequest(session_id=target_id))
    draft_channel.close()
    target_channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", type=Path, help="draft checkpoint (default: a tiny random one)")
    parser.add_argument("--target", type=Path, help="target checkpoint (default: a tiny random one)")
    parser.add_argument("--calls", type=int, default=500, help="Info calls timed")
    parser.add_argument("--steps", type=int, default=200, help="Propose / Verify calls timed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.draft is None or args.target is None:
            draft_dir, target_dir = tiny_checkpoints(Path(tmp))
        draft_dir = args.draft or draft_dir
        target_dir = args.target or target_dir
        with service("draft", draft_dir, Path(tmp)) as draft, service("target", target_dir, Path(tmp)) as target:
            for process in (draft, target):  # they load in parallel
                process.wait_port(START_TIMEOUT_S)
            measure(draft.address, target.address, args.calls, args.steps)


if __name__ == "__main__":
    main()
