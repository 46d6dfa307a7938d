"""Draft RPCs: the shared session RPCs plus Propose (and ProposeStream), the draft's step."""

from __future__ import annotations

from specdec_grpc.step_servicer import StepRpc, step_servicer
from specdec_grpc.wire import proposal_to_pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

PROPOSE = StepRpc(name="Propose", service="Draft", host_step="propose", to_pb=proposal_to_pb,
                  generated_base=pb_grpc.DraftServicer, add_to_server=pb_grpc.add_DraftServicer_to_server)

DraftServicer = step_servicer(PROPOSE)
add_to_server = PROPOSE.add_to_server
SERVICE_NAME = PROPOSE.service_name
