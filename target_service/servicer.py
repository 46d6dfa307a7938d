"""Target RPCs: the shared session RPCs plus Verify (and VerifyStream), the target's step."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from specdec_grpc.status import grpc_method, grpc_stream_method
from specdec_grpc.step_servicer import StepServicer
from specdec_grpc.wire import verdict_to_pb
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Target"].full_name
add_to_server = pb_grpc.add_TargetServicer_to_server


class TargetServicer(StepServicer, pb_grpc.TargetServicer):
    """OpenSession, Rollback, CloseSession and Info (``SessionServicer``), and the target's step."""

    @grpc_method
    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext) -> pb.VerifyResponse:
        return await self.step(request, context, self.host.verify, verdict_to_pb)

    @grpc_stream_method
    async def VerifyStream(self, requests: AsyncIterator[pb.VerifyRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.VerifyResponse]:
        async for reply in self.stream_steps(requests, context, self.host.verify, verdict_to_pb):
            yield reply
