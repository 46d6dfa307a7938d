"""Logs that tell the truth: ordinary requests, a request that runs out of time and a cancelled
stream leave no ERROR line and no traceback in any service's log; the deadline is one WARNING
line, the cancel one INFO line. Ctrl-C in ``specdec generate`` prints what came so far, no
traceback. Real processes (a draft, a target, an orchestrator) at --log-level INFO. And a prompt
longer than a tokenizer's model_max_length brings no false "indexing errors" warning."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from doc_prompts import PROMPTS
from procs import ServiceProcess, start_all, start_orchestrator, start_worker, wait_until

from orchestrator.client import SpecdecClient

REPO = Path(__file__).resolve().parent.parent
INFO = ["--log-level", "INFO"]
LONG = 2000  # tokens: the tiny random pair rarely writes EOS, so this runs for seconds


class Services:
    def __init__(self, log_dir: Path, processes: list[ServiceProcess]):
        self.log_dir = log_dir
        self.processes = processes
        self.orchestrator = processes[-1]

    def endings(self) -> list[tuple[str, str, str]]:
        """(request id, level, what) of every line the orchestrator logged about a request
        other than its start, in order."""
        text = self.orchestrator.log.read_text()
        return [(rid, level, what) for level, rid, what
                in re.findall(r" (\w+) orchestrator\.generation: req=(\w+) (.*)", text)
                if not what.startswith("started")]

    def started(self) -> list[str]:
        return re.findall(r"orchestrator\.generation: req=(\w+) started", self.orchestrator.log.read_text())

    def stop(self) -> None:
        for process in self.processes[::-1]:  # orchestrator first, as scripts/down does
            process.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, near_draft_dir: Path, target_dir: Path
             ) -> Iterator[Services]:
    log_dir = tmp_path_factory.mktemp("clean_logs")
    workers = start_all([start_worker("draft", near_draft_dir, log_dir, extra=INFO, wait=False),
                         start_worker("target", target_dir, log_dir, extra=INFO, wait=False)])
    try:
        orchestrator = start_orchestrator([workers[0].address], [workers[1].address], log_dir, extra=INFO)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    services = Services(log_dir, [*workers, orchestrator])
    yield services
    services.stop()


def test_ctrl_c_in_generate_prints_what_came_and_no_traceback(services: Services) -> None:
    before = len(services.started())
    cli = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "generate", PROMPTS[0], "--max-tokens", str(LONG),
         "--address", services.orchestrator.address],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: len(services.started()) > before, 60, what="the request to start")
        request_id = services.started()[before]
        assert cli.stdout is not None
        cli.stdout.read(1)  # the first text is printed: mid-stream
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"\[interrupted: (\d+) tokens? in [\d.]+ s, .* \| \d+ from the draft.*\]", last)
    assert match and 0 < int(match.group(1)) < LONG, out[-500:]
    # The server was told: the request ended there, as a cancel, in one line.
    wait_until(lambda: [e for e in services.endings() if e[0] == request_id], 30, what="the request's end")
    ended = [(level, what.split(" after")[0]) for rid, level, what in services.endings() if rid == request_id]
    assert ended == [("INFO", "cancelled by the client")]


def test_no_error_or_traceback_in_any_log_and_one_line_for_a_deadline_and_a_cancel(services: Services
                                                                                  ) -> None:
    client = SpecdecClient(services.orchestrator.address, timeout=60)
    try:
        for prompt in PROMPTS[:3]:  # ordinary requests: unary, streamed, the target alone
            assert client.generate(prompt, max_tokens=16).finish_reason
            assert list(client.stream(prompt, max_tokens=16))[-1].finish_reason
            assert client.generate(prompt, max_tokens=8, speculative=False).finish_reason
        before = len(services.started())
        with pytest.raises(grpc.RpcError) as late:
            for _ in client.stream(PROMPTS[3], max_tokens=LONG, timeout=0.5):
                pass
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = client.stream(PROMPTS[4], max_tokens=LONG)
        next(call), next(call)
        call.cancel()
        wait_until(lambda: len(services.endings()) >= len(services.started()), 30, what="every request's end")
        deadline_id, cancel_id = services.started()[before:before + 2]
        assert client.generate(PROMPTS[5], max_tokens=16).finish_reason  # and the services still serve
    finally:
        client.close()
    services.stop()  # a drain on SIGTERM must not log errors either

    endings = services.endings()
    assert [(level, what.split(":")[0]) for rid, level, what in endings if rid == deadline_id] \
        == [("WARNING", "ran out of time")]
    assert [(level, what.split(" after")[0]) for rid, level, what in endings if rid == cancel_id] \
        == [("INFO", "cancelled by the client")]
    logs = sorted(services.log_dir.glob("*.log"))
    assert len(logs) == 3
    for log in logs:
        text = log.read_text()
        errors = [line for line in text.splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]
        assert not errors, f"{log.name}: {errors[:3]}"
        assert "Traceback" not in text, f"{log.name}:\n{text[-3000:]}"


def test_a_prompt_longer_than_the_tokenizers_model_max_length_is_no_warning(caplog: pytest.LogCaptureFixture,
                                                                          capfd: pytest.CaptureFixture[str]
                                                                          ) -> None:
    """The demo tokenizer's config says model_max_length 64; T5 has no such limit, so a longer
    prompt must not bring transformers' "will result in indexing errors" warning."""
    from specdec_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(REPO / "models" / "demo-target")
    with caplog.at_level(logging.WARNING):
        ids = tokenizer("spell " + " ".join(["704316"] * 40)).input_ids
    assert len(ids) > 64
    printed = capfd.readouterr()
    assert "indexing errors" not in caplog.text + printed.out + printed.err
