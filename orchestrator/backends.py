"""How the speculative loop reaches a draft or target: over gRPC, or in this process.

The loop (``speculative.py``) only sees these small interfaces, so the same code runs the
services (gRPC) and the benchmark's in-process baseline. Draft distributions are opaque
here: protobuf messages over gRPC, domain objects in-process; the loop just forwards them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from specdec_core.errors import (
    InvalidArgument,
    PrefixMismatch,
    ResourceExhausted,
    SessionNotFound,
    SpecdecError,
    Unavailable,
)
from specdec_core.sampling import SamplingParams
from specdec_core.session_host import SessionHost
from specdec_grpc.convert import sampling_to_pb
from specdec_pb import specdec_pb2 as pb


@dataclass
class Proposed:
    tokens: list[int]
    token_probs: list[float]
    distributions: Sequence[Any]
    length: int
    wire_bytes: int = 0


@dataclass
class Verified:
    argmax: list[int]
    draft_probs: list[float]
    resampled: list[int]
    length: int
    wire_bytes: int = 0


@dataclass
class StepCall:
    """What a Propose or Verify asks of a session (see the proto's comments)."""

    expected_length: int
    rollback_to: int
    append_tokens: list[int]
    sampling: SamplingParams
    seed: int
    timeout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DraftBackend(Protocol):
    address: str

    async def open(self, prompt_ids: list[int], tag: str, timeout: float | None) -> str: ...
    async def propose(self, session_id: str, call: StepCall, num_draft: int) -> Proposed: ...
    async def close(self, session_id: str) -> None: ...


class TargetBackend(Protocol):
    address: str

    async def open(self, prompt_ids: list[int], tag: str, timeout: float | None) -> str: ...
    async def verify(
        self, session_id: str, call: StepCall, num_draft: int, draft_distributions: Sequence[Any]
    ) -> Verified: ...
    async def close(self, session_id: str) -> None: ...


# -- gRPC -----------------------------------------------------------------------------------

# Status codes a downstream call may return, back to the domain error they stand for.
_ERROR_FOR_STATUS: dict[grpc.StatusCode, type[SpecdecError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.ABORTED: PrefixMismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


class ReplicaError(SpecdecError):
    """A replica failed in a way another replica may not (down, draining, timed out, lost
    our session). The loop fails over; ``code`` keeps the original status."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{address}: {code.name}: {details}")
        self.address = address
        self.code = code

    @property
    def timed_out(self) -> bool:
        """The call ran out of its timeout (the request's deadline, or the per-call limit)."""
        return self.code == grpc.StatusCode.DEADLINE_EXCEEDED


def translate(error: grpc.aio.AioRpcError, address: str, role: str) -> Exception:
    """The domain error for a failed downstream call. DEADLINE_EXCEEDED is a ReplicaError: the
    loop tells the request's own deadline (DEADLINE_EXCEEDED to the client) from a replica
    that stopped answering within the per-call timeout (fail over)."""
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{role} {address} rejected the request: {error.details()}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"{role} {address} is full: {error.details()}")
    return ReplicaError(address, code, error.details() or "")


class _GrpcSessions:
    """The session lifecycle both gRPC backends share: open and close over one stub."""

    role = ""

    def __init__(self, address: str, stub: Any, metadata: Sequence[tuple[str, str]] = ()):
        self.address = address
        self.stub = stub
        self.metadata = tuple(metadata)

    async def open(self, prompt_ids: list[int], tag: str, timeout: float | None) -> str:
        try:
            response = await self.stub.OpenSession(
                pb.OpenSessionRequest(prompt_ids=prompt_ids, client_tag=tag),
                timeout=timeout, metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise translate(error, self.address, self.role) from error
        return response.session_id

    async def close(self, session_id: str) -> None:
        await self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), timeout=2.0, metadata=self.metadata
        )


class GrpcDraft(_GrpcSessions):
    role = "draft"

    async def propose(self, session_id: str, call: StepCall, num_draft: int) -> Proposed:
        request = pb.ProposeRequest(
            session_id=session_id,
            expected_length=call.expected_length,
            rollback_to=call.rollback_to,
            append_tokens=call.append_tokens,
            num_draft=num_draft,
            sampling=sampling_to_pb(call.sampling),
            seed=call.seed,
        )
        try:
            response = await self.stub.Propose(request, timeout=call.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise translate(error, self.address, self.role) from error
        return Proposed(
            list(response.tokens), list(response.token_probs), response.distributions, response.length,
            request.ByteSize() + response.ByteSize(),
        )


class GrpcTarget(_GrpcSessions):
    role = "target"

    async def verify(
        self, session_id: str, call: StepCall, num_draft: int, draft_distributions: Sequence[Any]
    ) -> Verified:
        request = pb.VerifyRequest(
            session_id=session_id,
            expected_length=call.expected_length,
            rollback_to=call.rollback_to,
            append_tokens=call.append_tokens,
            num_draft=num_draft,
            sampling=sampling_to_pb(call.sampling),
            seed=call.seed,
            draft_distributions=draft_distributions,
        )
        try:
            response = await self.stub.Verify(request, timeout=call.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise translate(error, self.address, self.role) from error
        return Verified(
            list(response.argmax), list(response.draft_probs), list(response.resampled), response.length,
            request.ByteSize() + response.ByteSize(),
        )


# -- in-process -----------------------------------------------------------------------------


class _LocalSessions:
    """The session lifecycle both in-process backends share, on a SessionHost."""

    def __init__(self, host: SessionHost, address: str = "in-process"):
        self.host = host
        self.address = address

    async def open(self, prompt_ids: list[int], tag: str, timeout: float | None) -> str:
        return (await self.host.open(prompt_ids, tag)).id

    async def close(self, session_id: str) -> None:
        await self.host.close(session_id)


class LocalDraft(_LocalSessions):
    """A draft SessionHost called directly: the same work, no gRPC (benchmark baseline)."""

    async def propose(self, session_id: str, call: StepCall, num_draft: int) -> Proposed:
        proposal, length = await self.host.propose(
            session_id, call.expected_length, call.rollback_to, call.append_tokens, num_draft,
            call.sampling, call.seed,
        )
        return Proposed(proposal.tokens, proposal.token_probs, proposal.distributions, length)


class LocalTarget(_LocalSessions):
    async def verify(
        self, session_id: str, call: StepCall, num_draft: int, draft_distributions: Sequence[Any]
    ) -> Verified:
        verdict, length = await self.host.verify(
            session_id, call.expected_length, call.rollback_to, call.append_tokens, num_draft,
            call.sampling, call.seed, list(draft_distributions),
        )
        return Verified(verdict.argmax, verdict.draft_probs, verdict.resampled, length)


__all__ = [
    "DraftBackend", "TargetBackend", "GrpcDraft", "GrpcTarget", "LocalDraft", "LocalTarget",
    "Proposed", "Verified", "StepCall", "ReplicaError", "translate", "Unavailable",
]
