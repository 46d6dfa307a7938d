"""``specdec status --watch``: refreshed blocks per replica, plain text off a terminal, rates between
two readings (tokens/s of the target, the draft's acceptance, the batch size) that agree with what
the requests in between report."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import LoopThread, speculative_cluster

from orchestrator import cli
from orchestrator.status_watch import watch
from specdec_tools.tiny_checkpoints import corpus_lines

REPO = Path(__file__).resolve().parent.parent
PROMPTS = corpus_lines()[13:200:23][:3]
HEALTH_S = 0.2


@pytest.fixture(scope="module")
def cluster(loop: LoopThread, near_draft_dir: Path, target_dir: Path):
    with speculative_cluster(loop, near_draft_dir, target_dir, health_interval_s=HEALTH_S) as (client, _, _, orch):
        yield client, orch


def rows(block: str) -> dict[str, dict[str, str]]:
    """The block's table as {role: {column: cell}} (one replica per role here)."""
    lines = block.strip("\n").splitlines()
    header = re.split(r"\s{2,}", lines[1])  # cells are two spaces or more apart; one may hold a space
    return {cells[0]: dict(zip(header, cells, strict=True))
            for cells in (re.split(r"\s{2,}", line) for line in lines[2:])}


def test_watch_off_a_terminal_prints_plain_blocks_with_the_rates_between_them(cluster, capsys) -> None:
    client, orch = cluster
    client.generate(PROMPTS[0], max_tokens=8, num_draft=3)  # the services are warm; counters start
    replies = []

    def between(_seconds: float) -> None:
        """Requests between the two readings, then a health check that read the workers' counters."""
        before = {r.role: r.batches for r in client.status().replicas}
        replies.extend(client.generate(prompt, max_tokens=16, num_draft=3) for prompt in PROMPTS)
        deadline = time.monotonic() + 30
        while {r.role: r.batches for r in client.status().replicas}["target"] <= before["target"]:
            assert time.monotonic() < deadline, "the health watch did not read the target's Info"
            time.sleep(HEALTH_S / 2)

    out = io.StringIO()  # not a terminal
    watch(client.status, 0.1, 2, out, sleep=between)
    text = out.getvalue()
    assert "\x1b" not in text
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert len(blocks) == 2 and all(b.startswith("specdec status at ") for b in blocks)
    first, second = rows(blocks[0]), rows(blocks[1])
    assert set(first) == set(second) == {"draft", "target"}
    assert first["target"]["tokens/s"] == first["draft"]["accepted"] == first["target"]["batch"] == "-"
    assert float(second["target"]["tokens/s"]) > 0
    accepted = sum(r.stats.accepted for r in replies)
    proposed = sum(r.stats.proposed for r in replies)
    assert second["draft"]["accepted"] == f"{accepted / proposed:.0%}"
    assert float(second["target"]["batch"]) >= 1
    assert second["target"]["health"] == "serving"
    seconds = float(re.search(r"rates over the last ([\d.]+) s", blocks[1]).group(1))
    tokens = sum(r.stats.tokens for r in replies)
    # the interval is shown to 0.1 s and the rate to 0.1 tokens/s
    assert tokens / (seconds + 0.05) - 0.05 <= float(second["target"]["tokens/s"]) <= tokens / (seconds - 0.05) + 0.05


def test_status_watch_command_stops_after_count_and_exits_cleanly(cluster, capsys) -> None:
    _, orch = cluster
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["status", "--watch", "0.05", "--count", "2", "--address", orch.address])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.count("specdec status at ") == 2 and "\x1b" not in out


def test_ctrl_c_ends_the_watch_without_an_error(cluster) -> None:
    """SIGINT (Ctrl-C) while it waits for the next refresh: exit 0, no traceback, no "interrupted"."""
    _, orch = cluster
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "status", "--watch", "30", "--address",
                                orch.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=env)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("specdec status at ")  # the first block is out
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "Traceback" not in err and "interrupted" not in err and "\x1b" not in out
