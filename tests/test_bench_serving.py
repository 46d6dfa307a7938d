"""Smoke test of ``specdec-bench --concurrency``: the tiny synthetic pair at 1 and 2 concurrent clients,
both systems (speculative at auto k and at k=2), all three outputs, and greedy speculative outputs
equal to the target alone's."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib  # noqa: F401 - the bench plots with it; declared in the test extra, so never skipped
import pytest
import torch  # noqa: F401 - the bench's HF systems run on it (test extra)

from specdec_tools.bench import main

REQUESTS = 2
PHASE_FIELDS = ("requests", "errors", "tokens", "wall_s", "tokens_per_s", "scaling", "tpot_ms_p50", "tpot_ms_p99",
                "ttft_ms_p50", "ttft_ms_p99", "acceptance", "exact_greedy", "workers", "runs")


@pytest.mark.timeout(180)
def test_serving_bench_at_one_and_two_clients(tmp_path: Path) -> None:
    out = tmp_path / "serving"
    code = main(["--concurrency", "1,2", "--quick", "--tiny", "--out", str(out), "--requests", str(REQUESTS),
                 "--prompts", "3", "--max-tokens", "8", "--ks", "auto,2", "--log-level", "WARNING"])
    assert code == 0
    for name in ("serving.json", "serving.md", "serving.png"):
        assert (out / name).stat().st_size > 0, name
    # the services' logs stay in the output directory, beside this process's own
    assert {"bench.log", "synthetic-draft.log", "synthetic-target.log", "synthetic-orchestrator.log"} <= {
        p.name for p in (out / "logs").iterdir()}
    report = json.loads((out / "serving.json").read_text())
    assert report["machine"]["blas"] and report["machine"]["cpus"]
    assert report["settings"]["concurrency"] == [1, 2] and report["settings"]["ks"] == ["auto", "2"]
    (workload,) = report["workloads"]
    assert workload["name"] == "synthetic" and len(workload["prompts"]) == 3
    phases = workload["results"]["phases"]
    assert sorted((p["concurrency"], p["system"], p["k"] or "") for p in phases) == sorted(
        (c, s, k) for c in (1, 2) for s, k in (("speculative", "auto"), ("speculative", "2"), ("target", "")))
    for phase in phases:
        label = f"C={phase['concurrency']} {phase['system']} k={phase['k']}"
        for field in PHASE_FIELDS:
            assert field in phase, (label, field)
        assert phase["errors"] == 0 and phase["requests"] == REQUESTS * phase["concurrency"], label
        assert phase["tokens"] > 0 and phase["tokens_per_s"] > 0 and phase["scaling"] > 0, label
        assert 0 < phase["tpot_ms_p50"] <= phase["tpot_ms_p99"] and phase["ttft_ms_p50"] > 0, label
        assert all(run["tokens"] > 0 and run["token_ids"] for run in phase["runs"]), label
        # Info read before and after the phase: the target stepped in every phase, the draft only
        # when speculating (so the reads bracket the phase and speculative=false reached the server)
        draft, target = phase["workers"]["draft"], phase["workers"]["target"]
        assert target["steps"] > 0, label
        assert (draft["steps"] > 0) == (phase["system"] == "speculative"), label
        for worker in (draft, target):
            assert worker["mean_batch"] is None or 1.0 <= worker["mean_batch"] <= phase["concurrency"], label
        assert draft["mean_batch"] is None or phase["system"] == "speculative", label
        # drafted per step: none for the target alone, at most k (1..k: EOS or max_tokens cut blocks)
        drafted = phase["drafted_per_step"]
        assert drafted == 0 if phase["system"] == "target" else 0 < drafted <= (2 if phase["k"] == "2" else 16), label
        assert phase["tokens_per_step"] >= 1.0, label

    # Greedy: every speculative output equals the target alone's on the same prompt, checked from the
    # raw runs. Not vacuous: drafts were proposed and accepted, the prompts give different outputs,
    # and every prompt ran in both systems.
    runs = {system: [run for p in phases if p["system"] == system for run in p["runs"]]
            for system in ("speculative", "target")}
    alone = {}
    for run in runs["target"]:
        assert alone.setdefault(run["prompt"], run["token_ids"]) == run["token_ids"], run["prompt"]
    assert len({tuple(ids) for ids in alone.values()}) > 1
    assert {run["prompt"] for run in runs["speculative"]} == set(alone) == {0, 1, 2}
    for run in runs["speculative"]:
        assert run["token_ids"] == alone[run["prompt"]], run
    assert sum(run["accepted"] for run in runs["speculative"]) > 0
    assert sum(run["proposed"] for run in runs["target"]) == 0
    assert all(p["exact_greedy"] == 1.0 for p in phases)

    (crossover,) = workload["results"]["crossover"]
    assert [r["concurrency"] for r in crossover["speculative_over_target"]] == [1, 2]
    assert [each["k"] for each in crossover["by_k"]] == ["auto", "2"]
    # auto against the best of k=2 and the target alone (k=0), from the phases' own rates
    for compared in crossover["auto_over_best_fixed"]:
        rates = {(p["k"] or "0"): p["tokens_per_s"] for p in phases if p["concurrency"] == compared["concurrency"]}
        best = max(rates["2"], rates["0"])
        assert compared["ratio"] == pytest.approx(rates["auto"] / best)
        assert rates[compared["best_fixed_k"]] == best
    assert [r["concurrency"] for r in crossover["auto_over_best_fixed"]] == [1, 2]
    markdown = (out / "serving.md").read_text()
    assert "| concurrency | system | aggregate tok/s | vs C=1 |" in markdown and "Speculative k=2 " in markdown
    assert "| speculative k=auto |" in markdown and "Auto k over the best fixed k" in markdown


def test_serving_flags_are_checked_before_anything_runs(tmp_path: Path) -> None:
    for argv, fragment in ((["--concurrency", "0,2"], "client counts"), (["--concurrency", "x"], "client counts"),
                           (["--concurrency", "1", "--ks", "2,x"], "k in 1..16"),
                           (["--concurrency", "1", "--drafting"], "pick one")):
        with pytest.raises(SystemExit, match=fragment):
            main([*argv, "--out", str(tmp_path / "out"), "--log-level", "WARNING"])
    assert not (tmp_path / "out").exists()
