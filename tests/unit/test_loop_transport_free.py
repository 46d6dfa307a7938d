"""The speculative loop, its lanes and acceptance know no transport: they import neither gRPC nor
protobuf (``backends.GrpcBackend`` translates at the edge), so the same loop runs in one process."""

from __future__ import annotations

import subprocess
import sys

LOOP_MODULES = "orchestrator.speculative, orchestrator.lanes, orchestrator.acceptance, orchestrator.backend_protocol"
CHECK = f"""
import sys
import {LOOP_MODULES}
wire = sorted(m for m in sys.modules
              if m.split(".")[0] in ("grpc", "specdec_pb", "specdec_grpc") or m.startswith("google.protobuf"))
print(",".join(wire))
"""


def _imported(probe: str) -> list[str]:
    # A fresh interpreter: this test process has gRPC loaded by other tests.
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


def test_the_loop_lanes_and_acceptance_import_no_grpc_or_protobuf() -> None:
    assert _imported(CHECK) == []


def test_the_check_sees_grpc_when_the_edge_is_imported() -> None:
    """Counter-test: the same probe reports gRPC and protobuf once the gRPC backend is imported."""
    seen = _imported(CHECK.replace(f"import {LOOP_MODULES}", f"import {LOOP_MODULES}, orchestrator.backends"))
    assert "grpc" in seen and "google.protobuf" in seen and "specdec_pb.specdec_pb2" in seen
