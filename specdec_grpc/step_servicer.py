"""The one RPC a worker adds to the shared session RPCs: Propose on a draft, Verify on a target.

Both are the same servicer code: a step request in (``step_from_pb``), the ``SessionHost``'s
step, its answer out, as a unary call (``Propose``) or as one message on the session's step
stream (``ProposeStream``). A ``StepRpc`` names what differs: the RPC names, the host's step and
the reply's conversion. ``draft_service/servicer.py`` and ``target_service/servicer.py`` each
declare theirs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from specdec_core.steps import StepRequest
from specdec_grpc.status import deadline_of, grpc_method, grpc_stream_method
from specdec_grpc.wire import step_from_pb
from specdec_grpc.worker import SessionServicer
from specdec_pb import specdec_pb2 as pb


@dataclass(frozen=True)
class StepRpc:
    """A worker's step RPC: ``name`` unary and ``name + "Stream"`` on a step stream."""

    name: str  # "Propose" or "Verify"
    service: str  # the proto service that declares it: "Draft" or "Target"
    host_step: str  # the host's step method, "propose" or "verify" (looked up on the host at each call)
    to_pb: Callable[[Any], Message]  # the step's answer as the RPC's response
    generated_base: type  # the generated servicer class (UNIMPLEMENTED for anything not served)
    add_to_server: Callable[[Any, grpc.aio.Server], None]

    @property
    def service_name(self) -> str:
        return pb.DESCRIPTOR.services_by_name[self.service].full_name


class StepServicer(SessionServicer):
    """The session RPCs plus ``rpc``'s step, which ``step_servicer`` serves under its names."""

    rpc: StepRpc

    async def step(self, request: Message, deadline: float | None) -> Message:
        host_step: Callable[[StepRequest], Awaitable[Any]] = getattr(self.host, self.rpc.host_step)
        answer = await host_step(step_from_pb(request, deadline, self.wire_limits))
        return self.counted(request, self.rpc.to_pb(answer))


def step_servicer(rpc: StepRpc) -> type[StepServicer]:
    """A servicer class for ``rpc``'s service: its unary and streamed step methods carry the
    RPC's own names, which gRPC looks up and the error metrics and messages report."""

    async def unary(self: StepServicer, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return await self.step(request, deadline_of(context))

    async def stream(self: StepServicer, requests: AsyncIterator[Message],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        async for request in self.step_streams.requests(requests):
            yield await self.step(request, deadline_of(context))

    unary.__name__ = unary.__qualname__ = rpc.name
    stream.__name__ = stream.__qualname__ = rpc.name + "Stream"
    methods = {"rpc": rpc, unary.__name__: grpc_method(unary), stream.__name__: grpc_stream_method(stream)}
    return type(f"{rpc.service}Servicer", (StepServicer, rpc.generated_base), methods)
