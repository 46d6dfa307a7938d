"""The real service binaries refuse an out-of-range flag at start-up: exit status 2 and one line
naming the flag and its range, no traceback, before any model is loaded (issue 31.3; every flag's
range is tested at parse level in tests/unit/test_flag_ranges.py)."""

from __future__ import annotations

import subprocess

import pytest

from specdec_tools.service_process import command

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("role, argv, line", [
    ("draft", ["--max-sessions", "0"], "specdec-draft: error: --max-sessions: must be in [1, 2^31-1] (got 0)"),
    ("target", ["--session-ttl", "nan"], "specdec-target: error: --session-ttl: must be a finite number >= 1 (got nan)"),
    ("draft", ["--method", "ngram", "--ngram-min", "0"], "specdec-draft: error: --ngram-min: must be in [1, 64] (got 0)"),
    ("orchestrator", ["--health-interval", "0"], "specdec-orchestrator: error: --health-interval: must be >= 0.1 (got 0)"),
])
def test_a_service_started_with_a_bad_flag_exits_2_with_one_line(role: str, argv: list[str], line: str) -> None:
    result = subprocess.run([*command(role), "--port", "0", *argv], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.strip().splitlines()) == (2, [line]), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
