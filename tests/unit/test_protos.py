"""specdec_pb/ is what scripts/gen_protos makes of protos/, and the proto documents itself.

Descriptors are compared, not generated text, so another grpcio-tools version that writes
the same schema differently does not fail the test.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor

from specdec_pb import specdec_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos" / "specdec" / "v1" / "specdec.proto"
FIELD = re.compile(r"^\s*(optional\s+|repeated\s+)?[A-Za-z_][\w.]*\s+\w+\s*=\s*\d+\s*(\[.*\])?\s*;")
RPC = re.compile(r"^\s*rpc\s+(\w+)\s*\(")


def serialized_descriptor(module_source: str) -> bytes:
    """The FileDescriptorProto bytes a generated *_pb2.py registers (AddSerializedFile(b'...'))."""
    for node in ast.walk(ast.parse(module_source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "AddSerializedFile"):
            return ast.literal_eval(node.args[0])
    raise AssertionError("no AddSerializedFile(...) call in the generated module")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("specdec_pb")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos"), str(out)], check=True, cwd=ROOT)
    return out


def test_generated_descriptor_matches_the_committed_one(generated: Path) -> None:
    fresh = descriptor_pb2.FileDescriptorProto.FromString(
        serialized_descriptor((generated / "specdec_pb2.py").read_text()))
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh.name == "specdec/v1/specdec.proto"
    assert fresh == committed, "specdec_pb/ is stale: run scripts/gen_protos"


def test_generated_package_has_the_same_files_and_rpcs(generated: Path) -> None:
    committed_dir = ROOT / "specdec_pb"
    names = {p.name for p in generated.iterdir()}
    assert names == {p.name for p in committed_dir.iterdir() if p.is_file() and not p.name.endswith(".pyc")}
    method = re.compile(r"'/(specdec\.v1\.\w+/\w+)'")
    fresh = set(method.findall((generated / "specdec_pb2_grpc.py").read_text()))
    committed = set(method.findall((committed_dir / "specdec_pb2_grpc.py").read_text()))
    assert fresh == committed
    assert "specdec.v1.Draft/Propose" in fresh and "specdec.v1.Target/Verify" in fresh
    # The flat package imports itself relatively (gen_protos rewrites protoc's absolute import).
    assert "from . import specdec_pb2" in (generated / "specdec_pb2_grpc.py").read_text()


def test_descriptor_is_what_protoc_compiles(tmp_path: Path) -> None:
    """Cross-check with protoc's own --descriptor_set_out (no Python generator involved)."""
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={out}", "specdec/v1/specdec.proto"]
    assert protoc.main(args) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    for message in (compiled, committed):  # protoc may record json names; the schema is the rest
        for kind in message.message_type:
            for field in kind.field:
                field.ClearField("json_name")
    assert compiled == committed


def test_every_rpc_and_field_has_a_comment() -> None:
    lines = PROTO.read_text().splitlines()
    undocumented, rpcs, fields = [], 0, 0
    for number, line in enumerate(lines):
        is_rpc, is_field = bool(RPC.match(line)), bool(FIELD.match(line))
        if not (is_rpc or is_field):
            continue
        rpcs += is_rpc
        fields += is_field
        before = lines[number - 1].strip() if number else ""
        if not before.startswith("//"):
            undocumented.append(f"{PROTO.name}:{number + 1}: {line.strip()}")
    assert not undocumented, "add a // comment above:\n" + "\n".join(undocumented)
    # The parse saw every rpc and field the descriptor holds.
    assert rpcs == sum(len(s.methods) for s in pb.DESCRIPTOR.services_by_name.values())
    assert fields == sum(len(m.fields) for m in _all_messages(pb.DESCRIPTOR.message_types_by_name.values()))


def _all_messages(messages: Iterable[Descriptor]) -> Iterator[Descriptor]:
    for message in messages:
        yield message
        yield from _all_messages(message.nested_types)
