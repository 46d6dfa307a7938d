"""Start a specdec service as a process and learn the port it serves on.

Every service (``specdec-draft``, ``specdec-target``, ``specdec-orchestrator``) prints
``specdec-<role> listening on HOST:PORT`` once it serves (``specdec_grpc.server.announce``);
with ``--port 0`` that line is the only way to learn which port it got. With ``--metrics-port``
a line ``specdec-<role> metrics on HOST:PORT`` comes before it (``metrics_port``). The process writes
to a log file rather than a pipe: a pipe nobody drains fills up and stalls the service, and a
file can still be shown when a start fails.

``scripts/up`` (``specdec_tools.cluster``), ``specdec-bench`` and the tests' ``procs`` all start
their services through ``ServiceProcess``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

MODULES = {"draft": "draft_service.server", "target": "target_service.server",
           "orchestrator": "orchestrator.server"}
LOG_TAIL_CHARS = 3000  # of the log shown when a start fails


def command(role: str) -> list[str]:
    """``specdec-<role>`` next to this Python (works without an activated venv), else ``python -m``
    its module (a checkout that was never installed)."""
    script = Path(sys.executable).with_name(f"specdec-{role}")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", MODULES[role]]


class ServiceProcess:
    """``specdec-<role> ARGS`` running with its output in ``log``; ``wait_port`` reads its announce line.

    ``new_session`` puts it in a session of its own, so it outlives the caller's terminal and
    Ctrl-C (``scripts/up`` starts services that way). As a context manager it is stopped on exit.
    """

    def __init__(self, role: str, args: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, new_session: bool = False):
        self.role = role
        self.argv = [*command(role), *args]
        self.log = log
        self.host: str | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None  # the Prometheus port, if it announced one
        self._listening = re.compile(rf"specdec-{re.escape(role)} listening on (\S+):(\d+)")
        self._metrics = re.compile(rf"specdec-{re.escape(role)} metrics on (\S+):(\d+)")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}, cwd=cwd,
                start_new_session=new_session,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        """``HOST:PORT`` as the service announced it."""
        assert self.port is not None, f"specdec-{self.role} has not announced its port"
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str | None:
        """``HOST:PORT`` of its Prometheus metrics, as announced (None: metrics off)."""
        return f"{self.host}:{self.metrics_port}" if self.metrics_port is not None else None

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_port(self, timeout: float) -> int:
        """Wait for the announce line; return the port (and note the metrics port announced
        before it). If the process exits first or ``timeout`` passes, kill it and raise
        ``RuntimeError`` with the end of its log."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process.poll() is not None  # before reading: a last line written on exit counts
            text = self.log.read_text(errors="replace")
            match = self._listening.search(text)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                metrics = self._metrics.search(text)
                self.metrics_port = int(metrics.group(2)) if metrics else None
                return self.port
            if exited or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        code = self.process.poll()
        self.kill()
        why = f"exited with code {code}" if code is not None else f"did not announce a port within {timeout:g} s"
        text = self.log.read_text(errors="replace")
        tail = text[-LOG_TAIL_CHARS:]
        if len(text) > LOG_TAIL_CHARS and "\n" in tail:
            tail = tail.split("\n", 1)[1]  # whole lines: an excerpt that starts mid-word reads as garbage
        raise RuntimeError(f"specdec-{self.role} {why}: {shlex.join(self.argv)}\n"
                           f"its log ({self.log}) ends:\n{tail}")

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM (the service drains), SIGKILL after ``grace`` seconds; reap; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL (no drain, as when a machine dies) and reap; the exit code. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        return self.process.wait(10)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
