"""The cache formula against a worker's real memory: start ``specdec-target`` on a model, open
N sessions of a known prompt length (each with one step, which allocates its first decoder
chunk), and compare the growth of the process's resident memory (``VmRSS``; its high-water mark
``VmHWM`` too) with the bytes the formula says those sessions hold (Info ``cache_bytes_used``).
Linux only (it reads ``/proc``). The figures in docs/bench/cache_memory.md come from it::

    python -m specdec_tools.bench.big_checkpoint cache --model models/demo-target --sessions 200

``--until-refused`` opens up to N sessions and stops at the first the worker refuses
(RESOURCE_EXHAUSTED: its ``--cache-memory`` is spent), recording the refusal and the budget, so
the peak can be held against the weights + the budget (docs/bench/t5_11b.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1024**2


@dataclass
class CacheMeasurement:
    command: str
    sessions: int
    prompt_tokens: int
    bytes_per_position: int  # Info.cache_bytes_per_position
    formula_bytes: int  # Info.cache_bytes_used with every session open: what the formula counts
    rss_before: int  # the worker's resident memory once it serves, before any session
    rss_open: int  # with every session open
    hwm_before: int
    hwm_open: int
    rss_closed: int  # after closing them all (MLX keeps freed buffers for reuse)
    open_seconds: float
    budget_bytes: int = 0  # Info.limits.cache_memory_bytes
    refusal: str = ""  # until refused: the RESOURCE_EXHAUSTED message of the session it refused

    @property
    def growth(self) -> int:
        return self.rss_open - self.rss_before

    @property
    def ratio(self) -> float:
        return self.growth / self.formula_bytes if self.formula_bytes else float("nan")

    def line(self) -> str:
        return (f"{self.sessions} sessions x {self.prompt_tokens}-token prompt ({self.bytes_per_position} B a "
                f"position): formula {self.formula_bytes / MIB:.1f} MiB, resident growth {self.growth / MIB:.1f} MiB "
                f"(x{self.ratio:.3f}); VmHWM {self.hwm_before / MIB:.0f} -> {self.hwm_open / MIB:.0f} MiB; "
                f"after closing {self.rss_closed / MIB:.0f} MiB resident  ({self.command})")


def process_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def measure_cache(model: Path, options: list[str], sessions: int, prompt_tokens: int, log: Path,
                  settle_s: float = 1.0, until_refused: bool = False) -> CacheMeasurement:
    """Open ``sessions`` sessions of ``prompt_tokens`` on ``specdec-target --model MODEL OPTIONS``
    and measure its resident memory before and after (see the module's docstring); with
    ``until_refused``, stop early at the first RESOURCE_EXHAUSTED."""
    import grpc

    from specdec_pb import specdec_pb2 as pb
    from specdec_pb import specdec_pb2_grpc as pb_grpc
    from specdec_tools.service_process import ServiceProcess

    argv = ["--model", str(model), "--port", "0", "--max-sessions", str(sessions + 1),
            "--max-prompt-tokens", str(max(2048, prompt_tokens)), "--session-ttl", "3600", *options]
    with ServiceProcess("target", argv, log) as service:
        service.wait_port(timeout=3600)
        channel = grpc.insecure_channel(service.address)
        stub = pb_grpc.TargetStub(channel)
        info = stub.Info(pb.InfoRequest(), timeout=60)
        prompt = [2 + i % (info.vocab_size - 2) for i in range(prompt_tokens)]  # no pad (0) or EOS (1)
        time.sleep(settle_s)
        rss_before, hwm_before = process_memory(service.pid)
        started = time.monotonic()
        opened: list[str] = []
        refusal = ""
        for _ in range(sessions):
            try:
                session = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=prompt), timeout=3600).session_id
            except grpc.RpcError as error:
                if not (until_refused and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                refusal = error.details() or ""
                break
            # The first step allocates the session's first decoder chunk (its open reserved it).
            stub.Verify(pb.VerifyRequest(session_id=session, expected_length=1, num_draft=0), timeout=3600)
            opened.append(session)
        open_seconds = time.monotonic() - started
        info = stub.Info(pb.InfoRequest(), timeout=60)
        time.sleep(settle_s)
        rss_open, hwm_open = process_memory(service.pid)
        for session in opened:
            stub.CloseSession(pb.CloseSessionRequest(session_id=session), timeout=60)
        time.sleep(settle_s)
        rss_closed, _ = process_memory(service.pid)
        channel.close()
    return CacheMeasurement(" ".join(["specdec-target", *argv]), len(opened), prompt_tokens,
                            info.cache_bytes_per_position, info.cache_bytes_used, rss_before, rss_open, hwm_before,
                            hwm_open, rss_closed, open_seconds, info.limits.cache_memory_bytes, refusal)
