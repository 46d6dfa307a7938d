"""The ``--dtype`` x ``--quantize`` measurement through a real target, the start-up warning a
worker gives for a combination that is slow on its device (a CPU here), and its start-up line's
K/V cache, which is what a session's cache really holds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from specdec_core.engine_choice import EngineChoice, build_engine
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


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_the_start_up_line_names_the_cache_a_session_holds(draft_dir: Path, kv_bits: int | None,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """bfloat16 weights: on a CPU the activations, and so the cache, are float32; the line says what
    a session's cache arrays are, not the weights' dtype."""
    with caplog.at_level(logging.INFO, logger="specdec_core.engine_choice"):
        engine, _ = build_engine(EngineChoice("draft", str(draft_dir), dtype="bfloat16", kv_bits=kv_bits))
    (line,) = [r.getMessage() for r in caplog.records if " loaded " in r.getMessage()]
    (state,) = engine.start_batch([[12, 30, 7, 1]])
    keys = state.cache.cross[0][0]  # (the prompt's K, projected at open)
    if kv_bits is None:
        assert f"K/V cache {str(keys.dtype).removeprefix('mlx.core.')})" in line, line
    else:
        assert f"K/V cache {keys.quantization.bits}-bit in groups of {keys.quantization.group_size})" in line
    assert "(bfloat16 weights," in line
