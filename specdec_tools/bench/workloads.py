"""The workloads: a model pair and its prompts: synthetic, its low-acceptance variant
(``lowaccept``: a draft that rarely agrees, where drafting does not pay), the trained demo pair
or the hand-built copy pair (``copy``: copy-heavy, for ``--drafting``) with prompts in
``prompts.json``, or the user's own pair and prompts file (``custom``)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cells import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS_FILE = Path(__file__).with_name("prompts.json")
DEMO_DIR = REPO_ROOT / "models"
CUSTOM_MAX_TOKENS = 64  # the custom workload's max_tokens unless --max-tokens (the services' default)
WORKLOADS = ("synthetic", "demo", "custom", "copy", "lowaccept", "t5", "t5-agree", "t5-lowaccept", "t5-costly")
T5_WORKLOADS = ("t5", "t5-agree", "t5-lowaccept", "t5-costly")
# The T5-shaped pair is GBs (a 2.9 GB target per agreement level): cached outside the repository.
T5_PAIR_DIR = Path(tempfile.gettempdir()) / "specdec-t5-pair"

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


@dataclass
class CustomPair:
    """The user's pair and prompts (``--draft-model``, ``--target-model``, ``--prompts-file``)."""

    draft: str  # a checkpoint directory (HF or specdec format) or a hub name
    target: str
    prompts_file: Path


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: one per line, or JSON Lines with a string ``prompt`` in every object.
    A file whose first non-empty line is a JSON object is read as JSON Lines; blank lines are
    skipped; a plain line is stripped of surrounding whitespace."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"--prompts-file {path}: {error}") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise SystemExit(f"--prompts-file {path}: no prompts (one per line, or JSON Lines with a \"prompt\")")
    try:
        first = json.loads(numbered[0][1])
    except ValueError:
        first = None
    if not isinstance(first, dict):
        return [line.strip() for _, line in numbered]
    prompts = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except ValueError as error:
            raise SystemExit(f"--prompts-file {path}:{number}: not JSON ({error}); a JSON Lines file "
                             "has one object per line") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise SystemExit(f"--prompts-file {path}:{number}: no \"prompt\" string in this object")
        prompts.append(prompt)
    return prompts


def custom_workload(pair: CustomPair, settings: Settings) -> Workload:
    """The user's pair, resolved the way the services resolve ``--model`` (a directory as is, a hub
    name downloaded once), checked to share one tokenizer, with the first ``settings.prompts``
    prompts of the file."""
    from specdec_core.checkpoint import read_config, resolve_model_path
    from specdec_core.errors import CheckpointError
    from specdec_core.tokenizer import load_tokenizer, tokenizer_fingerprint

    prompts = read_prompts(pair.prompts_file)[: settings.prompts]
    paths, fingerprints = {}, {}
    for role, name in (("draft", pair.draft), ("target", pair.target)):
        try:
            paths[role] = resolve_model_path(name)
            read_config(paths[role])
            fingerprints[role] = tokenizer_fingerprint(load_tokenizer(paths[role]))
        except CheckpointError as error:
            raise SystemExit(f"--{role}-model {name}: {error}") from None
    if fingerprints["draft"] != fingerprints["target"]:
        raise SystemExit(f"--draft-model {pair.draft} and --target-model {pair.target} use different tokenizers "
                         "(vocabulary or special ids); speculative decoding needs one shared tokenizer")
    about = f"your pair: draft {pair.draft}, target {pair.target}, prompts from {pair.prompts_file}"
    return Workload("custom", paths["draft"], paths["target"], prompts, settings.max_tokens or CUSTOM_MAX_TOKENS,
                    about)


