"""Every flag of every command is documented, and its default is in its ``--help``.

docs/configuration.md's "Commands" table names each command and the page (linked from it) that
documents its flags; each flag must appear in configuration.md or that page. The flags are read
from the real argument parsers, so a new flag without docs, or a help that hides its default,
fails here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator import server as orchestrator_server
from specdec_grpc import worker
from specdec_tools import bench, cluster, convert, make_pair

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[name]


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "specdec generate": lambda: _subcommand(cli.build_parser(), "generate"),
    "specdec status": lambda: _subcommand(cli.build_parser(), "status"),
    "specdec-orchestrator": orchestrator_server.build_parser,
    "specdec-draft": lambda: worker.build_parser("draft"),
    "specdec-target": lambda: worker.build_parser("target"),
    "specdec-convert": convert.build_parser,
    "specdec-bench": bench.build_parser,
    "specdec-make-pair": make_pair.build_parser,
    "scripts/up": cluster.build_up_parser,
    "scripts/down": cluster.build_down_parser,
    "scripts/status": cluster.build_status_parser,
}


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _pages_of(command: str) -> list[Path]:
    """configuration.md, and the pages its Commands table links for ``command``."""
    text = CONFIGURATION.read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| `{command}` |")]
    assert len(rows) == 1, f"docs/configuration.md's Commands table has no row for {command}"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", rows[0])
    return [CONFIGURATION, *[DOCS / link for link in links]]


@pytest.mark.parametrize("command", PARSERS)
def test_every_flag_is_documented(command: str) -> None:
    pages = _pages_of(command)
    text = "\n".join(page.read_text() for page in pages)
    missing = [_name(a) for a in _flags(PARSERS[command]())
               if not re.search(re.escape(_name(a)) + r"(?![\w-])", text)]
    assert not missing, f"{command}: {missing} in none of {[p.name for p in pages]}"


def _shown(default: object) -> list[str]:
    """How a default may be written in a help text."""
    if isinstance(default, bool):
        return ["on" if default else "off"]
    if isinstance(default, int | float):
        sizes = [f"{default / unit:g}{name}" for unit, name in ((10**9, "GB"), (10**6, "MB")) if default >= unit]
        return [str(default), f"{default:g}", *sizes]
    if isinstance(default, Path | str) and Path(default).is_absolute():
        path = Path(default)
        return [str(path), *([str(path.relative_to(REPO))] if path.is_relative_to(REPO) else [])]
    if default == "":
        return ["none"]
    return [str(default)]


@pytest.mark.parametrize("command", PARSERS)
def test_every_default_is_in_the_help(command: str) -> None:
    """A flag with a default says it in --help: "default" and the value. A flag whose default
    is to leave it out (None) or off (a switch) has nothing to show."""
    hidden = []
    for action in _flags(PARSERS[command]()):
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            continue
        help_text = (action.help or "") % {"default": default} if action.help else ""
        if "default" not in help_text.lower() or not any(shown in help_text for shown in _shown(default)):
            hidden.append(f"{_name(action)} (default {default!r}): {help_text!r}")
    assert not hidden, f"{command}: " + "; ".join(hidden)
