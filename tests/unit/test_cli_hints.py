"""``specdec``'s words to a newcomer: flag errors that name the subcommand and the way out, a stats
line that says what is true, and one line when nothing answers."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest

from orchestrator import cli
from specdec_pb import specdec_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_max_tokens_zero_is_an_error_like_minus_one_and_leaving_it_out_is_the_servers_default(
        capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0", "-1"):
        err = _usage_error(["generate", "x", "--max-tokens", value], capsys)
        assert "--max-tokens must be >= 1 (leave it out for the server's default, 64)" in err
    assert cli.build_parser().parse_args(["generate", "x"]).max_tokens is None
    assert cli.build_parser().parse_args(["generate", "x", "--max-tokens", "7"]).max_tokens == 7


def test_num_draft_zero_points_to_no_speculation(capsys: pytest.CaptureFixture[str]) -> None:
    assert "use --no-speculation" in _usage_error(["generate", "x", "--num-draft", "0"], capsys)


def test_a_typo_in_a_flag_prints_the_subcommands_usage_and_the_nearest_flag(capsys: pytest.CaptureFixture[str]
                                                                            ) -> None:
    err = _usage_error(["generate", "x", "--max-tokns", "3"], capsys)
    assert err.startswith("usage: specdec generate ")
    assert "error: unrecognized arguments: --max-tokns 3 (did you mean --max-tokens?)" in err
    err = _usage_error(["status", "--jsn"], capsys)
    assert err.startswith("usage: specdec status ") and "(did you mean --json?)" in err


def _stats(**fields: object) -> pb.GenerateStats:
    base = dict(tokens=8, total_ms=40.0, time_to_first_token_ms=20.0, target_passes=2, steps=2,
                verify_ms=18.0, target_model_ms=16.0, orchestration_ms=16.0, final_num_draft=5)
    return pb.GenerateStats(**{**base, **fields})  # type: ignore[arg-type]


def test_the_stats_line_counts_in_the_singular_for_one() -> None:
    one = _stats(tokens=1, target_passes=1, proposed=3, accepted=0, draft_passes=1)
    line = cli.format_stats(one, "length")
    assert line.startswith("[1 token, length,") and "1 target pass," in line and "1 draft pass," in line
    line = cli.format_stats(_stats(proposed=6, accepted=5, draft_passes=6), "eos")
    assert line.startswith("[8 tokens, eos,") and "2 target passes" in line and "6 draft passes" in line


def test_the_stats_line_of_the_target_alone_claims_no_drafts_and_no_k() -> None:
    line = cli.format_stats(_stats(target_passes=8, steps=8), "eos")
    assert "no drafts: the target alone" in line
    assert "accepted" not in line and "k=" not in line and "draft " not in line


def test_the_stats_line_shows_blocks_drafted_ahead_beside_the_draft_time() -> None:
    """With pipelining the draft's passes run while the target verifies: draft 0 ms beside 8 draft
    passes is true only with the blocks drafted ahead shown."""
    line = cli.format_stats(_stats(proposed=7, accepted=7, draft_passes=8, draft_ms=0.2, predrafts=2,
                                   predraft_hits=2), "eos")
    assert "draft 0 ms (model 0), 2 blocks drafted ahead during verify (2 used)" in line


def test_nothing_listening_says_where_and_how_to_start_it() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary("/specdec.v1.Orchestrator/Status")(b"", timeout=10)
    line = cli.describe_error(failed.value, address)
    assert line == (f"specdec: nothing answers at {address}; start the services with scripts/up (from the "
                    "repository root), or pass --address HOST:PORT of a running orchestrator")
    assert (REPO / "scripts" / "up").is_file()  # the hint names a command that is there
