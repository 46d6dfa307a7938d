"""scripts/up, scripts/status, specdec generate, scripts/down as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
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

        # What up prints to run next runs as printed, from the repository root, with no venv on the PATH.
        printed_hints = up.stdout.split("Try, from the repository root:\n", 1)[1]
        hints = [hint.strip() for hint in printed_hints.strip().splitlines()]
        assert [h.split()[1] if "specdec" in h else h.split()[0] for h in hints] == \
            ["generate", "status", "scripts/down"]
        bare = {**env, "PATH": "/usr/bin:/bin"}
        for hint in hints[:2]:
            printed = _run(["bash", "-c", hint], bare, timeout=120)
            assert printed.returncode == 0, (hint, printed.stdout + printed.stderr)
        assert hints[2] == f"scripts/down --run-dir {run_dir}"

        status = _run(["scripts/status", "--run-dir", str(run_dir)], env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 4
        assert all(f"http://{address}/metrics" in status.stdout for address in metrics)
    finally:
        down = _run(["bash", "-c", f"scripts/down --run-dir {run_dir}"], {**env, "PATH": "/usr/bin:/bin"},
                    timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 4 process(es)" in down.stdout
    for record in records:  # exactly the processes it started are gone
        assert not _running(record["pid"])
    status = _run(["scripts/status", "--run-dir", str(run_dir)], env, timeout=60)
    assert status.returncode == 1


def test_up_reports_a_missing_model_in_one_line_before_starting_anything(tmp_path: Path) -> None:
    env = {**os.environ, "SPECDEC_PYTHON": sys.executable}
    run_dir = tmp_path / "run"
    for missing in (str(tmp_path / "missing"), "models/t5-small"):  # the second: not a hub name either
        up = _run(["scripts/up", "--draft-model", missing, "--port", str(_free_port()),
                   "--run-dir", str(run_dir), "--timeout", "60"], env)
        assert up.returncode == 2
        assert up.stderr == f"scripts/up: --draft-model: checkpoint directory {missing} does not exist\n"
        assert not (run_dir / "cluster.json").exists()  # nothing was started


def test_up_reports_a_bad_passed_through_flag_with_whole_lines_of_the_workers_log(tmp_path: Path) -> None:
    env = {**os.environ, "SPECDEC_PYTHON": sys.executable}
    run_dir = tmp_path / "run"
    up = _run(["scripts/up", "--target-args", "--max-batch many", "--port", str(_free_port()),
               "--run-dir", str(run_dir), "--timeout", "60"], env)
    assert up.returncode == 1
    assert "--max-batch" in up.stderr and "many" in up.stderr  # the worker's own words, from its log
    assert not any(_running(r["pid"]) for r in json.loads((run_dir / "cluster.json").read_text()))


def test_up_passes_worker_flags_through_per_role(tmp_path: Path, near_draft_dir: Path, target_dir: Path
                                                ) -> None:
    """--worker-args reach every worker, --draft-args/--target-args their role only, and
    --orchestrator-args the orchestrator; each reports what it got (Info.limits, Status)."""
    from specdec_pb import specdec_pb2 as pb
    from specdec_pb import specdec_pb2_grpc as pb_grpc

    env = {**os.environ, "SPECDEC_PYTHON": sys.executable}
    run_dir = tmp_path / "run"
    port = _free_port()
    up = _run(["scripts/up", "--draft-model", str(near_draft_dir), "--target-model", str(target_dir),
               "--worker-args", "--max-batch 3 --batch-wait-ms 2", "--draft-args", "--max-sessions 7",
               "--target-args", "--max-batch 5", "--orchestrator-args", "--max-generations 9",
               "--port", str(port), "--run-dir", str(run_dir)], env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        limits = {}
        for record in json.loads((run_dir / "cluster.json").read_text()):
            stub = {"draft": pb_grpc.DraftStub, "target": pb_grpc.TargetStub}.get(record["role"])
            if stub is not None:
                with grpc.insecure_channel(record["address"]) as channel:
                    limits[record["role"]] = stub(channel).Info(pb.InfoRequest(), timeout=10).limits
        got = {role: (lim.max_batch, lim.batch_wait_ms, lim.max_sessions) for role, lim in limits.items()}
        assert got == {"draft": (3, 2, 7), "target": (5, 2, 64)}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = pb_grpc.OrchestratorStub(channel).Status(pb.StatusRequest(), timeout=10)
        assert status.max_generations == 9
    finally:
        _run(["scripts/down", "--run-dir", str(run_dir)], env, timeout=120)


def test_ctrl_c_while_up_starts_stops_what_it_started(tmp_path: Path, near_draft_dir: Path, target_dir: Path
                                                      ) -> None:
    env = {**os.environ, "SPECDEC_PYTHON": sys.executable}
    run_dir = tmp_path / "run"
    up = subprocess.Popen(["scripts/up", "--draft-model", str(near_draft_dir), "--target-model",
                           str(target_dir), "--port", str(_free_port()), "--run-dir", str(run_dir)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline:  # both workers started, loading
            children = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                        and _parent(int(p.name)) == up.pid}
            time.sleep(0.02)
        assert len(children) >= 2
        up.send_signal(signal.SIGINT)
        out, err = up.communicate(timeout=60)
    finally:
        up.kill()
    assert up.returncode == 130, out + err
    assert "interrupted; stopping" in err and "Traceback" not in err, err
    assert not any(_running(pid) for pid in children)
    assert not (run_dir / "cluster.json").exists()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def test_a_worker_on_a_port_in_use_stops_before_loading_its_model(tmp_path: Path, target_dir: Path) -> None:
    from specdec_tools.service_process import command

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for role, args in (("target", ["--model", str(target_dir)]), ("orchestrator", [])):
            started = _run([*command(role), *args, "--port", str(port)], dict(os.environ), timeout=120)
            assert started.returncode != 0
            assert started.stderr.strip().splitlines()[-1] == (
                f"error: cannot bind 127.0.0.1:{port} (--port): port in use; pick another --port (0 picks a "
                "free one)")
            assert "loaded" not in started.stdout + started.stderr  # refused before the model loaded
            assert "Traceback" not in started.stderr
