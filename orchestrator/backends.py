"""How the speculative loop reaches a draft or target replica over gRPC: the edge where the wire
becomes the loop's terms.

The loop (``speculative.py``) sees only the ``Backend`` interface (``backend_protocol``): open a
session, run one step (``StepRequest`` in; ``Proposal`` from a draft, ``Verdict`` from a target),
close it. ``GrpcBackend`` converts messages to those domain types (``specdec_grpc.wire``) and every
failed call to a domain error (``translate``): no status code or protobuf message reaches the loop.
The same loop runs in one process on ``specdec_tools.local_backends`` backends (the benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from specdec_core.errors import InvalidArgument, ResourceExhausted
from specdec_core.steps import Proposal, StepRequest, Verdict
from specdec_grpc.wire import (
    proposal_from_pb,
    propose_request_to_pb,
    verdict_from_pb,
    verify_request_to_pb,
)
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

from .backend_protocol import ReplicaError, ReplicaFailure, loop_time

logger = logging.getLogger(__name__)

Stub = pb_grpc.DraftStub | pb_grpc.TargetStub
StepMessage = pb.ProposeRequest | pb.VerifyRequest
StepReply = pb.ProposeResponse | pb.VerifyResponse

# How each status a replica answers with reads in the loop's terms (any other: FAILED).
FAILURE_FOR_STATUS = {
    grpc.StatusCode.UNAVAILABLE: ReplicaFailure.DOWN,
    grpc.StatusCode.INTERNAL: ReplicaFailure.DOWN,
    grpc.StatusCode.UNKNOWN: ReplicaFailure.DOWN,
    grpc.StatusCode.CANCELLED: ReplicaFailure.DOWN,
    grpc.StatusCode.UNAUTHENTICATED: ReplicaFailure.REFUSED,
    grpc.StatusCode.PERMISSION_DENIED: ReplicaFailure.REFUSED,
    grpc.StatusCode.DEADLINE_EXCEEDED: ReplicaFailure.TIMED_OUT,
    grpc.StatusCode.NOT_FOUND: ReplicaFailure.SESSION_LOST,  # expired, or the replica restarted
    grpc.StatusCode.ABORTED: ReplicaFailure.SESSION_LOST,  # a step lost or repeated: reopen it
}


def translate(error: grpc.aio.AioRpcError, address: str, role: str) -> Exception:
    """The domain error for a failed downstream call. DEADLINE_EXCEEDED is a ReplicaError: the
    loop tells the request's own deadline (DEADLINE_EXCEEDED to the client) from a replica
    that stopped answering within the per-call timeout (fail over)."""
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{role} {address} rejected the request: {error.details()}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"{role} {address} is full: {error.details()}")
    return ReplicaError(address, FAILURE_FOR_STATUS.get(code, ReplicaFailure.FAILED),
                        f"{code.name}: {error.details() or ''}")


@dataclass(frozen=True)
class _StepCall:
    """A role's step on the wire: its rpc's name, its unary and stream methods on a stub, how a
    StepRequest goes out and how its answer comes back."""

    name: str
    unary: Callable[[Stub], grpc.aio.UnaryUnaryMultiCallable]
    stream: Callable[[Stub], grpc.aio.StreamStreamMultiCallable]
    to_pb: Callable[[StepRequest], StepMessage]
    from_pb: Callable[[StepReply], Proposal | Verdict]


_STEP_CALLS = {
    "draft": _StepCall("Propose", lambda stub: stub.Propose, lambda stub: stub.ProposeStream,
                       propose_request_to_pb, proposal_from_pb),
    "target": _StepCall("Verify", lambda stub: stub.Verify, lambda stub: stub.VerifyStream,
                        verify_request_to_pb, verdict_from_pb),
}


# A reused step stream that fails with these most likely ended between steps (the connection
# dropped, or the replica cancelled its calls on shutdown): the step is asked again on a new one.
_ENDED_BETWEEN_STEPS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


# A close answered with these is done: the session is not there (any more), so there is nothing to free.
_CLOSED_ANYWAY = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT})
CLOSE_TIMEOUT_S = 2.0  # a CloseSession: it runs on the worker's event loop, not behind the model thread


def _left(deadline: float | None) -> float | None:
    """Seconds from now to a ``time.monotonic()`` deadline (None: none), as a call's timeout."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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

    def __init__(self, role: str, address: str, stub: Stub, metadata: Sequence[tuple[str, str]] = (),
                 streams: bool = True, owner: str = ""):
        self.role = role
        self.address = address
        self.stub = stub
        self.metadata = tuple(metadata)
        self.owner = owner  # the orchestrator process's owner id: the worker frees its sessions if it goes silent
        self.max_draft = 0  # the replica's --max-draft once its Info is known (0: unknown)
        self.max_batch = 0  # its --max-batch, likewise (the most steps a reply's batch may hold)
        self.draft_method = ""  # a draft's Info.draft_method: "model", "ngram", "hybrid" ("": unknown)
        self.streams = streams
        # Told the id of a session whose close failed but may succeed if asked again (the pool's).
        self.on_unclosed: Callable[[str], None] | None = None
        self._rpc = _STEP_CALLS[role]
        self._open_streams: dict[str, grpc.aio.StreamStreamCall] = {}  # session id -> its step stream

    async def open(self, prompt_ids: list[int], request_id: str, timeout: float | None) -> str:
        request = pb.OpenSessionRequest(prompt_ids=prompt_ids, client_tag=request_id, owner=self.owner)
        return (await self._call(self.stub.OpenSession, request, timeout)).session_id

    async def step(self, request: StepRequest) -> Proposal | Verdict:
        message = self._rpc.to_pb(request)
        if self.streams:
            response = await self._stream_step(request.session_id, message, request.deadline)
        else:
            response = await self._call(self._rpc.unary(self.stub), message, _left(request.deadline))
        try:
            result = self._rpc.from_pb(response)
        except InvalidArgument as error:  # e.g. a q of an odd number of bytes: the replica's fault
            raise ReplicaError(self.address, ReplicaFailure.MALFORMED, f"malformed reply: {error}") from None
        result.wire_bytes = message.ByteSize() + response.ByteSize()
        return result

    async def _stream_step(self, session_id: str, message: StepMessage, deadline: float | None) -> StepReply:
        """One step on the session's stream (opened here if it has none), by ``deadline``
        (``time.monotonic()``; None: none)."""
        call = self._open_streams.get(session_id)
        # A stream kept from an earlier step may have ended since (its replica restarted or shut
        # down between steps): asked once more on a new stream, the step gets the replica's real
        # answer (NOT_FOUND after a restart: the loop reopens the session there), as a unary call would.
        reused = call is not None
        while True:
            if call is None:
                call = self._open_streams[session_id] = self._rpc.stream(self.stub)(
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
                raise ReplicaError(self.address, ReplicaFailure.TIMED_OUT,
                                   f"DEADLINE_EXCEEDED: no answer to {self._rpc.name} by its deadline") from None
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
                raise ReplicaError(self.address, ReplicaFailure.DOWN,
                                   f"UNAVAILABLE: the {self._rpc.name} stream ended without an answer")
            if self._open_streams.get(session_id) is not call:  # the session was closed meanwhile
                call.cancel()
            return response

    def _drop(self, session_id: str, call: grpc.aio.StreamStreamCall) -> None:
        """Forget and cancel a step stream that can serve no further step."""
        if self._open_streams.get(session_id) is call:
            del self._open_streams[session_id]
        call.cancel()

    async def close(self, session_id: str) -> None:
        """Close a session; one whose close failed in a way that asking again may mend is told to
        ``on_unclosed`` (the pool asks again at its health checks), and the error raised."""
        call = self._open_streams.pop(session_id, None)
        if call is not None:  # a step still running on it fails; the session is going anyway
            call.cancel()
        try:
            await self.ask_close(session_id, CLOSE_TIMEOUT_S)
        except ReplicaError:
            if self.on_unclosed is not None:
                self.on_unclosed(session_id)
            raise

    async def ask_close(self, session_id: str, timeout: float) -> None:
        """One CloseSession call. A session the replica no longer has, or never could (NOT_FOUND,
        INVALID_ARGUMENT), is closed as far as anyone can tell; any other failure: a ReplicaError."""
        try:
            await self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=timeout,
                                         metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() not in _CLOSED_ANYWAY:
                raise ReplicaError(self.address, FAILURE_FOR_STATUS.get(error.code(), ReplicaFailure.FAILED),
                                   f"CloseSession: {error.code().name}: {error.details() or ''}") from error

    async def _call(self, rpc: Any, message: Any, timeout: float | None) -> Any:
        try:
            return await rpc(message, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise translate(error, self.address, self.role) from error
