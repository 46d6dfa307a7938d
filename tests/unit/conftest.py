"""The fast unit tier (``pytest tests/unit``): no servers, no torch, no MLX, seconds in all.

A run of this folder alone fails if anything it ran imported torch or MLX, so a test that
needs them lives one folder up (tests/) instead. Short interpreters started to check what a
module imports (or what protoc generates) are allowed; services are not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent
HEAVY = ("torch", "mlx")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    items = getattr(session, "items", [])
    if not items or any(UNIT not in Path(item.path).resolve().parents for item in items):
        return  # a wider run: the rest of tests/ imports both anyway
    heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
    if heavy:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"the unit tier imported {', '.join(heavy)}: move the test that needs it "
                                "out of tests/unit", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
