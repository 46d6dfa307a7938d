"""Smoke test of ``specdec-bench``: a tiny synthetic pair, one prompt, every system, all three outputs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib  # noqa: F401 - the bench plots with it; declared in the test extra, so never skipped
import numpy as np
import pytest
import torch  # the bench's HF systems run on it (test extra)

from specdec_tools.bench import main
from specdec_tools.bench.analysis import derive, expected_tokens, fit_alpha, speedup_bound
from specdec_tools.bench.cells import Cell

SYSTEMS = {"services-target", "services-spec", "services-serial", "services-unary", "inproc-target", "inproc-spec",
           "hf-target", "hf-assisted"}


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


def test_grpc_time_per_step_is_the_serial_services_over_the_serial_loop() -> None:
    """Drafting ahead makes (b)'s loop step shorter than (c)'s serial one by draft time, which is no
    wire cost: the gRPC figure is (b') - (c) at the same fixed k, and none under auto."""
    def cell(loop_ms: float) -> dict:
        return {"loop_ms_per_step": loop_ms, "wall_ms_per_step": loop_ms + 1, "cpu_ms_per_step": None,
                "draft_ms_per_step": 10.0, "verify_ms_per_step": 20.0, "ms_per_token": 10.0,
                "target_ms_per_pass": 20.0, "draft_ms_per_token": 2.0, "drafted_per_step": 2.0,
                "tokens_per_target_pass": 2.0, "alpha": 0.5}
    cells = {Cell(0.0, "inproc-target", None): cell(20.0), Cell(0.0, "services-target", None): cell(21.0)}
    for k in ("2", "auto"):
        cells |= {Cell(0.0, "inproc-spec", k): cell(30.0), Cell(0.0, "services-spec", k): cell(26.0),
                  Cell(0.0, "services-serial", k): cell(31.5)}
    derive(cells, [0.0], ["2", "auto"])
    assert cells[Cell(0.0, "services-spec", "2")]["grpc_ms_per_step"] == pytest.approx(1.5)
    assert cells[Cell(0.0, "services-serial", "2")]["grpc_ms_per_step"] == pytest.approx(1.5)
    assert cells[Cell(0.0, "services-spec", "auto")]["grpc_ms_per_step"] is None


def test_alpha_fit_at_the_edges() -> None:
    assert fit_alpha(1.0, 4) == 0.0 and fit_alpha(5.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5 and expected_tokens(0.0, 4) == 1


@pytest.mark.timeout(180)
def test_quick_bench_writes_json_markdown_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = main(["--quick", "--tiny", "--out", str(out), "--workloads", "synthetic,demo",
                 "--models-dir", str(tmp_path / "no-models"), "--ks", "2", "--prompts", "1",
                 "--repeats", "1", "--max-tokens", "6"])
    assert code == 0
    # The run ends with the verdict, not the tables (they stay in bench.md); the in-process systems'
    # INFO lines and the services' logs went to files, not to the console.
    printed = capsys.readouterr()
    assert printed.out.startswith("Verdict:\n  synthetic T=0: speculative through the services runs ")
    assert "greedy output equals the target alone's in every cell" in printed.out
    assert "| k |" not in printed.out and str(out / "bench.md") in printed.out
    assert "req=" not in printed.err and "logs of this run" in printed.err
    logs = out / "logs"
    assert "req=" in (logs / "bench.log").read_text()  # (c)'s per-request lines
    assert {"synthetic-draft.log", "synthetic-target.log", "synthetic-orchestrator.log"} <= {
        p.name for p in logs.iterdir()}
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
            assert cell["vs_serial"] > 0 and cell["vs_unary"] > 0 and sum(cell["steps_per_k"]) == cell["steps"]
    for derived in workload["results"]["per_temperature"].values():
        assert derived["cost_ratio_c"] > 0
    # Greedy speculative output is the target's own, through the services and in process.
    exact = workload["results"]["exact_greedy"]
    assert exact["T=0 services-spec k=2"] == 1.0 and exact["T=0 inproc-spec k=2"] == 1.0
    assert exact["T=0 services-serial k=2"] == 1.0 and exact["T=0 services-unary k=2"] == 1.0
    markdown = (out / "bench.md").read_text()
    assert "Machine:" in markdown and "| k |" in markdown and "skipped" in markdown
    assert markdown.index("Verdict:") < markdown.index("| k |")
    # gRPC ms/step compares the serial services with the serial loop in process, at the same k
    by_system = {(c["temperature"], c["system"]): c for c in cells}
    for temperature in (0.0, 1.0):
        serial, inproc = by_system[(temperature, "services-serial")], by_system[(temperature, "inproc-spec")]
        assert by_system[(temperature, "services-spec")]["grpc_ms_per_step"] == pytest.approx(
            serial["loop_ms_per_step"] - inproc["loop_ms_per_step"])
    # --report-from derives the same figures again from the stored runs, running nothing
    again = tmp_path / "again"
    assert main(["--report-from", str(out / "bench.json"), "--out", str(again), "--log-level", "WARNING"]) == 0
    rederived = json.loads((again / "bench.json").read_text())
    assert rederived["workloads"][0]["results"] == workload["results"]
    assert (again / "bench.md").read_text() == markdown


# -- the custom workload: the user's own pair and prompts -------------------------------------------

CUSTOM_SETTINGS = ["--quick", "--ks", "2", "--temperatures", "0", "--prompts", "2", "--repeats", "1",
                   "--max-tokens", "6", "--log-level", "WARNING"]


def convert(source: Path, out: Path, *flags: str) -> Path:
    from specdec_tools.convert import main as convert_main

    assert convert_main(["--model", str(source), "--out", str(out), *flags]) == 0
    return out


@pytest.mark.timeout(300)
def test_custom_workload_runs_your_pair_and_prompts(tmp_path: Path, draft_dir: Path, target_dir: Path) -> None:
    """A specdec-format draft, an HF-format target, JSON Lines prompts: every system runs."""
    from transformers import T5ForConditionalGeneration

    from specdec_core.tokenizer import load_tokenizer

    draft = convert(draft_dir, tmp_path / "draft-mlx")
    prompts = ["Return the number of items in a container.", "Factory for creating file objects", "unused"]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)) + "\n\n")
    out = tmp_path / "bench"
    assert main(["--draft-model", str(draft), "--target-model", str(target_dir), "--prompts-file",
                 str(prompts_file), "--out", str(out), *CUSTOM_SETTINGS]) == 0
    report = json.loads((out / "bench.json").read_text())
    (workload,) = report["workloads"]
    assert workload["name"] == "custom" and workload["prompts"] == prompts[:2]
    assert workload["draft"] == str(draft) and workload["target"] == str(target_dir)
    assert workload["max_tokens"] == 6 and not workload["results"]["skipped_systems"]
    cells = workload["results"]["cells"]
    assert {c["system"] for c in cells} == SYSTEMS
    for cell in cells:
        assert cell["generations"] == 2 and cell["tokens"] > 0, cell["system"]
    exact = workload["results"]["exact_greedy"]
    assert exact["T=0 services-spec k=2"] == 1.0 and exact["T=0 inproc-spec k=2"] == 1.0
    # The services ran the user's pair: the target's greedy output on the user's first prompt.
    tokenizer = load_tokenizer(target_dir)
    model = T5ForConditionalGeneration.from_pretrained(target_dir).eval()
    with torch.no_grad():
        ids = model.generate(tokenizer(prompts[0], return_tensors="pt").input_ids, do_sample=False,
                             max_new_tokens=6)[0].tolist()[1:]
    expected = ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids
    services = next(c for c in cells if c["system"] == "services-target")
    assert services["runs"][0]["token_ids"] == expected
    assert "## custom: your pair" in (out / "bench.md").read_text()


