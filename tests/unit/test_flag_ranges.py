"""Every numeric flag of every service declares the values it accepts where it is declared (issue
31.3: ``limits.Range``, on each ``limit`` and on the other flags through ``limits.Checked``), and
a value outside is refused at start-up: one line naming the flag and the range, exit status 2, no
traceback. Parse only, no servers: the orchestrator's parser here; the workers' (which import MLX
with their module) in one short interpreter."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.generation import OrchestratorLimits
from orchestrator.server import build_parser as orchestrator_parser
from specdec_core.host_limits import HostLimits
from specdec_core.limits import Checked, Range, declared_ranges

REPO = Path(__file__).resolve().parents[2]


# -- values in and out of a range -------------------------------------------------------------------


def _text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def outside(checked: Checked[Any]) -> list[str]:
    """Values ``checked`` must refuse: just past each bound, and (numbers) non-finite or not numbers."""
    valid, numeric = checked.valid, checked.parse in (int, float)
    whole = checked.parse is not float  # ints, and sizes in bytes
    values = []
    if valid.low is not None:
        if valid.low_open:
            values.append(_text(valid.low))
        below = valid.low - 1 if whole else valid.low - (abs(valid.low) / 2 or 1)
        values.append(_text(-1 if valid.zero and below == 0 else below))
        if valid.zero and not whole and valid.low > 0:
            values.append(_text(valid.low / 2))  # between 0 (off) and the range
    if valid.high is not None:
        values.append(_text(valid.high + 1))
    if checked.parse is float:
        values += ["nan", "inf", "-inf"]
    if checked.parse is int:
        values.append("1.5")
    if numeric:
        values.append("many")
    return [v for v in values if not (whole and v.startswith("-") and not numeric)]  # sizes have no sign


def inside(checked: Checked[Any], default: Any) -> list[str]:
    """Values ``checked`` must take: each bound it includes, 0 where it means something, the default."""
    valid = checked.valid
    values = [_text(valid.low)] if valid.low is not None and not valid.low_open else []
    values += [_text(valid.high)] if valid.high is not None else []
    values += ["0"] if valid.zero else []
    values += [_text(default)] if isinstance(default, int | float) and not isinstance(default, bool) else []
    return values


def ranged_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[Checked[Any], Any]]:
    """Each flag whose type declares a range: its check and default."""
    return {action.option_strings[0]: (action.type, action.default)
            for action in parser._actions if isinstance(action.type, Checked)}


def unranged_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Flags that take a number with no declared range (a fixed set of choices is a range)."""
    return [action.option_strings[0] for action in parser._actions
            if action.type in (int, float) and not action.choices]


@dataclass
class Outcome:
    code: int | None  # exit status; None: parsed
    stderr: str


def parse(parse_args: Any, argv: list[str]) -> Outcome:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parse_args(argv)
        except SystemExit as exit_:
            return Outcome(exit_.code if isinstance(exit_.code, int) else 1, err.getvalue())
    return Outcome(None, err.getvalue())


def assert_refused(outcome: Outcome, prog: str, flag: str, valid: str, value: str) -> None:
    """Exit status 2 and one line naming the flag and the range (``valid``, as the range says it)."""
    lines = outcome.stderr.strip().splitlines()
    assert outcome.code == 2, (flag, value, outcome)
    assert len(lines) == 1 and "Traceback" not in outcome.stderr, outcome.stderr
    assert lines[0].startswith(f"{prog}: error: {flag}: must be ") and valid in lines[0], lines[0]


# -- the orchestrator -----------------------------------------------------------------------------------

ORCHESTRATOR = ranged_flags(orchestrator_parser())


def test_every_limit_declares_its_range() -> None:
    for limits in (HostLimits, OrchestratorLimits):
        ranges = declared_ranges(limits)
        assert ranges and all(isinstance(r, Range) for r in ranges.values()), ranges
        for declared in limits.__dataclass_fields__.values():
            if "flag" in declared.metadata:
                assert declared.default in declared.metadata["valid"], declared.name


def test_every_numeric_orchestrator_flag_declares_its_range() -> None:
    assert unranged_flags(orchestrator_parser()) == []
    assert set(declared_ranges(OrchestratorLimits)) <= set(ORCHESTRATOR)
    assert {"--health-interval", "--connect-timeout", "--max-message-mb", "--grace", "--port",
            "--metrics-port"} <= set(ORCHESTRATOR)


@pytest.mark.parametrize("flag", sorted(ORCHESTRATOR))
def test_an_orchestrator_flag_out_of_range_is_refused_in_one_line(flag: str) -> None:
    checked, default = ORCHESTRATOR[flag]
    for value in outside(checked):
        assert_refused(parse(orchestrator_parser().parse_args, [f"{flag}={value}"]), "specdec-orchestrator", flag,
                       str(checked.valid), value)
    for value in inside(checked, default):
        assert parse(orchestrator_parser().parse_args, [f"{flag}={value}"]).code is None, (flag, value)


