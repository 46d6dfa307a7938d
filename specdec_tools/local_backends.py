"""The speculative loop's backends on ``SessionHost``s in this process: the same work as the
services with no gRPC and no process hops (the benchmark's in-process baseline).

It lives outside ``orchestrator/`` so that the orchestrator process never imports MLX.
"""

from __future__ import annotations

from orchestrator.backend_protocol import Backend
from specdec_core.session_host import SessionHost
from specdec_core.steps import Proposal, StepRequest, Verdict


class LocalBackend:
    """A draft or target SessionHost called directly (``step`` is its Propose or Verify)."""

    def __init__(self, host: SessionHost, address: str = "in-process"):
        self.host = host
        self.role = host.role
        self.address = address
        self.max_draft = host.limits.max_draft
        self.max_batch = host.limits.max_batch
        self.draft_method = host.engine.method if host.role == "draft" else ""

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        return (await self.host.open(prompt_ids, request_id)).id

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        return await (self.host.propose if self.host.role == "draft" else self.host.verify)(request)

    async def close(self, session_id: str) -> None:
        await self.host.close(session_id)


class LocalSource:
    """A ``BackendSource`` over one in-process draft and one target host; nothing fails over."""

    def __init__(self, draft_host: SessionHost, target_host: SessionHost):
        self.backends = {"draft": LocalBackend(draft_host), "target": LocalBackend(target_host)}

    def acquire(self, role: str, exclude: set[str]) -> LocalBackend | None:
        backend = self.backends[role]
        return None if backend.address in exclude else backend

    def release(self, backend: Backend) -> None:
        pass

    def report_failure(self, backend: Backend, error: Exception) -> None:
        pass

    def sessions_sharing(self, backend: Backend) -> int:
        return 1  # (this request's own: the in-process baseline runs one request at a time)