@pytest.mark.timeout(300)
def test_custom_workload_skips_transformers_for_a_quantized_checkpoint(tmp_path: Path, draft_dir: Path,
                                                                        target_dir: Path) -> None:
    target = convert(target_dir, tmp_path / "target-q8", "--quantize", "8")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Return the number of items in a container.\n\n  Factory for creating file objects  \n")
    out = tmp_path / "bench"
    assert main(["--draft-model", str(draft_dir), "--target-model", str(target), "--prompts-file",
                 str(prompts_file), "--out", str(out), *CUSTOM_SETTINGS]) == 0
    report = json.loads((out / "bench.json").read_text())
    (workload,) = report["workloads"]
    assert workload["prompts"] == ["Return the number of items in a container.", "Factory for creating file objects"]
    skipped = workload["results"]["skipped_systems"]
    assert set(skipped) == {"hf-target", "hf-assisted"} and "quantized" in skipped["hf-target"]
    cells = workload["results"]["cells"]
    assert {c["system"] for c in cells} == SYSTEMS - set(skipped)
    assert workload["results"]["exact_greedy"]["T=0 services-spec k=2"] == 1.0
    b = next(c for c in cells if c["system"] == "services-spec")
    assert b["speedup"] > 0 and b["vs_hf_assisted"] is None
    markdown = (out / "bench.md").read_text()
    assert "transformers cannot load this pair" in markdown
    assert (out / "bench.png").stat().st_size > 0


