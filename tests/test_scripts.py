"""scripts/up, scripts/status, specdec generate, scripts/down as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import T5ForConditionalGeneration

from specdec_core.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(pid: int) -> bool:
    """Alive and not a zombie, on Linux and macOS alike: signal 0 says whether the pid exists,
    ``ps`` whether it is an exited process that its parent has not reaped yet (state Z)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    if state.returncode != 0:
        return False  # gone since
    return not state.stdout.strip().startswith("Z")


def test_running_tells_live_exited_and_reaped_processes_apart() -> None:
    """The check the tests below rely on can say "running": a live process is, a killed but
    unreaped one (a zombie) is not, and neither is a reaped one."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _running(child.pid)
    finally:
        child.kill()
    deadline = time.monotonic() + 60  # SIGKILL takes effect at once; the deadline only bounds a hang
    while _running(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _running(child.pid)
    os.kill(child.pid, 0)  # it still exists (nobody reaped it): "not running" came from the zombie check
    child.wait()
    assert not _running(child.pid)


def _metrics(address: str) -> dict[str, dict[tuple, float]]:
    """A /metrics scrape: sample name -> sorted labels -> value (prometheus_client's parser)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_up_generate_status_down(tmp_path: Path, near_draft_dir: Path, target_dir: Path) -> None:
    env = {**os.environ, "SPECDEC_PYTHON": sys.executable}
    run_dir = tmp_path / "run"
    port = _free_port()
    up = _run(["scripts/up", "--drafts", "2", "--draft-model", str(near_draft_dir), "--target-model",
               str(target_dir), "--port", str(port), "--run-dir", str(run_dir)], env)
    assert up.returncode == 0, up.stdout + up.stderr
    records = json.loads((run_dir / "cluster.json").read_text())
    try:
        assert [r["role"] for r in records] == ["draft", "draft", "target", "orchestrator"]
        assert "specdec generate" in up.stdout

        prompt = "Return a new path with the file name changed."
        generate = _run([sys.executable, "-m", "orchestrator.cli", "generate", prompt, "--max-tokens", "12",
                         "--json", "--address", f"127.0.0.1:{port}"], env, timeout=60)
        assert generate.returncode == 0, generate.stderr
        result = json.loads(generate.stdout)
        tokenizer = load_tokenizer(target_dir)
        model = T5ForConditionalGeneration.from_pretrained(target_dir).eval()
        with torch.no_grad():
            expected = model.generate(tokenizer(prompt, return_tensors="pt").input_ids, do_sample=False,
                                      max_new_tokens=12)[0].tolist()[1:]
        expected = expected[: expected.index(1)] if 1 in expected else expected
        assert result["token_ids"] == expected

        # Every service serves Prometheus metrics on the port cluster.json records (each its own).
        metrics = [r["metrics_address"] for r in records]
        assert len(set(metrics) | {r["address"] for r in records}) == 2 * len(records)
        for record in records:
            families = _metrics(record["metrics_address"])
            if record["role"] == "orchestrator":  # the generation above, as its stats count it
                assert families["specdec_requests_total"] == {(("code", "OK"), ("outcome", "ok")): 1}
                assert families["specdec_generation_tokens_total"] == {(): result["stats"]["tokens"]}
            else:
                assert families["specdec_worker_live_sessions"] == {(("role", record["role"]),): 0}

        status = _run(["scripts/status", "--run-dir", str(run_dir)], env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 4
        assert all(f"http://{address}/metrics" in status.stdout for address in metrics)
    finally:
        down = _run(["scripts/down", "--run-dir", str(run_dir)], env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 4 process(es)" in down.stdout
    for record in records:  # exactly the processes it started are gone
        assert not _running(record["pid"])
    status = _run(["scripts/status", "--run-dir", str(run_dir)], env, timeout=60)
    assert status.returncode == 1


def test_up_refuses_a_second_cluster_and_reports_a_bad_model(tmp_path: Path) -> None:
    env = {**os.environ, "SPECDEC_PYTHON": sys.executable}
    run_dir = tmp_path / "run"
    up = _run(["scripts/up", "--draft-model", str(tmp_path / "missing"), "--port", str(_free_port()),
               "--run-dir", str(run_dir), "--timeout", "60"], env)
    assert up.returncode == 1
    assert "does not exist" in up.stderr  # the worker's own message, from its log
    assert not any(_running(r["pid"]) for r in json.loads((run_dir / "cluster.json").read_text()))
