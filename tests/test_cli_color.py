"""``specdec generate --color``: accepted draft tokens and the target's tokens in two colours on a
terminal, exact to the character; plain text off a terminal or with NO_COLOR; ``--json`` and the
client carry the per-token ``from_draft`` flags, and the flags agree with the stats.

The reference for the colours is the tokenizer's own pieces: for the test tokenizer (sentencepiece,
no byte pieces, no space clean-up) token i's text is its piece with "▁" as a space, so the text a
run of draft (or target) tokens wrote is known without the attribution code under test.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import LoopThread, speculative_cluster

from orchestrator import cli
from orchestrator.client import TextAttribution
from specdec_core.tokenizer import load_tokenizer
from specdec_tools.tiny_checkpoints import corpus_lines

REPO = Path(__file__).resolve().parent.parent
PROMPTS = corpus_lines()[7:300:37][:6]
MAX_TOKENS = 20
OPTIONS = ["--max-tokens", str(MAX_TOKENS), "--num-draft", "3"]
SGR = re.compile(r"\x1b\[(\d+)m")
COLOURS = {cli.DRAFT_COLOR: True, cli.TARGET_COLOR: False}


@pytest.fixture(scope="module")
def cluster(loop: LoopThread, near_draft_dir: Path, target_dir: Path):
    with speculative_cluster(loop, near_draft_dir, target_dir) as (client, _, _, orch):
        yield client, orch


@pytest.fixture(scope="module")
def tokenizer(target_dir: Path):
    return load_tokenizer(target_dir)


def piece_runs(tokenizer, token_ids: list[int], from_draft: list[bool]) -> list[tuple[str, bool]]:
    """The text of each run of same-source tokens, from the tokenizer's pieces (the reference)."""
    pieces = [tokenizer.convert_ids_to_tokens(t).replace("\u2581", " ") for t in token_ids]
    if pieces:
        pieces[0] = pieces[0].lstrip(" ")  # sentencepiece drops the leading space of the text
    # Precondition of this reference: the pieces joined are the decoded text.
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True)
    runs: list[tuple[str, bool]] = []
    for piece, flag in zip(pieces, from_draft, strict=True):
        if not piece:
            continue
        if runs and runs[-1][1] == flag:
            runs[-1] = (runs[-1][0] + piece, flag)
        else:
            runs.append((piece, flag))
    return runs


def parse_colours(output: str) -> tuple[list[tuple[str, bool | None]], str]:
    """The generated text as runs (text, True draft / False target / None plain), and the rest (the
    stats line). The text ends at the newline before the stats line."""
    text, _, rest = output.rpartition("\n[")
    runs: list[tuple[str, bool | None]] = []
    state: bool | None = None
    position = 0
    for match in [*SGR.finditer(text), None]:
        end = match.start() if match else len(text)
        chunk = text[position:end]
        if chunk:
            if runs and runs[-1][1] == state:
                runs[-1] = (runs[-1][0] + chunk, state)
            else:
                runs.append((chunk, state))
        if match:
            code = match.group(0)
            assert code in (cli.DRAFT_COLOR, cli.TARGET_COLOR, cli.RESET), repr(code)
            state = COLOURS.get(code)
            position = match.end()
    if runs and runs[-1][1] is None:  # the newline that ends the text
        assert runs[-1][0].strip() == ""
        runs.pop()
    return runs, "[" + rest


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[str, str]:
    """Run ``python -m orchestrator.cli ARGV`` with its stdout on a pseudo-terminal (stderr to a
    file); its stdout and stderr."""
    master, slave = pty.openpty()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *argv], stdout=slave,
                                   stderr=errors, cwd=REPO, env=env)
        os.close(slave)
        chunks = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not select.select([master], [], [], 1.0)[0]:
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            os.close(master)
            if process.poll() is None:
                process.kill()
                process.wait()
        errors.seek(0)
        stderr = errors.read().decode()
    assert code == 0, stderr
    return b"".join(chunks).decode().replace("\r\n", "\n"), stderr


def plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "SPECDEC_TOKENIZER")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def assert_flags_agree_with_stats(token_ids, from_draft, stats, finish_reason) -> None:
    """One flag per token; the flagged ones are the accepted drafts (an accepted EOS is not shown)."""
    assert len(from_draft) == len(token_ids)
    shown = sum(from_draft)
    assert shown == stats.accepted or (finish_reason == "eos" and shown == stats.accepted - 1)
    assert len(from_draft) - shown == stats.target_tokens - (
        1 if finish_reason == "eos" and shown == stats.accepted else 0)


