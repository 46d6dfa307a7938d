"""Draft RPCs: the shared session RPCs plus Propose (and ProposeStream), the draft's step."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from specdec_grpc.status import grpc_method, grpc_stream_method
from specdec_grpc.step_servicer import StepServicer
from specdec_grpc.wire import proposal_to_pb
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Draft"].full_name
add_to_server = pb_grpc.add_DraftServicer_to_server


class DraftServicer(StepServicer, pb_grpc.DraftServicer):
    """OpenSession, Rollback, CloseSession and Info (``SessionServicer``), and the draft's step."""

    @grpc_method
    async def Propose(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        return await self.step(request, context, self.host.propose, proposal_to_pb)

    @grpc_stream_method
    async def ProposeStream(self, requests: AsyncIterator[pb.ProposeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProposeResponse]:
        async for reply in self.stream_steps(requests, context, self.host.propose, proposal_to_pb):
            yield reply
