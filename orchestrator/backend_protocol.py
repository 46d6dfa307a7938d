"""What the speculative loop needs of a replica, in the loop's own terms: ``Backend`` (one replica
of a role), ``BackendSource`` (hands replicas out) and ``ReplicaError`` (how a call on one fails,
by ``ReplicaFailure``). No transport here: ``backends.GrpcBackend`` translates gRPC to these at
the edge, ``specdec_tools.local_backends`` serves them in one process.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Protocol

from specdec_core.errors import SpecdecError
from specdec_core.steps import Proposal, StepRequest, Verdict


class Backend(Protocol):
    """One replica of a role, as the loop uses it. What its Info says is known from the moment
    the source hands it out (0 or "": unknown)."""

    role: str  # "draft" or "target"
    address: str
    max_draft: int  # the largest k the replica takes (--max-draft)
    max_batch: int  # the most steps one of its batches holds (--max-batch)
    draft_method: str  # how a draft replica drafts (Info.draft_method); "" for a target

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str: ...
    async def step(self, request: StepRequest) -> Proposal | Verdict: ...  # Proposal: draft; Verdict: target
    async def close(self, session_id: str) -> None: ...


class BackendSource(Protocol):
    """Hands out replicas of a role ("draft" or "target") and hears about their failures."""

    def acquire(self, role: str, exclude: set[str]) -> Backend | None: ...
    def release(self, backend: Backend) -> None: ...
    def report_failure(self, backend: Backend, error: Exception) -> None: ...

    def sessions_sharing(self, backend: Backend) -> int:
        """Sessions on this target replica that may share its passes (at least 1)."""
        ...


class ReplicaFailure(enum.Enum):
    """Why a call on a replica failed, as far as the loop and the pool act on it."""

    DOWN = "down"  # unreachable, shutting down, or failing inside
    REFUSED = "refused"  # it will not serve this orchestrator (its credentials)
    TIMED_OUT = "timed out"  # no answer within the call's time
    SESSION_LOST = "session lost"  # our session is gone there (expired, restarted) or a step was lost
    MALFORMED = "malformed reply"  # an answer that breaks the protocol
    FAILED = "failed"  # any other failure of this one call


class ReplicaError(SpecdecError):
    """A replica failed in a way another replica may not. The loop fails over (a lost session is
    first reopened there); the pool takes a replica out of rotation by ``kind``."""

    def __init__(self, address: str, kind: ReplicaFailure, details: str):
        super().__init__(f"{address}: {details}")
        self.address = address
        self.kind = kind

    @property
    def timed_out(self) -> bool:
        """The call ran out of its timeout (the request's deadline, or the per-call limit)."""
        return self.kind is ReplicaFailure.TIMED_OUT


def loop_time(monotonic: float) -> float:
    """A ``time.monotonic()`` instant on the running event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())