@pytest.mark.parametrize("index", range(3))
def test_color_on_a_terminal_marks_exactly_the_draft_tokens(cluster, tokenizer, target_dir, index) -> None:
    client, orch = cluster
    prompt = PROMPTS[index]
    reference = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=3)  # greedy: the same tokens
    expected = piece_runs(tokenizer, list(reference.token_ids), list(reference.from_draft))
    output, _ = run_in_pty(["generate", prompt, *OPTIONS, "--color", "--tokenizer", str(target_dir),
                            "--address", orch.address], plain_env())
    runs, stats_line = parse_colours(output)
    assert runs == expected
    assert all(flag is not None for _, flag in runs)  # every character coloured
    assert "".join(text for text, _ in runs) == reference.text
    assert not SGR.search(stats_line) and "accepted" in stats_line


def test_both_colours_appear_when_the_draft_is_partly_rejected(cluster, tokenizer, target_dir) -> None:
    """The near draft disagrees with the target now and then: across prompts both colours show."""
    client, orch = cluster
    seen: set[bool] = set()
    for prompt in PROMPTS:
        reply = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=3)
        seen.update(flag for _, flag in piece_runs(tokenizer, list(reply.token_ids), list(reply.from_draft)))
        if seen == {True, False}:
            break
    assert seen == {True, False}
    output, _ = run_in_pty(["generate", prompt, *OPTIONS, "--color", "--tokenizer", str(target_dir),
                            "--address", orch.address], plain_env())
    assert cli.DRAFT_COLOR in output and cli.TARGET_COLOR in output


def test_no_color_environment_turns_colour_off_on_a_terminal(cluster, target_dir) -> None:
    client, orch = cluster
    env = {**plain_env(), "NO_COLOR": "1"}
    output, _ = run_in_pty(["generate", PROMPTS[0], *OPTIONS, "--color", "--tokenizer", str(target_dir),
                            "--address", orch.address], env)
    assert "\x1b" not in output
    assert output.startswith(client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, num_draft=3).text + "\n")


def test_color_off_a_terminal_is_plain_text(cluster, target_dir, capsys, monkeypatch) -> None:
    client, orch = cluster
    monkeypatch.delenv("NO_COLOR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", PROMPTS[1], *OPTIONS, "--color", "--tokenizer", str(target_dir),
                  "--address", orch.address])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert out.startswith(client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, num_draft=3).text + "\n")


@pytest.mark.parametrize("index", range(2))
def test_color_without_a_tokenizer_uses_the_orchestrators_spans(cluster, tokenizer, index) -> None:
    """No --tokenizer: the orchestrator splits the text by who wrote it, and the colours are the
    same as the tokenizer's pieces give."""
    client, orch = cluster
    prompt = PROMPTS[index]
    reference = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=3)
    expected = piece_runs(tokenizer, list(reference.token_ids), list(reference.from_draft))
    output, errors = run_in_pty(["generate", prompt, *OPTIONS, "--color", "--address", orch.address],
                                plain_env())
    runs, _ = parse_colours(output)
    assert runs == expected and all(flag is not None for _, flag in runs)
    assert errors == ""


def merged(spans) -> list[tuple[str, bool]]:
    runs: list[tuple[str, bool]] = []
    for span in spans:
        if runs and runs[-1][1] == span.from_draft:
            runs[-1] = (runs[-1][0] + span.text, span.from_draft)
        elif span.text:
            runs.append((span.text, span.from_draft))
    return runs


def test_text_spans_join_to_the_text_and_agree_with_the_tokenizers_attribution(cluster, tokenizer) -> None:
    """Asked for (text_spans), every message's spans join to its text, and the runs they make are
    the client-side TextAttribution's over the same stream (and the tokenizer's pieces); the unary
    reply carries the same runs. Not asked, no spans."""
    client, _ = cluster
    for prompt in PROMPTS[:4]:
        chunks = list(client.stream(prompt, max_tokens=MAX_TOKENS, num_draft=3, text_spans=True))
        attribution = TextAttribution(tokenizer)
        client_side: list[tuple[str, bool | None]] = []
        for chunk in chunks:
            assert "".join(span.text for span in chunk.spans) == chunk.text
            client_side += attribution.push(chunk.token_ids, chunk.from_draft, chunk.text)
        token_ids = [t for chunk in chunks for t in chunk.token_ids]
        from_draft = [f for chunk in chunks for f in chunk.from_draft]
        server_side = merged([span for chunk in chunks for span in chunk.spans])
        assert server_side == merged(_Span(text, flag) for text, flag in client_side)
        assert server_side == piece_runs(tokenizer, token_ids, from_draft)
        reply = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=3, text_spans=True)
        assert merged(reply.spans) == server_side and "".join(s.text for s in reply.spans) == reply.text
    plain = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, num_draft=3)
    assert not plain.spans and all(not chunk.spans for chunk in client.stream(PROMPTS[0], max_tokens=4))


