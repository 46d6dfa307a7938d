"""Smoke test of ``specdec-bench``: a tiny synthetic pair, one prompt, every system, all three outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from specdec_tools.bench import main
from specdec_tools.bench.analysis import expected_tokens, fit_alpha, speedup_bound

pytest.importorskip("matplotlib")
pytest.importorskip("torch")

SYSTEMS = {"services-target", "services-spec", "inproc-target", "inproc-spec", "hf-target", "hf-assisted"}


def simulated_tokens_per_pass(alpha: float, k: int, passes: int, rng: np.random.Generator) -> np.ndarray:
    """Leviathan's acceptance process, simulated: each of k draft tokens is accepted independently
    with probability alpha, the first rejection ends the block, and the target adds one token."""
    accepted = rng.random((passes, k)) < alpha
    # argmin finds the first rejection (False); a row with none accepted all k
    kept = np.where(accepted.all(axis=1), k, accepted.argmin(axis=1))
    return kept + 1


def test_speedup_bound() -> None:
    assert speedup_bound(0.0, 5, 0.1) == pytest.approx(1 / 1.5)
    assert speedup_bound(1.0, 3, 0.0) == pytest.approx(4.0)
    # alpha 0.8, k 3, c 0.05: (1 - 0.8^4) / ((1 - 0.8) * (3 * 0.05 + 1))
    assert speedup_bound(0.8, 3, 0.05) == pytest.approx((1 - 0.8**4) / (0.2 * 1.15))


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_expected_tokens_and_alpha_fit_match_a_simulation(alpha: float, k: int) -> None:
    tokens = simulated_tokens_per_pass(alpha, k, 200_000, np.random.default_rng(1000 * k + int(100 * alpha)))
    mean, stderr = tokens.mean(), tokens.std() / np.sqrt(len(tokens))
    assert expected_tokens(alpha, k) == pytest.approx(mean, abs=5 * stderr)
    # The fit inverts the simulated mean; 5 standard errors of the mean, carried through the slope
    # of expected_tokens at alpha (sum of i a^(i-1)), bound how far it may land from alpha.
    slope = sum(i * alpha ** (i - 1) for i in range(1, k + 1))
    assert fit_alpha(float(mean), k) == pytest.approx(alpha, abs=5 * stderr / slope + 1e-6)


def test_alpha_fit_at_the_edges() -> None:
    assert fit_alpha(1.0, 4) == 0.0 and fit_alpha(5.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5 and expected_tokens(0.0, 4) == 1


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
