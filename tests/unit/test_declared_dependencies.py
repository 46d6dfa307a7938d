"""A test needing a dependency that pyproject.toml declares (the package's own, or its ``test``
extra's) imports it plainly: a broken or partial install then fails the run, where
``pytest.importorskip`` would make those tests vanish from it without a word."""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def declared_test_dependencies() -> set[str]:
    """What ``pip install .[test]`` installs: the main dependencies and the test extra's (names)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {canonicalize_name(Requirement(line).name) for line in lines}


def skipped_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every ``importorskip("module")`` in a test module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        module = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "modname"), None)
        if name == "importorskip" and isinstance(module, ast.Constant) and isinstance(module.value, str):
            found.append((node.lineno, module.value))
    return found


def distributions_of(module: str) -> set[str]:
    """The distributions that provide ``module``'s top-level package (its own name too: one not
    installed here is still found by name, as torch or matplotlib would be)."""
    top = module.split(".")[0]
    return {canonicalize_name(top)} | {canonicalize_name(d) for d in packages_distributions().get(top, [])}


def test_no_test_skips_a_dependency_the_test_extra_declares() -> None:
    declared = declared_test_dependencies()
    assert {"torch", "transformers", "cryptography", "matplotlib"} <= declared
    modules = sorted(TESTS.rglob("*.py"))
    assert len(modules) > 20  # the scan reads the real test modules
    offenders = [f"{path.relative_to(ROOT)}:{line}: importorskip({module!r})"
                 for path in modules for line, module in skipped_imports(path.read_text())
                 if distributions_of(module) & declared]
    assert not offenders, ("a declared test dependency is imported with importorskip (import it plainly: "
                           "a missing one must fail the run):\n" + "\n".join(offenders))


def test_the_scan_finds_each_way_of_writing_it() -> None:
    source = ('import pytest\nfrom pytest import importorskip\nx509 = pytest.importorskip("cryptography.x509")\n'
              'torch = importorskip(modname="torch")\nimportorskip(name)\n')
    assert skipped_imports(source) == [(3, "cryptography.x509"), (4, "torch")]
    assert "cryptography" in distributions_of("cryptography.x509")
    assert "grpcio" in distributions_of("grpc")  # a module named unlike its distribution
