"""The orchestrator process never imports MLX (nor torch): it only tokenizes and coordinates."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import orchestrator.server, orchestrator.cli, orchestrator.client
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "torch"))
print(",".join(heavy))
"""


def test_orchestrator_modules_do_not_import_mlx() -> None:
    # A fresh interpreter: this test process may have MLX loaded by other tests.
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the orchestrator imported {result.stdout.strip()}"


def test_the_check_sees_mlx_when_it_is_imported() -> None:
    """Counter-test: the same probe reports MLX once something does import it."""
    probe = CHECK.replace("import orchestrator.server", "import specdec_core.engine, orchestrator.server")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "mlx.core" in result.stdout.split(",")
