"""Smoke test of ``specdec-bench``: a tiny synthetic pair, one prompt, every system, all three outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdec_tools.bench import expected_tokens, fit_alpha, main, speedup_bound

pytest.importorskip("matplotlib")
pytest.importorskip("torch")

SYSTEMS = {"services-target", "services-spec", "inproc-target", "inproc-spec", "hf-target", "hf-assisted"}


def test_speedup_bound_and_alpha_fit() -> None:
    assert speedup_bound(0.0, 5, 0.1) == pytest.approx(1 / 1.5)
    assert speedup_bound(1.0, 3, 0.0) == pytest.approx(4.0)
    # alpha 0.8, k 3, c 0.05: (1 - 0.8^4) / ((1 - 0.8) * (3 * 0.05 + 1))
    assert speedup_bound(0.8, 3, 0.05) == pytest.approx((1 - 0.8**4) / (0.2 * 1.15))
    for alpha in (0.1, 0.5, 0.9):
        assert fit_alpha(expected_tokens(alpha, 4), 4) == pytest.approx(alpha, abs=1e-9)
    assert fit_alpha(1.0, 4) == 0.0 and fit_alpha(5.0, 4) == 1.0


@pytest.mark.timeout(180)
def test_quick_bench_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(["--quick", "--tiny", "--out", str(out), "--workloads", "synthetic,demo",
                 "--models-dir", str(tmp_path / "no-models"), "--ks", "2", "--prompts", "1",
                 "--repeats", "1", "--max-tokens", "6", "--log-level", "WARNING"])
    assert code == 0
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "bench.json").read_text())
    assert report["machine"]["blas"] and report["machine"]["mlx"] and report["machine"]["cpus"]
    assert "demo" in report["skipped"]  # no demo pair in tmp_path: skipped with a message
    (workload,) = report["workloads"]
    assert workload["name"] == "synthetic"
    cells = workload["results"]["cells"]
    assert {c["system"] for c in cells} == SYSTEMS
    spec = {(c["temperature"], c["k"]) for c in cells if c["system"] == "services-spec"}
    assert spec == {(0.0, "2"), (1.0, "2")}
    for cell in cells:
        assert cell["ms_per_token"] > 0 and cell["tokens"] > 0, cell["system"]
        if cell["system"] in ("services-spec", "inproc-spec", "hf-assisted"):
            assert cell["speedup"] > 0
        if cell["system"] == "services-spec":
            for key in ("alpha", "alpha_hat", "tokens_per_target_pass", "grpc_ms_per_step",
                        "wire_bytes_per_step", "bound"):
                assert cell[key] is not None, key
            assert 0.0 <= cell["alpha"] <= 1.0 and cell["wire_bytes_per_step"] > 0
    for derived in workload["results"]["per_temperature"].values():
        assert derived["cost_ratio_c"] > 0
    # Greedy speculative output is the target's own, through the services and in process.
    exact = workload["results"]["exact_greedy"]
    assert exact["T=0 services-spec k=2"] == 1.0 and exact["T=0 inproc-spec k=2"] == 1.0
    markdown = (out / "bench.md").read_text()
    assert "Machine:" in markdown and "| k |" in markdown and "skipped" in markdown
