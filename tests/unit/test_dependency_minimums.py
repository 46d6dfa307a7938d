"""The dependency minimums pyproject.toml declares must be versions the generated code in
specdec_pb/ accepts: its *_pb2_grpc.py refuses a grpcio older than the grpcio-tools that wrote
it, and its *_pb2.py refuses a protobuf runtime older than its gencode."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "specdec_pb"


def declared_minimums() -> dict[str, Version]:
    """The lowest version each requirement allows, over the main and optional dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    minimums: dict[str, Version] = {}
    for line in lines:
        requirement = Requirement(line)
        lows = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
        lows += [Version(s.version) for s in requirement.specifier if s.operator == ">"]
        name = requirement.name.lower()
        minimums[name] = min(lows) if lows else Version("0")
    return minimums


def grpc_generated_versions() -> list[tuple[str, Version]]:
    found = []
    for path in sorted(GENERATED.glob("*_pb2_grpc.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "GRPC_GENERATED_VERSION" for t in node.targets):
                found.append((path.name, Version(ast.literal_eval(node.value))))
    return found


def protobuf_gencode_versions() -> list[tuple[str, Version]]:
    found = []
    for path in sorted(GENERATED.glob("*_pb2.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "ValidateProtobufRuntimeVersion"):
                major, minor, patch, suffix = (ast.literal_eval(a) for a in node.args[1:5])
                found.append((path.name, Version(f"{major}.{minor}.{patch}{suffix}")))
    return found


def test_the_generated_files_state_what_they_require() -> None:
    """Guards the parsing below: both kinds of check are present in the generated code."""
    assert grpc_generated_versions(), "no GRPC_GENERATED_VERSION in specdec_pb/*_pb2_grpc.py"
    assert protobuf_gencode_versions(), "no ValidateProtobufRuntimeVersion call in specdec_pb/*_pb2.py"


@pytest.mark.parametrize("package", ["grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-tools"])
def test_grpc_minimums_cover_the_generated_code(package: str) -> None:
    declared = declared_minimums()
    assert package in declared, f"pyproject.toml does not declare {package}"
    for name, required in grpc_generated_versions():
        assert declared[package] >= required, (
            f"pyproject.toml allows {package} {declared[package]}, but specdec_pb/{name} was generated "
            f"by grpcio-tools {required} and refuses to import under a grpcio older than that")


def test_protobuf_minimum_covers_the_gencode() -> None:
    declared = declared_minimums()
    assert "protobuf" in declared, "pyproject.toml does not declare protobuf"
    for name, required in protobuf_gencode_versions():
        assert declared["protobuf"] >= required, (
            f"pyproject.toml allows protobuf {declared['protobuf']}, but specdec_pb/{name} is gencode "
            f"{required} and refuses an older runtime")
