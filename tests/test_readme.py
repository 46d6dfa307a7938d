"""The README and the docs/ pages: every command they show exists, with every flag it uses,
and every link they make lands.

Commands are read from the pages' bash blocks and option tables, and checked against the real
argument parsers (``--help`` of each console script and script); links against the files and
headings they point to.
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
PAGES = {path.relative_to(REPO).as_posix(): path.read_text()
         for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]}
README = PAGES["README.md"]
README_MAX_LINES = 250  # the front door stays readable in five minutes; the rest lives in docs/


def _section(page: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of its level."""
    text = PAGES[page]
    level = heading.split(" ", 1)[0]
    assert f"\n{heading}\n" in f"\n{text}", f"{page} has no heading {heading!r}"
    body = f"\n{text}".split(f"\n{heading}\n", 1)[1]
    return re.split(rf"\n{level} ", body, maxsplit=1)[0]


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
    blocks = [block for text in PAGES.values() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
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


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= README_MAX_LINES


def test_commands_exist_with_their_flags() -> None:
    checked = 0
    for command in _bash_commands():
        words = shlex.split(command)
        key = _command_key(words)
        if key is None:
            continue
        assert key in HELP, f"the docs run {key!r}, which is not a command we ship"
        help_text = HELP[key]()
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in help_text, f"the docs use {flag} with {key}, which does not accept it"
        checked += 1
    assert checked >= 20


def test_scripts_exist_and_are_executable() -> None:
    for script in {s for text in PAGES.values() for s in re.findall(r"\bscripts/[a-z_]+(?:\.py)?", text)}:
        path = REPO / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"{script} is missing or not executable"


def test_client_option_table_matches_the_cli() -> None:
    section = _section("docs/client.md", "## Options of `specdec generate`")
    help_text = HELP["specdec generate"]()
    flags = set(re.findall(r"`(--[a-z-]+)", section))
    assert len(flags) >= 12
    for flag in flags:
        assert flag in help_text, f"the client table lists {flag}, which specdec generate lacks"


def test_drafting_flags_table_matches_specdec_draft() -> None:
    section = _section("docs/drafting.md", "# Drafting without a model")
    help_text = HELP["specdec-draft"]()
    flags = set(re.findall(r"^\| `(--[a-z-]+)", section, flags=re.M)) | set(re.findall(r", `(--[a-z-]+)", section))
    assert len(flags) >= 4
    for flag in flags:
        assert flag in help_text, f"the drafting table lists {flag}, which specdec-draft lacks"


def test_limits_table_flags_exist() -> None:
    section = _section("docs/configuration.md", "## Limits and flags")
    helps = {"orchestrator": HELP["specdec-orchestrator"](), "draft, target": HELP["specdec-draft"](),
             "all": HELP["specdec-orchestrator"]() + HELP["specdec-target"]()}
    rows = 0
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 2 or cells[0] not in helps:
            continue
        for flag in re.findall(r"`(--[a-z-]+)`", cells[1]):
            assert flag in helps[cells[0]], f"{flag} ({cells[0]}) is in the limits table but not a flag"
        rows += 1
    assert rows >= 8


@pytest.mark.parametrize("where, declaration", [("draft, target", "specdec_core.host_limits:HostLimits"),
                                                ("orchestrator", "orchestrator.generation:OrchestratorLimits")])
def test_limits_table_lists_every_declared_limit_with_its_default(where: str, declaration: str) -> None:
    """Limits are declared once (``limits.limit``: flag, default, help); the table must name each
    one on its service's rows, with that default."""
    import importlib

    from specdec_core.limits import declared_flags

    module, name = declaration.split(":")
    declared = declared_flags(getattr(importlib.import_module(module), name))
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in _section("docs/configuration.md", "## Limits and flags").splitlines()]
    rows = [row for row in rows if len(row) >= 3 and row[0] == where]
    assert len(declared) >= 7
    for flag, default in declared.items():
        (row,) = [row for row in rows if f"`{flag}`" in row[1]]
        defaults = [value.strip() for value in re.split(r"[/,]", row[2])]
        position = [f for f in re.findall(r"`(--[a-z-]+)`", row[1]) if f in declared].index(flag)
        assert float(defaults[position]) == default, (flag, row[2])


def test_limits_table_shows_every_flags_range() -> None:
    """The ``accepts`` cell names each ranged flag's range as the flag declares it (the range its
    start-up refusal names), in the order the row lists its flags; every declared limit has one."""
    from specdec_core.limits import Checked

    def ranges(*parsers: object) -> dict[str, str]:
        return {a.option_strings[0]: str(a.type.valid) for parser in parsers for a in parser._actions  # type: ignore[attr-defined]
                if isinstance(a.type, Checked)}

    orchestrator, draft, target = (orchestrator_server.build_parser(), worker.build_parser("draft"),
                                   worker.build_parser("target"))
    ranged = {"orchestrator": ranges(orchestrator), "draft, target": ranges(draft, target),
              "draft": ranges(draft), "all": ranges(orchestrator, draft, target)}
    shown = set()
    for line in _section("docs/configuration.md", "## Limits and flags").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 5 or cells[0] not in ranged:
            continue
        accepts = [part.strip() for part in cells[3].split(";")]
        flags = re.findall(r"`(--[a-z-]+)`", _outside_parentheses(cells[1]))  # not those in its notes
        assert len(accepts) == len(flags), (flags, cells[3])
        for flag, cell in zip(flags, accepts, strict=True):
            if flag in ranged[cells[0]]:
                assert cell.startswith(ranged[cells[0]][flag]), (flag, cell, ranged[cells[0]][flag])
                shown.add(flag)
    assert set(ranged["orchestrator"]) - {"--port"} <= shown
    assert set(ranged["draft, target"]) - {"--port", "--tensor-parallel"} <= shown


def _outside_parentheses(text: str) -> str:
    kept, depth = [], 0
    for char in text:
        depth += char == "("
        if depth == 0:
            kept.append(char)
        depth -= char == ")" and depth > 0
    return "".join(kept)


def test_rpc_table_matches_the_protos() -> None:
    from specdec_pb import specdec_pb2

    section = _section("docs/protocol.md", "## Services and RPCs")
    listed = set(re.findall(r"^\| [A-Za-z, ]+ \| `([A-Za-z]+)` \|", section, flags=re.M))
    declared = {m.name for s in specdec_pb2.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert listed == declared


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links or headings


def test_links_land_on_files_and_headings() -> None:
    checked = 0
    for page, text in PAGES.items():
        here = (REPO / page).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s) and other schemes: not checked offline
            path, _, anchor = target.partition("#")
            file = (here / path).resolve() if path else REPO / page
            assert file.exists(), f"{page} links to {target}, which does not exist"
            if anchor:
                assert file.suffix == ".md", f"{page} links to an anchor in {target}"
                headings = re.findall(r"^#+ (.+)$", _prose(file.read_text()), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page} links to {target}: no such heading"
            checked += 1
    assert checked >= 40
