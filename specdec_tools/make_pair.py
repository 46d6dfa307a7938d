"""``specdec-make-pair``: a local draft/target pair in Hugging Face layout, built offline.

To try ``specdec-convert``, ``scripts/up`` and ``specdec-bench`` on a pair of your own without
the internet. Random weights (the text is noise; agreement and costs are what they are for):

- ``--shape tiny`` (default, seconds): the tests' pair, a v1.1 target and a smaller draft
  (``specdec_tools.tiny_checkpoints``);
- ``--shape t5`` (seconds): the benchmark's T5-shaped construction at toy widths, a draft the
  target embeds, so they agree about as often as ``--agreement`` says (``specdec_tools.t5_pair``);
- ``--shape large`` (minutes, ~3.2 GB): the same at the job's shapes, a T5-small-shaped draft for
  a T5-large-shaped target, exactly the benchmark's ``t5`` workloads' pair.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .t5_pair import GAINS, T5PairRecipe, build_t5_pair
from .tiny_checkpoints import build_pair

SHAPES = ("tiny", "t5", "large")


def make_pair(out: Path, shape: str = "tiny", agreement: str = "t5") -> tuple[Path, Path]:
    """Write the pair under ``out``; (draft, target) directories."""
    if shape == "tiny":
        return build_pair(out)
    recipe = T5PairRecipe(gain=GAINS[agreement])
    pair = build_t5_pair(out, recipe if shape == "large" else recipe.scaled_down())
    return pair.draft, pair.target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec-make-pair", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the pair")
    parser.add_argument("--shape", choices=SHAPES, default="tiny", help="which pair (default tiny)")
    parser.add_argument("--agreement", choices=list(GAINS), default="t5",
                        help="--shape t5 or large: how often the draft agrees with the target, as the "
                             "benchmark's workloads of these names (t5 ~0.6, t5-agree ~0.9, t5-lowaccept ~0.1; "
                             "default t5)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.shape == "tiny" and args.agreement != "t5":
        raise SystemExit("specdec-make-pair: --agreement is for --shape t5 or large")
    try:
        draft, target = make_pair(args.out, args.shape, args.agreement)
    except ImportError as error:  # the tiny pair is written by transformers' PyTorch T5
        raise SystemExit(f"specdec-make-pair: --shape {args.shape} needs {error.name or 'a package'}, which the "
                         "test extra installs (.venv/bin/pip install -e \".[test]\"); --shape t5 needs nothing more"
                         ) from None
    print(f"draft  {draft}\ntarget {target}\nserve them (from the repository root):\n"
          f"  scripts/up --draft-model {draft} --target-model {target}\n"
          f"or convert one first:\n  .venv/bin/specdec-convert --model {target} --out {args.out / 'target-mlx'}")


if __name__ == "__main__":
    main()
