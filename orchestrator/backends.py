"""How the speculative loop reaches a draft or target replica over gRPC.

The loop (``speculative.py``) sees only the ``Backend`` interface: open a session, run one
step (``StepRequest`` in; ``Proposal`` from a draft, ``Verdict`` from a target), close it.
The same loop runs in one process on ``specdec_tools.local_backends`` backends (the benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from specdec_core.errors import InvalidArgument, ResourceExhausted, SpecdecError
from specdec_core.steps import Proposal, StepRequest, Verdict
from specdec_grpc.wire import (
    proposal_from_pb,
    propose_request_to_pb,
    verdict_from_pb,
    verify_request_to_pb,
)
from specdec_pb import specdec_pb2 as pb

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """One replica of a role, as the loop uses it."""

    address: str
    max_draft: int  # the largest k the replica takes; 0 if unknown
    draft_method: str  # how a draft replica drafts (Info.draft_method); "" for a target or unknown
    processor: tuple[str, str]  # (Info.hostname, Info.device); "" where unknown

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


# A reused step stream that fails with these most likely ended between steps (the connection
# dropped, or the replica cancelled its calls on shutdown): the step is asked again on a new one.
_ENDED_BETWEEN_STEPS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def _left(deadline: float | None) -> float | None:
    """Seconds from now to a ``time.monotonic()`` deadline (None: none), as a call's timeout."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def loop_time(monotonic: float) -> float:
    """A ``time.monotonic()`` instant on the running event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())


class GrpcBackend:
    """A draft or target replica over one stub (a DraftStub or TargetStub).

    Steps go over one long-lived stream per session (``ProposeStream``/``VerifyStream``): a
    step is then one message each way on an open HTTP/2 stream, not a new call, which saves
    ~0.3-0.6 ms per step on loopback (docs/architecture.md, "Step streams"). The stream is
    opened by the session's first step and cancelled by its close; any error, timeout or
    cancellation mid-step discards it (its next answer could belong to the wrong step), and
    the next step opens a new one. ``streams=False`` (``--unary-steps``) makes one unary call
    per step instead.
    """

    def __init__(self, role: str, address: str, stub: Any, metadata: Sequence[tuple[str, str]] = (),
                 streams: bool = True, owner: str = ""):
        self.role = role
        self.address = address
        self.stub = stub
        self.metadata = tuple(metadata)
        self.owner = owner  # the orchestrator process's owner id: the worker frees its sessions if it goes silent
        self.max_draft = 0  # the replica's --max-draft once its Info is known (0: unknown)
        self.max_batch = 0  # its --max-batch, likewise (the most steps a reply's batch may hold)
        self.draft_method = ""  # a draft's Info.draft_method: "model", "ngram", "hybrid" ("": unknown)
        self.processor = ("", "")  # (Info.hostname, Info.device): where it computes ("": unknown)
        self.streams = streams
        self._rpc_name, self._to_pb, self._from_pb = _STEP_RPC[role]
        self._open_streams: dict[str, Any] = {}  # session id -> its step stream (a grpc.aio call)

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        request = pb.OpenSessionRequest(prompt_ids=prompt_ids, client_tag=request_id, owner=self.owner)
        return (await self._call(self.stub.OpenSession, request, timeout)).session_id

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        message = self._to_pb(request)
        if self.streams:
            response = await self._stream_step(request.session_id, message, request.deadline)
        else:
            response = await self._call(getattr(self.stub, self._rpc_name), message, _left(request.deadline))
        result = self._from_pb(response)
        result.wire_bytes = message.ByteSize() + response.ByteSize()
        return result

    async def _stream_step(self, session_id: str, message: Any, deadline: float | None) -> Any:
        """One step on the session's stream (opened here if it has none), by ``deadline``
        (``time.monotonic()``; None: none)."""
        call = self._open_streams.get(session_id)
        # A stream kept from an earlier step may have ended since (its replica restarted or shut
        # down between steps): asked once more on a new stream, the step gets the replica's real
        # answer (NOT_FOUND after a restart: the loop reopens the session there), as a unary call would.
        reused = call is not None
        while True:
            if call is None:
                call = self._open_streams[session_id] = getattr(self.stub, self._rpc_name + "Stream")(
                    metadata=self.metadata)
            if deadline is not None:  # what is left of it, also when the step is asked again (0: none)
                message.timeout_ms = max(1e-3, (deadline - time.monotonic()) * 1e3)
            sent = False
            try:
                async with asyncio.timeout_at(None if deadline is None else loop_time(deadline)):
                    try:
                        await call.write(message)
                        sent = True
                    except asyncio.InvalidStateError:  # the call had ended; its read gives the status
                        pass
                    response = await call.read()
            except TimeoutError:
                self._drop(session_id, call)
                raise ReplicaError(self.address, grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"no answer to {self._rpc_name} by its deadline") from None
            except grpc.aio.AioRpcError as error:
                self._drop(session_id, call)
                # Unsent (the call had failed before this step), or the stream ended under it.
                if reused and (not sent or error.code() in _ENDED_BETWEEN_STEPS):
                    reused, call = False, None
                    continue
                raise translate(error, self.address, self.role) from error
            except BaseException:
                self._drop(session_id, call)  # cancelled mid-step: its answer must not be read as the next step's
                raise
            if response is grpc.aio.EOF:  # ended without answering (our workers answer or fail)
                self._drop(session_id, call)
                if reused:
                    reused, call = False, None
                    continue
                raise ReplicaError(self.address, grpc.StatusCode.UNAVAILABLE,
                                   f"the {self._rpc_name} stream ended without an answer")
            if self._open_streams.get(session_id) is not call:  # the session was closed meanwhile
                call.cancel()
            return response

    def _drop(self, session_id: str, call: Any) -> None:
        """Forget and cancel a step stream that can serve no further step."""
        if self._open_streams.get(session_id) is call:
            del self._open_streams[session_id]
        call.cancel()

    async def close(self, session_id: str) -> None:
        call = self._open_streams.pop(session_id, None)
        if call is not None:  # a step still running on it fails; the session is going anyway
            call.cancel()
        await self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), timeout=2.0, metadata=self.metadata
        )

    async def _call(self, rpc: Any, message: Any, timeout: float | None) -> Any:
        try:
            return await rpc(message, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise translate(error, self.address, self.role) from error
