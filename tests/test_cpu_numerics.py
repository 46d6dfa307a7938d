"""The ``--dtype`` x ``--quantize`` measurement through a real target, and the start-up warning a
worker gives for a combination that is slow on its device (a CPU here)."""

from __future__ import annotations

import json
from pathlib import Path

from specdec_tools.bench.cpu_numerics import main


def test_matrix_through_a_target_and_the_warning_only_where_quantized(t5_v11_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    assert main(["--source", str(t5_v11_dir), "--work", str(tmp_path), "--dtypes", "float32,bfloat16",
                 "--quantize", "none,8", "--tokens", "3", "--blocks", "2", "--rounds", "1"]) == 0
    figures = json.loads((tmp_path / "cpu_numerics.json").read_text())
    assert list(figures) == ["float32", "float32 + 8-bit", "bfloat16", "bfloat16 + 8-bit"]
    for name, (run,) in figures.items():
        assert run["ms_per_token"] > 0 and run["cpu_ms_per_block"] > 0 and run["peak_rss_bytes"] > 0, name
        assert run["warned"] == name.endswith("8-bit"), name
    log = (tmp_path / "target-bfloat16-q8.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "leave out --quantize" in warnings[0]
    assert "computing in float32" in log
    table = (tmp_path / "cpu_numerics.md").read_text()
    assert table.count("\n") == 6 and "| bfloat16 | 8 |" in table and "| yes |" in table
    assert table in capsys.readouterr().out
