"""The README is the front door: every command it shows exists, with every flag it uses.

Commands are read from the README's bash blocks and its option tables, and checked against
the real argument parsers (``--help`` of each console script and script).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator import server as orchestrator_server
from specdec_grpc import worker
from specdec_tools import bench, cluster, convert, train_demo

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _help(main: Callable[[list[str]], object], argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


HELP: dict[str, Callable[[], str]] = {
    "specdec generate": lambda: _help(cli.main, ["generate", "--help"]),
    "specdec status": lambda: _help(cli.main, ["status", "--help"]),
    "specdec-orchestrator": lambda: orchestrator_server.build_parser().format_help(),
    "specdec-draft": lambda: worker.build_parser("draft").format_help(),
    "specdec-target": lambda: worker.build_parser("target").format_help(),
    "specdec-convert": lambda: convert.build_parser().format_help(),
    "specdec-bench": lambda: bench.build_parser().format_help(),
    "specdec-train-demo": lambda: train_demo.build_parser().format_help(),
    "scripts/up": lambda: _help(cluster.up_main, ["--help"]),
    "scripts/down": lambda: _help(cluster.down_main, ["--help"]),
    "scripts/status": lambda: _help(cluster.status_main, ["--help"]),
}


def _bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        for part in re.split(r"&&|\|\|", line):
            part = part.strip()
            if part:
                commands.append(part)
    return commands


def _command_key(words: list[str]) -> str | None:
    name = words[0].removeprefix(".venv/bin/")
    if name == "specdec" and len(words) > 1:
        return f"specdec {words[1]}"
    return name if name in HELP else None


def test_readme_commands_exist_with_their_flags() -> None:
    checked = 0
    for command in _bash_commands():
        words = shlex.split(command)
        key = _command_key(words)
        if key is None:
            continue
        assert key in HELP, f"README runs {key!r}, which is not a command we ship"
        help_text = HELP[key]()
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in help_text, f"README uses {flag} with {key}, which does not accept it"
        checked += 1
    assert checked >= 10


def test_readme_scripts_exist_and_are_executable() -> None:
    for script in set(re.findall(r"\bscripts/[a-z_]+(?:\.py)?", README)):
        path = REPO / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"{script} is missing or not executable"


def test_client_option_table_matches_the_cli() -> None:
    section = README.split("## The client", 1)[1].split("\n## ", 1)[0]
    help_text = HELP["specdec generate"]()
    flags = set(re.findall(r"`(--[a-z-]+)", section))
    assert len(flags) >= 12
    for flag in flags:
        assert flag in help_text, f"the client table lists {flag}, which specdec generate lacks"


def test_limits_table_flags_exist() -> None:
    section = README.split("## Limits and flags", 1)[1].split("\n## ", 1)[0]
    helps = {"orchestrator": HELP["specdec-orchestrator"](), "draft, target": HELP["specdec-draft"](),
             "all": HELP["specdec-orchestrator"]() + HELP["specdec-target"]()}
    rows = 0
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 2 or cells[0] not in helps:
            continue
        for flag in re.findall(r"`(--[a-z-]+)`", cells[1]):
            assert flag in helps[cells[0]], f"{flag} ({cells[0]}) is in the README but not a flag"
        rows += 1
    assert rows >= 8


def test_rpc_table_matches_the_protos() -> None:
    from specdec_pb import specdec_pb2

    section = README.split("## The protocol", 1)[1].split("Errors (", 1)[0]
    listed = set(re.findall(r"^\| [A-Za-z, ]+ \| `([A-Za-z]+)` \|", section, flags=re.M))
    declared = {m.name for s in specdec_pb2.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert listed == declared
