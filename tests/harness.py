"""Run real gRPC servers in-process on port 0, on an event loop in a background thread
(``specdec_tools.loop_thread.LoopThread``).

Tests talk to them with ordinary synchronous gRPC channels, exactly as a client would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from draft_service.servicer import SERVICE_NAME as DRAFT_SERVICE
from draft_service.servicer import DraftServicer
from draft_service.servicer import add_to_server as add_draft
from orchestrator.client import SpecdecClient
from specdec_core.session_host import HostLimits, SessionHost
from specdec_grpc.server import RunningServer
from specdec_grpc.worker import WorkerConfig, start_worker
from specdec_tools.loop_thread import LoopThread
from target_service.servicer import SERVICE_NAME as TARGET_SERVICE
from target_service.servicer import TargetServicer
from target_service.servicer import add_to_server as add_target

T = TypeVar("T")


class Worker:
    """A running draft or target server and its session host."""

    def __init__(self, loop: LoopThread, running: RunningServer, host: SessionHost, role: str):
        self.loop = loop
        self.running = running
        self.host = host
        self.role = role

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self, grace: float = 0) -> None:
        async def _stop() -> None:
            await self.running.server.stop(grace)
            await self.host.stop()

        self.loop.call(_stop())


def start_worker_in(loop: LoopThread, role: str, model_dir: Any, limits: HostLimits | None = None,
                    **config: Any) -> Worker:
    servicer, add, name = (
        (DraftServicer, add_draft, DRAFT_SERVICE) if role == "draft" else (TargetServicer, add_target, TARGET_SERVICE)
    )
    cfg = WorkerConfig(role=role, model=str(model_dir), limits=limits or HostLimits(), port=0, **config)
    running, host = loop.call(start_worker(cfg, servicer, add, name))
    return Worker(loop, running, host, role)


def position_bytes(model_dir: Any) -> int:
    """What one cached position (a prompt token or a decoder slot) costs a session of this float32
    test model, worked out by hand: K and V of d_kv float32 values per decoder layer and head."""
    from specdec_core.checkpoint import read_config
    from specdec_core.t5 import ModelArgs

    args = ModelArgs.from_dict(read_config(Path(model_dir)))
    return 2 * args.num_decoder_layers * args.num_heads * args.d_kv * 4


def run_sync(loop: LoopThread, fn: Callable[[], Awaitable[T]]) -> T:
    return loop.call(fn())  # type: ignore[arg-type]


class RunningOrchestrator:
    def __init__(self, loop: LoopThread, running: RunningServer, pool: Any, orchestrator: Any):
        self.loop = loop
        self.running = running
        self.pool = pool
        self.orchestrator = orchestrator

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self) -> None:
        async def _stop() -> None:
            await self.running.server.stop(0)
            await self.pool.close()

        self.loop.call(_stop())


def start_orchestrator_in(loop: LoopThread, drafts: list[str], targets: list[str], **config: Any
                          ) -> RunningOrchestrator:
    from orchestrator.server import OrchestratorConfig, start_orchestrator

    cfg = OrchestratorConfig(drafts=drafts, targets=targets, port=0, **config)
    running, pool, orchestrator = loop.call(start_orchestrator(cfg))
    return RunningOrchestrator(loop, running, pool, orchestrator)


@contextmanager
def speculative_cluster(loop: LoopThread, draft_dir: Any, target_dir: Any, draft_limits: HostLimits | None = None,
                        target_limits: HostLimits | None = None, **orchestrator_config: Any
                        ) -> Iterator[tuple[SpecdecClient, Worker, Worker, RunningOrchestrator]]:
    """One draft, one target and an orchestrator in-process, with a client; all stopped after."""
    draft = start_worker_in(loop, "draft", draft_dir, draft_limits)
    target = start_worker_in(loop, "target", target_dir, target_limits)
    orch = start_orchestrator_in(loop, [draft.address], [target.address], **orchestrator_config)
    client = SpecdecClient(orch.address, timeout=60)
    try:
        yield client, draft, target, orch
    finally:
        client.close()
        orch.stop()
        draft.stop()
        target.stop()