def test_systems_flag_adds_what_the_figures_need() -> None:
    from specdec_tools.bench.cli import chosen_systems

    assert set(chosen_systems("services-spec")) == {"services-spec", "services-target", "inproc-spec",
                                                     "inproc-target"}
    assert set(chosen_systems("hf-assisted")) >= {"hf-assisted", "hf-target", "inproc-spec"}
    with pytest.raises(SystemExit, match="unknown system"):
        chosen_systems("services-fast")


@pytest.mark.timeout(300)
def test_an_in_process_only_run_starts_no_services_and_still_reports(tmp_path: Path, draft_dir: Path,
                                                                     target_dir: Path) -> None:
    """``--systems inproc-spec``: only (c) and its target run (no service process, no transformers),
    and the figures that need (a) or (b) are absent, not a crash."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Return the number of items in a container.\nFactory for creating file objects\n")
    out = tmp_path / "bench"
    assert main(["--draft-model", str(draft_dir), "--target-model", str(target_dir), "--prompts-file",
                 str(prompts_file), "--out", str(out), "--systems", "inproc-spec", *CUSTOM_SETTINGS]) == 0
    (workload,) = json.loads((out / "bench.json").read_text())["workloads"]
    cells = workload["results"]["cells"]
    assert {c["system"] for c in cells} == {"inproc-spec", "inproc-target"}
    c = next(cell for cell in cells if cell["system"] == "inproc-spec")
    assert c["speedup"] > 0 and c["speedup_vs_a"] is None and c["alpha"] is not None
    assert workload["results"]["exact_greedy"] == {"T=0 inproc-spec k=2": 1.0}
    assert "| 2 | - |" in (out / "bench.md").read_text()  # (b) left out: its column is empty


def test_prompts_file_formats(tmp_path: Path) -> None:
    from specdec_tools.bench.workloads import read_prompts

    plain = tmp_path / "plain.txt"
    plain.write_text("first prompt\n\n  second  \n{not json\n")
    assert read_prompts(plain) == ["first prompt", "second", "{not json"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a b", "x": 1}\n\n{"prompt": " c "}\n')
    assert read_prompts(lines) == ["a b", " c "]
    for content, fragment in (('{"prompt": "a"}\n{"text": "b"}\n', ':2: no "prompt"'),
                              ('{"prompt": "a"}\nplain\n', ":2: not JSON"), ("\n \n", "no prompts")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(SystemExit, match=fragment):
            read_prompts(bad)


@pytest.mark.parametrize("argv, fragment", [
    (["--draft-model", "d", "--target-model", "t"], "needs --prompts-file"),
    (["--draft-model", "d", "--target-model", "t", "--prompts-file", "f", "--workloads", "demo"], "add custom"),
    (["--workloads", "custom"], "needs --draft-model"),
    (["--workloads", "nope"], "unknown workload"),
])
def test_custom_flags_are_checked_before_anything_runs(tmp_path: Path, argv: list[str], fragment: str) -> None:
    with pytest.raises(SystemExit, match=fragment):
        main([*argv, "--out", str(tmp_path / "out"), "--log-level", "WARNING"])
    assert not (tmp_path / "out" / "bench.json").exists()
