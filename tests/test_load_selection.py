"""The load test (minutes long) is left out of a plain ``pytest`` run and selected by
``-m load``: pytest's own collection says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collect(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/test_load.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 5), result.stdout + result.stderr  # 5: nothing selected
    return result.stdout


def test_a_plain_run_deselects_the_load_test() -> None:
    out = collect()
    assert "test_32_streaming_clients_for_30_seconds" not in out
    assert "1 deselected" in out


def test_minus_m_load_selects_it() -> None:
    out = collect("-m", "load")
    assert "tests/test_load.py::test_32_streaming_clients_for_30_seconds" in out
