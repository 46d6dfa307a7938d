"""What a worker's step RPC does, whichever it is: Propose on a draft, Verify on a target.

A step request in (``step_from_pb``), the ``SessionHost``'s step, its answer out, counted on
the wire: as a unary call (``step``) or as the messages of a session's step stream
(``stream_steps``). ``DraftServicer`` (``draft_service/servicer.py``) and ``TargetServicer``
(``target_service/servicer.py``) each declare their two RPCs as one-line delegations to these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from specdec_core.steps import StepRequest
from specdec_grpc.status import deadline_of
from specdec_grpc.wire import step_from_pb
from specdec_grpc.worker import SessionServicer
from specdec_pb import specdec_pb2 as pb

Answer = TypeVar("Answer")  # the host's answer: a Proposal or a Verdict
Reply = TypeVar("Reply", pb.ProposeResponse, pb.VerifyResponse)
StepMessage = pb.ProposeRequest | pb.VerifyRequest


class StepServicer(SessionServicer):
    """The session RPCs every worker shares, plus the one step its service adds."""

    async def step(self, request: StepMessage, context: grpc.aio.ServicerContext,
                   host_step: Callable[[StepRequest], Awaitable[Answer]],
                   to_pb: Callable[[Answer], Reply]) -> Reply:
        answer = await host_step(step_from_pb(request, deadline_of(context), self.wire_limits))
        return self.counted(request, to_pb(answer))

    async def stream_steps(self, requests: AsyncIterator[StepMessage], context: grpc.aio.ServicerContext,
                           host_step: Callable[[StepRequest], Awaitable[Answer]],
                           to_pb: Callable[[Answer], Reply]) -> AsyncIterator[Reply]:
        """One reply per request on a session's step stream, in order (``StepStreams``)."""
        async for request in self.step_streams.requests(requests):
            yield await self.step(request, context, host_step, to_pb)
