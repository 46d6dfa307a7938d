"""``specdec-make-pair``: a local pair to try convert and serve on, offline."""

from __future__ import annotations

from pathlib import Path

from harness import LoopThread, speculative_cluster

from specdec_core.checkpoint import load_model
from specdec_tools.convert import main as convert
from specdec_tools.make_pair import main as make_pair


def test_the_tiny_pair_builds_converts_and_serves_a_request(tmp_path: Path, loop: LoopThread, capsys) -> None:
    make_pair(["--out", str(tmp_path / "pair")])
    printed = capsys.readouterr().out
    draft, target = tmp_path / "pair" / "draft", tmp_path / "pair" / "target"
    assert f"scripts/up --draft-model {draft} --target-model {target}" in printed
    assert convert(["--model", str(target), "--out", str(tmp_path / "target-mlx")]) == 0
    assert load_model(tmp_path / "target-mlx").args == load_model(target).args
    with speculative_cluster(loop, draft, tmp_path / "target-mlx") as (client, _, _, _):
        reply = client.generate("Return the number of items in a container.", max_tokens=8, num_draft=3)
        alone = client.generate("Return the number of items in a container.", max_tokens=8, speculative=False)
    assert reply.stats.tokens > 0 and list(reply.token_ids) == list(alone.token_ids)


def test_the_t5_shaped_pair_at_toy_widths_serves_greedy_output_equal_to_the_target(
        tmp_path: Path, loop: LoopThread) -> None:
    make_pair(["--out", str(tmp_path / "pair"), "--shape", "t5", "--agreement", "t5-agree"])
    draft = tmp_path / "pair" / "base" / "draft"
    (target,) = (tmp_path / "pair").glob("target-gain*")
    with speculative_cluster(loop, draft, target) as (client, _, _, _):
        reply = client.generate("def main():", max_tokens=12, num_draft=3)
        alone = client.generate("def main():", max_tokens=12, speculative=False)
    assert list(reply.token_ids) == list(alone.token_ids) and reply.stats.accepted > 0