def load_workloads(names: list[str], settings: Settings, pair_dir: Path, tiny: bool,
                   demo_dir: Path, custom: CustomPair | None = None,
                   t5_pair_dir: Path = T5_PAIR_DIR) -> tuple[list[Workload], dict[str, str]]:
    """The named workloads, and why any were skipped (the demo pair when it is not trained)."""
    spec = json.loads(PROMPTS_FILE.read_text())
    workloads, skipped = [], {}
    for name in names:
        if name == "custom":
            if custom is None:
                raise SystemExit("the custom workload needs --draft-model, --target-model and --prompts-file")
            workloads.append(custom_workload(custom, settings))
            continue
        if name not in spec:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        entry = spec[name]
        prompts = spec[entry.get("prompts_from", name)]["prompts"][: settings.prompts]
        max_tokens = min(entry["max_tokens"], settings.max_tokens or entry["max_tokens"])
        if name == "synthetic":
            workloads.append(synthetic_workload(name, prompts, max_tokens, pair_dir, tiny, low_acceptance=False))
        elif name == "lowaccept":
            workloads.append(synthetic_workload(name, prompts, max_tokens, pair_dir.with_name(f"{pair_dir.name}-lowaccept"),
                                                tiny, low_acceptance=True))
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
        elif name == "copy":
            workloads.append(copy_workload(prompts, max_tokens, pair_dir.with_name("copy-pair"), tiny))
        elif name in T5_WORKLOADS:
            workloads.append(t5_workload(name, prompts, max_tokens, t5_pair_dir, tiny))
        else:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return workloads, skipped


def synthetic_workload(name: str, prompts: list[str], max_tokens: int, pair_dir: Path, tiny: bool,
                       low_acceptance: bool) -> Workload:
    """The synthetic pair (``specdec_tools.synthetic_pair``), or its low-acceptance variant (a
    larger perturbation, cached in its own directory), built once and reused."""
    from specdec_tools.synthetic_pair import PairRecipe, build_pair

    recipe = PairRecipe().low_acceptance() if low_acceptance else PairRecipe()
    recipe = recipe.scaled_down() if tiny else recipe
    logger.info("%s: building or reusing the pair in %s", name, pair_dir)
    pair = build_pair(pair_dir, recipe)
    about = (f"random pair: draft 1 decoder layer, target {1 + recipe.extra_decoder_layers} "
             f"(extra blocks' output projections x{recipe.extra_block_gain}), d_model "
             f"{recipe.draft['d_model']}")
    if low_acceptance:
        about += "; a larger perturbation: the draft rarely agrees with the target"
    return Workload(name, pair.draft, pair.target, prompts, max_tokens, about)


def copy_workload(prompts: list[str], max_tokens: int, pair_dir: Path, tiny: bool) -> Workload:
    """A copy-heavy task: a target that writes its prompt back with a few tokens swapped, and a
    cheaper draft that knows half the swaps (``specdec_tools.copy_pair``), built by hand and cached."""
    from specdec_tools.copy_pair import CopyRecipe, build_copy_pair

    recipe = CopyRecipe(target_extra_layers=1) if tiny else CopyRecipe()
    logger.info("copy: building or reusing the pair in %s", pair_dir)
    pair = build_copy_pair(pair_dir, recipe)
    about = (f"a target that copies its prompt with {recipe.edit_fraction:.0%} of the vocabulary swapped in "
             f"pairs ({1 + recipe.target_extra_layers} decoder layers), a 1-layer draft that knows "
             f"{recipe.draft_known_edits:.0%} of the swaps")
    return Workload("copy", pair.draft, pair.target, prompts, max_tokens, about)


def t5_workload(name: str, prompts: list[str], max_tokens: int, pair_dir: Path, tiny: bool) -> Workload:
    """The T5-shaped pair (``specdec_tools.t5_pair``) at the workload's agreement level, built once
    per level and cached (``--tiny``: the same construction at toy widths, in ``<dir>-tiny``)."""
    from specdec_tools.t5_pair import COSTLY_GAIN, GAINS, WIDE, T5PairRecipe, build_t5_pair

    if name == "t5-costly":  # another draft, so its own cache
        recipe, pair_dir = T5PairRecipe(gain=COSTLY_GAIN, draft=dict(WIDE)), pair_dir.with_name(f"{pair_dir.name}-costly")
    else:
        recipe = T5PairRecipe(gain=GAINS[name])
    if tiny:
        recipe, pair_dir = recipe.scaled_down(), pair_dir.with_name(f"{pair_dir.name}-tiny")
    logger.info("%s: building or reusing the T5-shaped pair in %s (minutes and ~3 GB the first time)",
                name, pair_dir)
    pair = build_t5_pair(pair_dir, recipe)
    d, t = recipe.draft, recipe.target
    about = (f"T5-shaped pair: draft d_model {d['d_model']}, {d['layers']}+{d['layers']} layers; target d_model "
             f"{t['d_model']}, {t['layers']}+{t['layers']} layers, embedding the draft (extra parts x{recipe.gain:g}); "
             f"vocabulary {recipe.vocab}")
    return Workload(name, pair.draft, pair.target, prompts, max_tokens, about)
