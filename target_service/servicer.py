"""Target RPCs: the shared session lifecycle plus Verify."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from specdec_grpc.convert import step_from_pb, verdict_to_pb
from specdec_grpc.status import deadline_of, grpc_method, grpc_stream_method
from specdec_grpc.worker import SessionServicer
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc


class TargetServicer(SessionServicer, pb_grpc.TargetServicer):
    @grpc_method
    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext) -> pb.VerifyResponse:
        return await self._verify(request, deadline_of(context))

    @grpc_stream_method
    async def VerifyStream(self, requests: AsyncIterator[pb.VerifyRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.VerifyResponse]:
        async for request in self.step_streams.requests(requests):
            yield await self._verify(request, deadline_of(context))

    async def _verify(self, request: pb.VerifyRequest, deadline: float | None) -> pb.VerifyResponse:
        verdict = await self.host.verify(step_from_pb(request, deadline, self.wire_limits))
        return self.counted(request, verdict_to_pb(verdict))


def add_to_server(servicer: SessionServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_TargetServicer_to_server(servicer, server)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Target"].full_name
