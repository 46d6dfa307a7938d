"""The workloads: a model pair and its prompts (``prompts.json``), synthetic or the trained demo pair."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cells import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS_FILE = Path(__file__).with_name("prompts.json")
DEMO_DIR = REPO_ROOT / "models"

logger = logging.getLogger("specdec.bench")


@dataclass
class Workload:
    """A draft/target pair, its prompts and their token budget; ``results`` is filled by the run."""

    name: str
    draft: Path
    target: Path
    prompts: list[str]
    max_tokens: int
    about: str = ""
    results: dict[str, Any] = field(default_factory=dict)


def load_workloads(names: list[str], settings: Settings, pair_dir: Path, tiny: bool,
                   demo_dir: Path) -> tuple[list[Workload], dict[str, str]]:
    """The named workloads, and why any were skipped (the demo pair when it is not trained)."""
    from specdec_tools.synthetic_pair import PairRecipe, build_pair

    spec = json.loads(PROMPTS_FILE.read_text())
    workloads, skipped = [], {}
    for name in names:
        entry = spec[name]
        prompts = entry["prompts"][: settings.prompts]
        max_tokens = min(entry["max_tokens"], settings.max_tokens or entry["max_tokens"])
        if name == "synthetic":
            recipe = PairRecipe().scaled_down() if tiny else PairRecipe()
            logger.info("synthetic: building or reusing the pair in %s", pair_dir)
            pair = build_pair(pair_dir, recipe)
            about = (f"random pair: draft 1 decoder layer, target {1 + recipe.extra_decoder_layers} "
                     f"(extra blocks' output projections x{recipe.extra_block_gain}), d_model "
                     f"{recipe.draft['d_model']}")
            workloads.append(Workload(name, pair.draft, pair.target, prompts, max_tokens, about))
        elif name == "demo":
            draft, target = demo_dir / "demo-draft", demo_dir / "demo-target"
            missing = [str(p) for p in (draft, target) if not (p / "config.json").is_file()]
            if missing:
                skipped[name] = (f"skipped: {', '.join(missing)} not found (train it with "
                                 "`specdec-train-demo --out models`)")
                logger.warning("demo: %s", skipped[name])
                continue
            about = "the trained demo pair (spell numbers in words)"
            workloads.append(Workload(name, draft, target, prompts, max_tokens, about))
        else:
            raise SystemExit(f"unknown workload {name!r}; choose from synthetic, demo")
    return workloads, skipped
