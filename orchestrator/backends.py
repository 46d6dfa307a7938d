"""How the speculative loop reaches a draft or target replica over gRPC.

The loop (``speculative.py``) sees only the ``Backend`` interface: open a session, run one
step (``StepRequest`` in; ``Proposal`` from a draft, ``Verdict`` from a target), close it.
The same loop runs in one process on ``specdec_tools.inprocess`` backends (the benchmark).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from specdec_core.errors import InvalidArgument, ResourceExhausted, SpecdecError
from specdec_core.steps import Proposal, StepRequest, Verdict
from specdec_grpc.convert import (
    proposal_from_pb,
    propose_request_to_pb,
    verdict_from_pb,
    verify_request_to_pb,
)
from specdec_pb import specdec_pb2 as pb


class Backend(Protocol):
    """One replica of a role, as the loop uses it."""

    address: str
    max_draft: int  # the largest k the replica takes; 0 if unknown

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str: ...
    async def step(self, request: StepRequest) -> Any: ...  # Proposal (draft) or Verdict (target)
    async def close(self, session_id: str) -> None: ...


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


# Per role: the step's rpc name, how a StepRequest goes out and how its answer comes back.
_STEP_RPC: dict[str, tuple[str, Callable[[StepRequest], Any], Callable[[Any], Proposal | Verdict]]] = {
    "draft": ("Propose", propose_request_to_pb, proposal_from_pb),
    "target": ("Verify", verify_request_to_pb, verdict_from_pb),
}


class GrpcBackend:
    """A draft or target replica over one stub (a DraftStub or TargetStub)."""

    def __init__(self, role: str, address: str, stub: Any, metadata: Sequence[tuple[str, str]] = ()):
        self.role = role
        self.address = address
        self.stub = stub
        self.metadata = tuple(metadata)
        self.max_draft = 0  # the replica's --max-draft once its Info is known (0: unknown)
        self._rpc_name, self._to_pb, self._from_pb = _STEP_RPC[role]

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        request = pb.OpenSessionRequest(prompt_ids=prompt_ids, client_tag=request_id)
        return (await self._call(self.stub.OpenSession, request, timeout)).session_id

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        message = self._to_pb(request)
        timeout = None if request.deadline is None else max(0.0, request.deadline - time.monotonic())
        response = await self._call(getattr(self.stub, self._rpc_name), message, timeout)
        result = self._from_pb(response)
        result.wire_bytes = message.ByteSize() + response.ByteSize()
        return result

    async def close(self, session_id: str) -> None:
        await self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), timeout=2.0, metadata=self.metadata
        )

    async def _call(self, rpc: Any, message: Any, timeout: float | None) -> Any:
        try:
            return await rpc(message, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise translate(error, self.address, self.role) from error
