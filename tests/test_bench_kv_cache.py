"""Smoke test of ``specdec-bench --concurrency 1,2 --kv-bits none,4``: the tiny synthetic pair, a target
per K/V setting beside one draft. Through the services, at one and two concurrent clients, every
greedy speculative output equals its own setting's target alone; the baseline agrees with itself; the
4-bit targets' sessions are smaller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch  # noqa: F401 - the bench's HF systems run on it; declared in the test extra, so never skipped

from specdec_tools.bench import main

REQUESTS = 2


@pytest.mark.timeout(240)
def test_kv_cache_settings_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "kv"
    code = main(["--concurrency", "1,2", "--kv-bits", "none,4", "--quick", "--tiny", "--out", str(out),
                 "--requests", str(REQUESTS), "--prompts", "3", "--max-tokens", "12", "--ks", "2",
                 "--log-level", "WARNING"])
    assert code == 0
    report = json.loads((out / "kv_cache.json").read_text())
    assert report["settings"]["kv_bits"] == ["none", "4"]
    (workload,) = report["workloads"]
    results = workload["results"]
    assert results["baseline"] == "none"
    baseline, quantized = results["settings"]
    assert (baseline["target"]["kv_bits"], quantized["target"]["kv_bits"]) == (0, 4)
    assert baseline["agreement"]["identical"] == 3 and baseline["agreement"]["token_agreement"] == 1.0
    assert len(quantized["greedy_alone"]) == 3 and 0.0 <= quantized["agreement"]["token_agreement"] <= 1.0
    for entry in results["settings"]:
        phases = entry["phases"]
        assert sorted((p["concurrency"], p["system"]) for p in phases) == [
            (1, "speculative"), (1, "target"), (2, "speculative"), (2, "target")]
        for phase in phases:
            assert phase["errors"] == 0 and phase["exact_greedy"] == 1.0, (entry["kv_bits"], phase["system"])
        # the timed target-alone requests give the agreement pass's tokens (both the target alone, greedy)
        alone = {run["prompt"]: run["token_ids"] for p in phases if p["system"] == "target" for run in p["runs"]}
        assert all(tokens == entry["greedy_alone"][prompt] for prompt, tokens in alone.items())
    assert [v["concurrency"] for v in quantized["versus_baseline"]] == [1, 1, 2, 2]
    sizes = [entry["target"]["typical_session_bytes"] for entry in results["settings"]]
    if sizes[0] is not None:  # a worker that reports its cache bytes in Info
        assert sizes[1] < sizes[0]
    markdown = (out / "kv_cache.md").read_text()
    assert "| target --kv-bits |" in markdown and "kv 4 tokens/s vs baseline" in markdown


def test_kv_bits_flags_are_checked_before_anything_runs(tmp_path: Path) -> None:
    for argv, fragment in ((["--kv-bits", "8"], "give --concurrency too"),
                           (["--concurrency", "1", "--kv-bits", "none,3"], "settings from none, 8, 4")):
        with pytest.raises(SystemExit, match=fragment):
            main([*argv, "--out", str(tmp_path / "out"), "--log-level", "WARNING"])
    assert not (tmp_path / "out").exists()
