"""The load and soak tests (minutes long) are left out of a plain ``pytest`` run and selected by
``-m load`` / ``-m soak``: pytest's own collection says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LONG_TESTS = [("load", "tests/test_load.py", "test_32_streaming_clients_for_30_seconds"),
              ("soak", "tests/test_soak.py", "test_soak_churn_kills_and_restarts")]


def collect(path: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             path, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 5), result.stdout + result.stderr  # 5: nothing selected
    return result.stdout


@pytest.mark.parametrize(("marker", "path", "name"), LONG_TESTS)
def test_a_plain_run_deselects_the_long_test(marker: str, path: str, name: str) -> None:
    out = collect(path)
    assert name not in out
    assert "1 deselected" in out


@pytest.mark.parametrize(("marker", "path", "name"), LONG_TESTS)
def test_minus_m_selects_it(marker: str, path: str, name: str) -> None:
    out = collect(path, "-m", marker)
    assert f"{path}::{name}" in out
