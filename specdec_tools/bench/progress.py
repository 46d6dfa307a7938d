"""What ``specdec-bench`` shows while it runs: its own lines on the console, everything else in files.

The in-process systems run the orchestrator and two session hosts in this process; their
per-request INFO lines would drown the benchmark's own progress, so every logger but
``specdec.bench`` writes to ``OUT/logs/bench.log`` only, beside each service's log. A phase's
progress stays on one line on a terminal (rewritten in place) and is a line per update elsewhere.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

BENCH_LOGGER = "specdec.bench"
FORMAT = "%(asctime)s %(message)s"


def route_logs(out: Path, level: int) -> Path:
    """Console: the benchmark's own lines; ``OUT/logs/bench.log``: every logger's. Returns the
    logs directory (the services write theirs there too)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):  # a basicConfig made before (tests, embedding callers)
        root.removeHandler(handler)
    to_file = logging.FileHandler(logs / "bench.log")
    to_file.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(to_file)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    bench = logging.getLogger(BENCH_LOGGER)
    for handler in list(bench.handlers):
        bench.removeHandler(handler)
    bench.addHandler(console)  # and on to the file through the root
    bench.info("logs of this run (this process's and each service's): %s", logs)
    return logs


class Progress:
    """One phase's progress: rewritten in place on a terminal, a line per update elsewhere."""

    def __init__(self, phase: str, stream: TextIO | None = None):
        self.phase = phase
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.width = 0
        self.logger = logging.getLogger(BENCH_LOGGER)

    def update(self, text: str) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if self.terminal:
            line = f"{self.phase}: {text}"
            self.stream.write("\r" + line.ljust(self.width))
            self.stream.flush()
            self.width = len(line)
        else:
            self.logger.info("%s: %s", self.phase, text)

    def done(self, text: str) -> None:
        self.update(text)
        if self.terminal and self.width:
            self.stream.write("\n")
            self.stream.flush()