class _Span:
    def __init__(self, text: str, from_draft: bool | None):
        assert from_draft is not None
        self.text, self.from_draft = text, from_draft

def test_stream_and_json_carry_flags_that_agree_with_the_stats(cluster, capsys) -> None:
    client, orch = cluster
    for prompt in PROMPTS[:3]:
        chunks = list(client.stream(prompt, max_tokens=MAX_TOKENS, num_draft=3))
        last = chunks[-1]
        token_ids = [t for c in chunks for t in c.token_ids]
        from_draft = [f for c in chunks for f in c.from_draft]
        assert all(len(c.from_draft) == len(c.token_ids) for c in chunks)
        assert_flags_agree_with_stats(token_ids, from_draft, last.stats, last.finish_reason)
        whole = client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=3)
        assert list(whole.from_draft) == from_draft and list(whole.token_ids) == token_ids
        assert_flags_agree_with_stats(whole.token_ids, whole.from_draft, whole.stats, whole.finish_reason)
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPTS[0], *OPTIONS, "--json", "--address", orch.address])
    result = json.loads(capsys.readouterr().out)
    whole = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, num_draft=3)
    assert result["from_draft"] == list(whole.from_draft)
    assert result["stats"]["accepted_per_position"] == list(whole.stats.accepted_per_position)


def test_stats_line_shows_positions_first_token_and_model_time(cluster, capsys) -> None:
    client, orch = cluster
    with pytest.raises(SystemExit):
        cli.main(["generate", PROMPTS[2], *OPTIONS, "--address", orch.address])
    line = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[-1]
    match = re.search(r"accepted (\d+)/(\d+) drafts \(\d+%\), by position ((?:\d+/\d+ ?)+)", line)
    assert match, line
    pairs = [tuple(map(int, p.split("/"))) for p in match.group(3).split()]
    # Per position: accepted <= proposed, and the positions add up to the totals.
    assert all(a <= p for a, p in pairs)
    assert sum(a for a, _ in pairs) == int(match.group(1)) and sum(p for _, p in pairs) == int(match.group(2))
    assert len(pairs) <= 3  # k = 3
    assert re.search(r"first token \d+ ms", line)
    draft = re.search(r"draft (\d+) ms \(model (\d+)\)", line)
    verify = re.search(r"verify (\d+) ms \(model (\d+)\)", line)
    assert draft and verify, line
    assert int(verify.group(2)) <= int(verify.group(1)) + 1 and int(draft.group(2)) <= int(draft.group(1)) + 1


# -- TextAttribution alone, against tokenizers whose text a later token changes ----------------------


class CleanupTokenizer:
    """A decoder like transformers' clean-up of spaces: " ." after a word loses its space."""

    pieces = {1: "a", 2: " b", 3: " .", 4: "c"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids).replace(" .", ".")


def test_attribution_gives_a_changed_character_to_the_token_that_changed_it() -> None:
    attribution = TextAttribution(CleanupTokenizer())
    # The server sends settled text: "a" after the first step, " b." and "c" later.
    assert attribution.push([1], [True], "a") == [("a", True)]
    assert attribution.push([2, 3], [True, False], " b.") == [(" b", True), (".", False)]
    assert attribution.push([4], [False], "c") == [("c", False)]
    assert attribution.agrees


def test_attribution_stops_at_a_tokenizer_that_disagrees_with_the_server() -> None:
    attribution = TextAttribution(CleanupTokenizer())
    assert attribution.push([1], [True], "a") == [("a", True)]
    assert attribution.push([2], [False], " x") == [(" x", None)]  # the server decoded differently
    assert attribution.push([4], [True], "c") == [("c", None)]  # and nothing after is guessed
    assert not attribution.agrees
