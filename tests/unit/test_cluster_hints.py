"""``scripts/up`` before it starts anything and after: a missing model directory or a busy port is
one line up front; the commands it prints run as printed from the repository root; a failed
start shows whole lines of the service's log."""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from pathlib import Path

import pytest

from specdec_core.model_names import looks_local, missing_model
from specdec_grpc.ports import port_problem
from specdec_tools import cluster, service_process

REPO = Path(__file__).resolve().parents[2]


def up_args(*argv: str) -> argparse.Namespace:
    """The namespace ``scripts/up ARGV`` parses to."""
    return cluster.build_up_parser().parse_args(list(argv))


def test_the_printed_commands_run_from_the_repository_root(tmp_path: Path) -> None:
    demo = cluster.next_commands(up_args(), "127.0.0.1:50051")
    assert demo[0].endswith("generate 'spell 704316' --address 127.0.0.1:50051")
    assert demo[2] == "scripts/down"  # the default run directory
    own = cluster.next_commands(up_args("--draft-model", str(tmp_path), "--target-model", str(tmp_path),
                                        "--run-dir", str(tmp_path / "run")), "127.0.0.1:50052")
    assert "spell" not in own[0] and "translate English to German" in own[0]
    assert own[2] == f"scripts/down --run-dir {tmp_path / 'run'}"
    for command in demo + own:
        program = shlex.split(command)[0]
        assert (REPO / program).is_file(), f"{command!r}: {program} is not there from the repository root"
    # Not a bare `specdec` (not on the PATH unless the venv is activated): the one beside this Python.
    assert REPO / shlex.split(demo[0])[0] == Path(sys.executable).with_name("specdec")


def test_a_run_dir_inside_the_repository_is_printed_relative(tmp_path: Path) -> None:
    commands = cluster.next_commands(up_args("--run-dir", str(REPO / "runs" / "mine")), "127.0.0.1:1")
    assert commands[2] == "scripts/down --run-dir runs/mine"


@pytest.mark.parametrize("name, local", [
    ("models/t5-small", True),  # models/ exists here: a path, not the hub's "models" owner
    ("./t5-small", True), ("/no/such/dir", True), ("~/t5", True), ("a/b/c", True),
    ("google/flan-t5-small", False), ("t5-small", False),
])
def test_what_reads_as_a_local_path(name: str, local: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert looks_local(name) == local


def test_a_missing_model_directory_is_one_line_before_anything_starts(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)  # scripts/up runs from anywhere; its users type paths from here
    args = up_args("--draft-model", "models/t5-small", "--port", "0")
    assert cluster.problems_before_start(args) == [
        "--draft-model: checkpoint directory models/t5-small does not exist"]
    assert missing_model("google/flan-t5-small") is None  # a hub name: left to the download
    (tmp_path / "file").write_text("")
    assert "is a file" in (missing_model(tmp_path / "file") or "")


def test_a_busy_port_is_found_before_anything_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert port_problem("127.0.0.1", port) == "port in use"
        (problem,) = cluster.problems_before_start(up_args("--port", str(port)))
        assert problem.startswith(f"--port {port}: cannot bind 127.0.0.1:{port}: port in use")
    assert port_problem("127.0.0.1", port) is None
    assert port_problem("127.0.0.1", 0) is None


def test_a_failed_start_shows_whole_lines_of_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"line {i} " + "x" * 57 for i in range(200)]  # far more than the excerpt holds, cut mid-line
    script = "import sys; print(sys.argv[1]); raise SystemExit(3)"
    monkeypatch.setattr(service_process, "command", lambda role: [sys.executable, "-c", script])
    process = service_process.ServiceProcess("draft", ["\n".join(lines)], tmp_path / "draft.log")
    with pytest.raises(RuntimeError) as failed:
        process.wait_port(30)
    excerpt = str(failed.value).split("ends:\n", 1)[1]
    assert excerpt.splitlines()[0] in lines and excerpt.splitlines()[-1] == lines[-1]


def test_a_relative_model_path_reaches_the_services_as_typed_from_where_it_was_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The services run in the repository root; a path typed elsewhere must still name the same
    directory there. A hub name passes through."""
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cluster._as_given("mine") == str(tmp_path / "mine")
    assert cluster._as_given("google/flan-t5-small") == "google/flan-t5-small"
