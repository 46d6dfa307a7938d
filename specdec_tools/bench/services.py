"""Systems (a), (b), (b') and (b''): draft, target and orchestrator as real processes on loopback
gRPC ((b'') through a second orchestrator, with --unary-steps)."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from specdec_tools.service_process import ServiceProcess

from .cells import Run

START_TIMEOUT_S = 300.0


class Services:
    """Draft, target and orchestrator as three processes; (a) and (b) call the orchestrator."""

    def __init__(self, draft: Path, target: Path, dtype: str | None, env: dict[str, str],
                 unary_steps_baseline: bool = True, log_dir: Path | None = None, log_prefix: str = ""):
        """Start draft and target (they load while the caller does other work; see ``connect``).
        ``unary_steps_baseline``: ``connect`` also starts the (b'') orchestrator. Each service logs
        to ``log_dir/PREFIXROLE.log`` (kept), or to a temporary directory removed on ``close``."""
        model_args = ["--dtype", dtype] if dtype else []
        self.env = env
        self.unary_steps_baseline = unary_steps_baseline
        self.logs = tempfile.TemporaryDirectory(prefix="specdec-bench-")  # shown if a start fails
        self.log_dir = log_dir or Path(self.logs.name)
        self.log_prefix = log_prefix
        self.processes: list[ServiceProcess] = []
        self.client: Any = None
        self.unary_client: Any = None  # (b''): an orchestrator with --unary-steps
        try:
            self._start("draft", ["--model", str(draft), *model_args])
            self._start("target", ["--model", str(target), *model_args])
        except BaseException:
            self.close()
            raise

    def connect(self) -> Services:
        """Wait for draft and target, start the orchestrator in front of them, connect to it."""
        from orchestrator.client import SpecdecClient

        try:
            draft, target = self.processes[:2]
            for process in (draft, target):
                process.wait_port(START_TIMEOUT_S)
            replicas = ["--draft", draft.address, "--target", target.address]
            orchestrator = self._start("orchestrator", replicas)
            orchestrator.wait_port(START_TIMEOUT_S)
            self.client = SpecdecClient(orchestrator.address, timeout=600)
            if self.unary_steps_baseline:
                unary = self._start("orchestrator", [*replicas, "--unary-steps"], log_name="orchestrator-unary")
                unary.wait_port(START_TIMEOUT_S)
                self.unary_client = SpecdecClient(unary.address, timeout=600)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, role: str, args: list[str], log_name: str = "") -> ServiceProcess:
        process = ServiceProcess(role, [*args, "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                                 self.log_dir / f"{self.log_prefix}{log_name or role}.log", env=self.env)
        self.processes.append(process)
        return process

    def empty_call_floor(self, calls: int = 200) -> dict[str, float | None]:
        """An empty unary call (health Check) from here to the target, ``calls`` times: its p50
        wall time and CPU time per call (this process and the target's), the floor under
        every Propose and Verify on this machine."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.processes[1].address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest(service="")
            for _ in range(20):
                check(request, timeout=10)
            target_cpu, cpu = process_cpu_s(self.processes[1].pid), time.process_time()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                check(request, timeout=10)
                times.append(time.perf_counter() - start)
            cpu = time.process_time() - cpu
            target_after = process_cpu_s(self.processes[1].pid)
        return {
            "calls": calls,
            "wall_ms_p50": 1e3 * statistics.median(times),
            "cpu_ms": 1e3 * (cpu + target_after - target_cpu) / calls
            if target_cpu is not None and target_after is not None else None,
        }

    def cpu_s(self) -> float | None:
        """CPU seconds the three service processes have used so far (Linux; None elsewhere)."""
        total = 0.0
        for process in self.processes:
            used = process_cpu_s(process.pid)
            if used is None:
                return None
            total += used
        return total

    def generate(self, prompt: str, index: int, max_tokens: int, k: str | None, temperature: float,
                 seed: int, pipeline: bool = True, unary_steps: bool = False) -> Run:
        options = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, speculative=k is not None,
                       num_draft=k if k == "auto" else int(k or 1), pipeline=pipeline)
        client = self.unary_client if unary_steps else self.client
        services_cpu, cpu = self.cpu_s(), time.process_time()
        start = time.perf_counter()
        response = client.generate(prompt, **options)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        services_after = self.cpu_s()
        if services_cpu is None or services_after is None:
            total_cpu = None
        else:
            total_cpu = cpu + services_after - services_cpu
        s = response.stats
        return Run(index, wall, s.tokens, list(response.token_ids), s.steps, s.target_passes, s.draft_passes,
                   s.proposed, s.accepted, s.draft_ms / 1e3, s.verify_ms / 1e3, s.total_ms / 1e3,
                   s.wire_bytes, total_cpu, s.predrafts, s.predraft_hits, s.wasted_draft_tokens,
                   list(s.steps_per_num_draft))

    def close(self) -> None:
        for client in (self.client, self.unary_client):
            if client is not None:
                client.close()
        for process in reversed(self.processes):
            process.stop()
        self.logs.cleanup()


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds all threads of a process have run, from /proc/PID/task/*/schedstat (ns
    precision, unlike the 10 ms ticks of /proc/PID/stat). None where /proc has no schedstat."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return None
    return total / 1e9
