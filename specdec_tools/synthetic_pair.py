"""A cost-asymmetric draft/target pair built offline, for the benchmark (``specdec-bench``).

Random T5 models have no task, so a random draft would almost never agree with a random
target. This pair is built so that it does, while the target costs many times more per
decoder token:

1. **tokenizer**: ``tiny_checkpoints.train_tokenizer`` (a 512-piece sentencepiece unigram
   model trained on standard-library docstrings).
2. **draft**: ``tiny_checkpoints.build_t5`` with the ``DRAFT`` sizes: a v1.1-style T5
   (gated-gelu, untied lm head), ``d_model`` 256, 2 encoder layers and 1 decoder layer,
   random init,
   written by transformers' ``save_pretrained``.
3. **target**: the draft's tensors unchanged, plus ``EXTRA_DECODER_LAYERS`` more decoder
   blocks appended after the draft's (block 0 keeps the relative position bias, so positions
   mean the same), and encoder blocks up to the same depth (transformers sizes the decoder's
   ``generate()`` cache by the encoder's depth, so a decoder deeper than the encoder breaks
   the Hugging Face baselines; the encoder runs once per prompt, so this adds no per-token
   cost). The extra blocks come from a randomly initialised ``T5ForConditionalGeneration``
   of the target's config (transformers' own init), with the output projections of every
   sub-layer (attention ``o``, FFN ``wo``) multiplied by ``EXTRA_BLOCK_GAIN``: near-identity
   residual blocks. The target is the draft plus a small perturbation of the residual
   stream, so the two agree on most tokens (greedy and sampled; about 0.85 with the default
   gain) but not all, while each target decoder token runs ``1 + EXTRA_DECODER_LAYERS``
   decoder layers to the draft's one (``PairRecipe.low_acceptance()``: a larger gain, and
   they rarely agree). ``config.json`` is the draft's with ``num_layers`` and
   ``num_decoder_layers`` raised; the weights are one ``model.safetensors`` in HF names, so
   both transformers (the PyTorch baselines) and ``specdec_core`` load it.

Everything is seeded; ``build_pair(cache_dir)`` writes ``tokenizer/``, ``draft/`` and
``target/`` under ``cache_dir`` and reuses them while ``recipe.json`` there matches the
recipe (delete the directory to rebuild). Needs torch, sentencepiece, transformers and
safetensors (the ``bench`` or ``test`` extra).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Sizes of the draft (the target shares them and adds decoder blocks).
DRAFT = dict(d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_layers=2, num_decoder_layers=1,
             relative_attention_num_buckets=32, relative_attention_max_distance=128)
EXTRA_DECODER_LAYERS = 11  # 12 decoder blocks in all: 12x the draft's decoder layers
EXTRA_BLOCK_GAIN = 0.08  # scale of each extra block's output projections (near-identity blocks)
# The low-acceptance variant: the same construction with the extra blocks 7.5x stronger, so the
# target drifts far from the draft (greedy agreement ~0.12, sampled acceptance ~0.16, measured
# over the benchmark's prompts) at the same costs: a pair on which drafting does not pay.
LOW_ACCEPTANCE_BLOCK_GAIN = 0.6


@dataclass(frozen=True)
class PairRecipe:
    draft: dict[str, Any] = field(default_factory=lambda: dict(DRAFT))
    extra_decoder_layers: int = EXTRA_DECODER_LAYERS
    extra_block_gain: float = EXTRA_BLOCK_GAIN
    seed: int = 0
    version: int = 1  # bump when the construction changes, so caches rebuild

    def low_acceptance(self) -> PairRecipe:
        """The same pair with a larger perturbation (LOW_ACCEPTANCE_BLOCK_GAIN): the draft
        rarely agrees with the target, while the costs stay the same."""
        return replace(self, extra_block_gain=LOW_ACCEPTANCE_BLOCK_GAIN)

    def scaled_down(self) -> PairRecipe:
        """A pair small enough for a smoke test (seconds to build and run)."""
        draft = dict(self.draft, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=1,
                     num_decoder_layers=1)
        return PairRecipe(draft, extra_decoder_layers=3, extra_block_gain=self.extra_block_gain,
                          seed=self.seed)


@dataclass(frozen=True)
class Pair:
    draft: Path
    target: Path
    recipe: PairRecipe


def build_pair(cache_dir: str | Path, recipe: PairRecipe | None = None) -> Pair:
    """Build (or reuse) the pair under ``cache_dir``; return the two checkpoint directories."""
    recipe = recipe or PairRecipe()
    root = Path(cache_dir)
    stamp = root / "recipe.json"
    pair = Pair(root / "draft", root / "target", recipe)
    wanted = json.dumps(asdict(recipe), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted and all(
        (d / "model.safetensors").is_file() for d in (pair.draft, pair.target)
    ):
        return pair
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _build(root, recipe)
    stamp.write_text(wanted)
    return pair


def _build(root: Path, recipe: PairRecipe) -> None:
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    from specdec_core.tokenizer import load_tokenizer

    from .tiny_checkpoints import build_t5, train_tokenizer

    tokenizer_dir = train_tokenizer(root / "tokenizer")
    draft_dir = build_t5(root / "draft", tokenizer_dir, "v1_1", seed=recipe.seed, **recipe.draft)
    draft_layers = recipe.draft["num_decoder_layers"]

    config = json.loads((draft_dir / "config.json").read_text())
    layers = draft_layers + recipe.extra_decoder_layers
    # As deep an encoder as decoder: transformers sizes the decoder's generate() cache by
    # num_layers (the encoder's depth), so a deeper decoder fails there with an IndexError.
    encoder_layers = max(recipe.draft["num_layers"], layers)
    config.update(num_layers=encoder_layers, num_decoder_layers=layers)
    known = T5Config().to_dict().keys()
    torch.manual_seed(recipe.seed + 1)
    donor = T5ForConditionalGeneration(T5Config(**{k: v for k, v in config.items() if k in known})).eval()

    weights = load_file(str(draft_dir / "model.safetensors"))
    for name, tensor in donor.state_dict().items():
        parts = name.split(".")
        if parts[1:2] != ["block"] or name in weights:
            continue  # embeddings, norms and the draft's own blocks come from the draft
        value = tensor.detach().float().numpy().copy()
        if name.endswith((".o.weight", ".wo.weight")):
            value *= recipe.extra_block_gain
        weights[name] = value

    target_dir = root / "target"
    target_dir.mkdir()
    save_file(weights, str(target_dir / "model.safetensors"), metadata={"format": "pt"})
    (target_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    load_tokenizer(tokenizer_dir).save_pretrained(target_dir)