def test_the_issues_bad_orchestrator_values_are_refused() -> None:
    """As reported: --health-interval 0 busy-looped the health checks and nan stopped them;
    --max-message-mb -1 and --default-num-draft 0 started and then failed every request."""
    for argv, line in [(["--health-interval", "0"], "--health-interval: must be >= 0.1 (got 0)"),
                       (["--health-interval", "nan"], "--health-interval: must be a finite number >= 0.1 (got nan)"),
                       (["--max-message-mb", "-1"], "--max-message-mb: must be in [1, 2047] (got -1)"),
                       (["--default-num-draft", "0"], "--default-num-draft: must be in [1, 256] (got 0)")]:
        outcome = parse(orchestrator_parser().parse_args, argv)
        assert (outcome.code, outcome.stderr) == (2, f"specdec-orchestrator: error: {line}\n")


# -- the workers (their module imports MLX: parsed in a short interpreter of their own) -------------------

# Flags only a draft or only a target has; the rest (every HostLimits limit, the server's) both.
DRAFT_ONLY = ("--ngram-min", "--ngram-max", "--hybrid-min-match")
TARGET_ONLY = ("--tensor-parallel",)
SERVER_FLAGS = ("--port", "--metrics-port", "--max-message-mb", "--grace")
WORKER_FLAGS = sorted({*declared_ranges(HostLimits), *SERVER_FLAGS, *DRAFT_ONLY, *TARGET_ONLY})
CROSS_CHECKS = [  # flags in range one by one, not together
    (["--method", "ngram", "--ngram-min", "5", "--ngram-max", "4"],
     "specdec-draft: error: --ngram-min 5 is above --ngram-max 4"),
    (["--method", "hybrid", "--hybrid-min-match", "6", "--ngram-max", "5"],
     "specdec-draft: error: --hybrid-min-match 6 is above --ngram-max 5"),
]


def worker_outcomes() -> dict[str, Any]:
    """In the worker's interpreter: every ranged flag of each role's parser tried with the values
    in and out of its range, the cross-flag cases, and the flags with no range."""
    from specdec_grpc.worker import build_parser, parse_worker_args

    found: dict[str, Any] = {"flags": {}, "unranged": [], "cross": []}
    for role in ("draft", "target"):
        found["unranged"] += unranged_flags(build_parser(role))
        for flag, (checked, default) in ranged_flags(build_parser(role)).items():
            entry = found["flags"].setdefault(flag, {"roles": [], "valid": str(checked.valid), "out": [], "in": []})
            entry["roles"].append(role)
            args = lambda argv, role=role: parse_worker_args(role, argv)  # noqa: E731
            entry["out"] += [[role, v, vars(parse(args, [f"{flag}={v}"]))] for v in outside(checked)]
            entry["in"] += [[role, v, vars(parse(args, [f"{flag}={v}"]))] for v in inside(checked, default)]
    found["cross"] = [vars(parse(lambda argv: parse_worker_args("draft", argv), argv)) for argv, _ in CROSS_CHECKS]
    return found


@pytest.fixture(scope="module")
def workers() -> dict[str, Any]:
    script = ("import json, sys; sys.path.insert(0, 'tests/unit'); import test_flag_ranges as t; "
              "print(json.dumps(t.worker_outcomes()))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_numeric_worker_flag_declares_its_range(workers: dict[str, Any]) -> None:
    assert workers["unranged"] == []
    assert sorted(workers["flags"]) == WORKER_FLAGS


@pytest.mark.parametrize("flag", WORKER_FLAGS)
def test_a_worker_flag_out_of_range_is_refused_in_one_line(workers: dict[str, Any], flag: str) -> None:
    entry = workers["flags"][flag]
    roles = ["draft"] if flag in DRAFT_ONLY else ["target"] if flag in TARGET_ONLY else ["draft", "target"]
    assert entry["roles"] == roles
    assert entry["out"], flag
    for role, value, outcome in entry["out"]:
        assert_refused(Outcome(**outcome), f"specdec-{role}", flag, entry["valid"], value)
    for role, value, outcome in entry["in"]:
        assert outcome["code"] is None, (role, flag, value, outcome)


def test_worker_flags_that_contradict_each_other_are_refused_in_one_line(workers: dict[str, Any]) -> None:
    """Three n-gram settings each in range but not together: refused before any model is loaded
    (they used to stop the draft with a traceback)."""
    for (_, line), outcome in zip(CROSS_CHECKS, workers["cross"], strict=True):
        assert outcome["code"] == 2 and outcome["stderr"].startswith(line), outcome
        assert len(outcome["stderr"].strip().splitlines()) == 1
