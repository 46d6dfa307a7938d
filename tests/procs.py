"""Real specdec service processes for tests: start on a port, wait for the announce line, kill.

Starting and reading the announced port is ``specdec_tools.service_process`` (shared with
``scripts/up`` and ``specdec-bench``); this adds what tests ask of a running service. Each
start gets a fresh log file under the test's log directory, shown when a start fails.
``kill()`` is SIGKILL: no drain, no goodbye, as when a machine dies.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc
from specdec_tools import service_process

START_TIMEOUT_S = 90.0  # two shared cores, several processes importing MLX and torch-free transformers


def free_port() -> int:
    """A port nothing listens on now (to restart a replica on the same address later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess(service_process.ServiceProcess):
    """One running specdec process, with what tests read from it."""

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> ServiceProcess:
        self.wait_port(timeout)
        return self

    def peak_rss_mb(self) -> float:
        """VmHWM of the live process: its peak resident memory, MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc status")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def info(self, timeout: float = 5.0, metadata: Sequence[tuple[str, str]] = ()) -> pb.InfoResponse:
        """Info of a draft or target (plain channel)."""
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.DraftStub(channel) if self.role == "draft" else pb_grpc.TargetStub(channel)
            return stub.Info(pb.InfoRequest(), timeout=timeout, metadata=tuple(metadata))

    def live_sessions(self) -> int:
        return self.info().live_sessions


def start(role: str, args: Sequence[str], log_dir: Path, wait: bool = True) -> ServiceProcess:
    """Start ``specdec-<role> ARGS`` (pass ``--port``); waits for its announce line if ``wait``."""
    count = len(list(log_dir.glob(f"{role}-*.log")))
    service = ServiceProcess(role, args, log_dir / f"{role}-{count}.log")
    return service.wait_ready() if wait else service


def start_worker(role: str, model_dir: Path | str, log_dir: Path, port: int = 0,
                 extra: Sequence[str] = (), wait: bool = True) -> ServiceProcess:
    return start(role, ["--model", str(model_dir), "--port", str(port), "--log-level", "WARNING", *extra],
                 log_dir, wait)


def start_orchestrator(drafts: Sequence[str], targets: Sequence[str], log_dir: Path, port: int = 0,
                       extra: Sequence[str] = (), wait: bool = True) -> ServiceProcess:
    args = [f"--draft={d}" for d in drafts] or ["--no-draft"]
    args += [f"--target={t}" for t in targets]
    return start("orchestrator", [*args, "--port", str(port), "--log-level", "WARNING", *extra], log_dir, wait)


def start_all(services: Sequence[ServiceProcess]) -> list[ServiceProcess]:
    """Wait for processes started with ``wait=False`` (they load in parallel); kill all on failure."""
    try:
        return [s.wait_ready() for s in services]
    except BaseException:
        for s in services:
            s.kill()
        raise


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; returns it, or fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - a replica that is coming up may refuse
            last_error = error
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout:g}s (last error: {last_error})")
        time.sleep(interval)


# -- pacing an in-process orchestrator --------------------------------------------------------------


class Pacer:
    """Wraps the gRPC stubs of an in-process orchestrator's replicas: every OpenSession, Propose
    and Verify is recorded (method, timeout it carried, when) and its answer held back
    ``delay_s``, so a generation of tiny models lasts long enough to be killed or cancelled
    mid-way. The orchestrator's own code runs unchanged."""

    PACED = ("OpenSession", "Propose", "Verify")

    def __init__(self, pool, delay_s: float = 0.0):  # type: ignore[no-untyped-def]
        self.delay_s = delay_s
        self.calls: list[PacedCall] = []
        for replica in pool.replicas:
            replica.backend.stub = _PacedStub(replica.backend.stub, replica.address, self)

    def since(self, when: float, method: str | None = None) -> list[PacedCall]:
        return [c for c in self.calls if c.time >= when and (method is None or c.method == method)]


@dataclass
class PacedCall:
    address: str
    method: str
    timeout: float | None  # what the orchestrator passed as the call's timeout
    time: float  # time.monotonic() when it was sent


class _PacedStub:
    def __init__(self, stub, address: str, pacer: Pacer):  # type: ignore[no-untyped-def]
        self._stub = stub
        self._address = address
        self._pacer = pacer

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self._stub, name)
        if name.removesuffix("Stream") in Pacer.PACED and name.endswith("Stream"):
            return lambda metadata=(): _PacedStream(method(metadata=metadata), self._address,
                                                    name.removesuffix("Stream"), self._pacer)
        if name not in Pacer.PACED:
            return method
        pacer = self._pacer

        async def call(request, timeout=None, metadata=()):  # type: ignore[no-untyped-def]
            pacer.calls.append(PacedCall(self._address, name, timeout, time.monotonic()))
            response = await method(request, timeout=timeout, metadata=metadata)
            if pacer.delay_s:
                await asyncio.sleep(pacer.delay_s)
            return response

        return call


class _PacedStream:
    """A step stream (ProposeStream/VerifyStream call) whose steps are recorded and paced like
    unary calls: each write is a call, carrying its step's timeout_ms as the timeout."""

    def __init__(self, call, address: str, method: str, pacer: Pacer):  # type: ignore[no-untyped-def]
        self._call, self._address, self._method, self._pacer = call, address, method, pacer

    async def write(self, message) -> None:  # type: ignore[no-untyped-def]
        timeout = message.timeout_ms / 1e3 if message.timeout_ms else None
        sent = PacedCall(self._address, self._method, timeout, time.monotonic())
        # Recorded in the order sent: a Verify and the Propose drafting ahead beside it go out at
        # once, and their writes may finish in either order.
        self._pacer.calls.append(sent)
        try:
            await self._call.write(message)
        except BaseException:
            self._pacer.calls.remove(sent)  # a stream that had ended sends nothing: no call
            raise

    async def read(self):  # type: ignore[no-untyped-def]
        response = await self._call.read()
        if self._pacer.delay_s:
            await asyncio.sleep(self._pacer.delay_s)
        return response

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def cancel(self) -> bool:
        return self._call.cancel()


# -- the reference: the target alone, by transformers -------------------------------------------------


class GreedyReference:
    """transformers' greedy ``generate`` of the target alone (EOS cut), memoised per prompt."""

    def __init__(self, target_dir: Path):
        from transformers import T5ForConditionalGeneration

        from specdec_core.tokenizer import load_tokenizer

        self.model = T5ForConditionalGeneration.from_pretrained(target_dir).eval()
        self.tokenizer = load_tokenizer(target_dir)
        self._cache: dict[tuple[str, int], list[int]] = {}

    def __call__(self, prompt: str, max_tokens: int) -> list[int]:
        import torch

        key = (prompt, max_tokens)
        if key not in self._cache:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = self.model.generate(ids, do_sample=False, max_new_tokens=max_tokens)[0].tolist()[1:]
            eos = self.tokenizer.eos_token_id
            self._cache[key] = out[: out.index(eos)] if eos in out else out
        return self._cache[key]
