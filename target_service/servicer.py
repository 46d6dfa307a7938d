"""Target RPCs: the shared session RPCs plus Verify (and VerifyStream), the target's step."""

from __future__ import annotations

from specdec_grpc.step_servicer import StepRpc, step_servicer
from specdec_grpc.wire import verdict_to_pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

VERIFY = StepRpc(name="Verify", service="Target", host_step="verify", to_pb=verdict_to_pb,
                 generated_base=pb_grpc.TargetServicer, add_to_server=pb_grpc.add_TargetServicer_to_server)

TargetServicer = step_servicer(VERIFY)
add_to_server = VERIFY.add_to_server
SERVICE_NAME = VERIFY.service_name
