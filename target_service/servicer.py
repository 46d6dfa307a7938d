"""Target RPCs: the shared session lifecycle plus Verify."""

from __future__ import annotations

import grpc

from specdec_grpc.convert import distribution_from_pb, sampling_from_pb
from specdec_grpc.status import deadline_of, grpc_method
from specdec_grpc.worker import SessionServicer
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc


class TargetServicer(SessionServicer, pb_grpc.TargetServicer):
    @grpc_method
    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext) -> pb.VerifyResponse:
        verdict, length = await self.host.verify(
            request.session_id,
            request.expected_length,
            request.rollback_to,
            list(request.append_tokens),
            request.num_draft,
            sampling_from_pb(request.sampling),
            request.seed,
            [distribution_from_pb(d) for d in request.draft_distributions],
            deadline=deadline_of(context),
        )
        response = pb.VerifyResponse(
            argmax=verdict.argmax,
            draft_probs=verdict.draft_probs,
            resampled=verdict.resampled,
            length=length,
        )
        self.count_bytes(request, response)
        return response


def add_to_server(servicer: SessionServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_TargetServicer_to_server(servicer, server)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Target"].full_name
