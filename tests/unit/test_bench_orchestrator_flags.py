"""``specdec-bench --concurrency ... --orchestrator-flags``: the flags reach the orchestrator's command
line, after the bench's own (so they win), and the workers' stay theirs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from specdec_tools.bench.cli import build_parser
from specdec_tools.bench.services import Services
from specdec_tools.bench.serving import ServingServices, serving_settings


def test_orchestrator_flags_reach_only_the_orchestrator(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["--concurrency", "1", "--worker-flags", "--watchdog-s 900",
                                      "--orchestrator-flags", "--call-timeout 600"])
    serving = serving_settings(args)
    started: list[tuple[str, list[str]]] = []

    def record(self: Any, role: str, argv: list[str], log_name: str = "") -> None:
        started.append((role, argv))

    monkeypatch.setattr(Services, "__init__", lambda self, *a, **k: None)  # no processes
    monkeypatch.setattr(Services, "_start", record)
    workload = SimpleNamespace(name="w", draft=None, target=None)
    services = ServingServices(workload, None, {}, 1, serving.worker_flags,  # type: ignore[arg-type]
                               orchestrator_flags=serving.orchestrator_flags)
    services._start("orchestrator", ["--target", "t:1"])
    services._start("target", ["--model", "m"])
    assert started == [("orchestrator", ["--target", "t:1", "--max-generations", "64", "--call-timeout", "600"]),
                       ("target", ["--model", "m", "--max-sessions", "64", "--watchdog-s", "900"])]
