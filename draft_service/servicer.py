"""Draft RPCs: the shared session lifecycle plus Propose."""

from __future__ import annotations

import grpc

from specdec_grpc.convert import distribution_to_pb, sampling_from_pb
from specdec_grpc.status import deadline_of, grpc_method
from specdec_grpc.worker import SessionServicer
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc


class DraftServicer(SessionServicer, pb_grpc.DraftServicer):
    @grpc_method
    async def Propose(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        proposal, length = await self.host.propose(
            request.session_id,
            request.expected_length,
            request.rollback_to,
            list(request.append_tokens),
            request.num_draft,
            sampling_from_pb(request.sampling),
            request.seed,
            deadline=deadline_of(context),
        )
        response = pb.ProposeResponse(
            tokens=proposal.tokens,
            token_probs=proposal.token_probs,
            distributions=[distribution_to_pb(d) for d in proposal.distributions],
            length=length,
        )
        self.count_bytes(request, response)
        return response


def add_to_server(servicer: SessionServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_DraftServicer_to_server(servicer, server)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Draft"].full_name
