"""Draft RPCs: the shared session lifecycle plus Propose."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from specdec_grpc.convert import proposal_to_pb, step_from_pb
from specdec_grpc.status import deadline_of, grpc_method, grpc_stream_method
from specdec_grpc.worker import SessionServicer
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc


class DraftServicer(SessionServicer, pb_grpc.DraftServicer):
    @grpc_method
    async def Propose(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        return await self._propose(request, deadline_of(context))

    @grpc_stream_method
    async def ProposeStream(self, requests: AsyncIterator[pb.ProposeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProposeResponse]:
        async for request in self.step_streams.requests(requests):
            yield await self._propose(request, deadline_of(context))

    async def _propose(self, request: pb.ProposeRequest, deadline: float | None) -> pb.ProposeResponse:
        proposal = await self.host.propose(step_from_pb(request, deadline, self.wire_limits))
        return self.counted(request, proposal_to_pb(proposal))


def add_to_server(servicer: SessionServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_DraftServicer_to_server(servicer, server)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Draft"].full_name
