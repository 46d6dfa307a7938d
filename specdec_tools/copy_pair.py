"""A draft/target pair that copies its input with edits, built by hand (no training), for the
copy-heavy workload of the benchmark and for the n-gram drafting tests.

Prompts are ``» TEXT``; the target writes TEXT back (the tokens after the anchor ``»``, its
EOS included) with a fixed substitution ``sigma`` applied: random pairs of tokens swapped, over
``edit_fraction`` of the vocabulary, so roughly that share of the output tokens are edits that
the prompt does not contain there. That is the shape of extraction, correction and editing
tasks: long spans copied, a few tokens changed.

How a T5 copies (every vector one-hot, so nothing is approximate; D = 3 x vocabulary):

- **encoder** (relative position bias only, no content attention): layer 0 attends to the
  previous position and writes that token into a second subspace, layer 1 does it again from
  there into a third, so position j holds (x_j, x_{j-1}, x_{j-2}). Position 0 has no previous
  position and attends to itself.
- **decoder** layer 0: self-attention (bias only) writes the previous decoder input beside the
  current one, (y_t, y_{t-1}); cross-attention queries with sigma^-1 of both against the
  encoder's (x_{j-1}, x_{j-2}) and copies x_j of the position where both match (score 2 x 16
  against 16 for one match): a copier conditioned on the last two output tokens. The decoder
  start token stands for "before the output", so the first two steps find the two tokens after
  the anchor.
- the lm head maps x to sigma(x) with logit ``target_margin`` (others 0), plus a little seeded
  noise that breaks exact ties (a bigram that repeats in the prompt) the same way in every
  framework.
- ``target_extra_layers`` more decoder blocks (and encoder blocks, as transformers' generate
  needs) with random weights and zero output projections: the same function, the cost of a
  deeper model.

The **draft** is the same copier with one decoder block (no extra ones) that knows only
``draft_known_edits`` of the swaps: right wherever the target copies, wrong at the edits it
does not know (and where its tie-breaking noise differs), while an n-gram lookup is wrong at
every edit. Everything is seeded; ``build_copy_pair(dir)`` writes ``tokenizer/``, ``draft/``,
``target/`` and ``sigma.json`` and reuses them while ``recipe.json`` matches. Needs
sentencepiece, transformers and safetensors (the ``test`` or ``bench`` extra).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ANCHOR = "»"  # absent from the corpus, so a single piece that occurs once per prompt
SCORE_PER_MATCH = 16.0  # cross-attention score for each of the two context tokens that match
BIAS = {"previous": 40.0, "self": 20.0}  # relative position bias: attend to the previous position, else self


@dataclass(frozen=True)
class CopyRecipe:
    vocab_size: int = 256
    edit_fraction: float = 0.1  # share of the vocabulary sigma changes (random pairs swapped)
    target_margin: float = 12.0  # logit of the copied token over the rest (lower: a flatter target at T>0)
    draft_margin: float = 12.0
    target_extra_layers: int = 5  # cost only: random blocks with zero output projections
    draft_known_edits: float = 0.5  # share of sigma's swaps the draft makes too (it copies the rest)
    d_ff: int = 512  # the extra blocks' FFN width
    tie_noise: float = 0.02  # relative noise on the lm heads (breaks exact ties consistently)
    seed: int = 0
    version: int = 1  # bump when the construction changes, so caches rebuild


@dataclass(frozen=True)
class CopyPair:
    draft: Path
    target: Path
    tokenizer: Path
    recipe: CopyRecipe
    sigma: dict[int, int]  # the edits: token -> what the target writes instead


def copy_prompt(text: str) -> str:
    return f"{ANCHOR} {text}"


def copy_lines(n: int, min_chars: int = 40, max_chars: int = 110) -> list[str]:
    """n distinct corpus lines of moderate length (deterministic), as copy prompts."""
    from .tiny_checkpoints import corpus_lines

    seen: list[str] = []
    for line in corpus_lines():
        # ".." would be a repeated bigram the copier loops on (as any copier conditioned on two tokens)
        if min_chars <= len(line) <= max_chars and ANCHOR not in line and ".." not in line and line not in seen:
            seen.append(line)
    picked = seen[:: max(1, len(seen) // (4 * n))][:n]
    return [copy_prompt(line) for line in picked]


def build_copy_pair(cache_dir: str | Path, recipe: CopyRecipe | None = None) -> CopyPair:
    """Build (or reuse) the pair under ``cache_dir``."""
    recipe = recipe or CopyRecipe()
    root = Path(cache_dir)
    stamp = root / "recipe.json"
    wanted = json.dumps(asdict(recipe), sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == wanted
            and all((root / d / "model.safetensors").is_file() for d in ("draft", "target"))):
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        _build(root, recipe)
        stamp.write_text(wanted)
    sigma = {int(k): v for k, v in json.loads((root / "sigma.json").read_text()).items()}
    return CopyPair(root / "draft", root / "target", root / "tokenizer", recipe, sigma)


def _build(root: Path, recipe: CopyRecipe) -> None:
    from specdec_core.tokenizer import load_tokenizer

    from .tiny_checkpoints import corpus_lines, write_sentencepiece_tokenizer

    tokenizer_dir = write_sentencepiece_tokenizer([copy_prompt(line) for line in corpus_lines()],
                                                  root / "tokenizer", recipe.vocab_size)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    anchor = tokenizer.convert_tokens_to_ids(ANCHOR)
    if tokenizer.convert_ids_to_tokens(anchor) != ANCHOR:
        raise RuntimeError(f"the tokenizer has no piece {ANCHOR!r}")
    rng = np.random.default_rng(recipe.seed)
    space = tokenizer.convert_tokens_to_ids("▁")
    editable = [t for t in range(3, vocab) if t not in (anchor, space)]  # not pad, eos, unk
    pairs = rng.choice(editable, size=2 * max(1, round(recipe.edit_fraction * len(editable) / 2)),
                       replace=False).reshape(-1, 2).tolist()
    sigma = {a: b for pair in pairs for a, b in (pair, pair[::-1])}  # swaps: a permutation
    (root / "sigma.json").write_text(json.dumps(sigma, sort_keys=True) + "\n")
    known = {a: b for pair in pairs[: round(recipe.draft_known_edits * len(pairs))] for a, b in (pair, pair[::-1])}
    first = tokenizer(copy_prompt("x")).input_ids[0]  # the piece before the anchor ("▁")
    for name, config, edits, margin in (("target", _config(recipe, vocab, recipe.target_extra_layers), sigma,
                                         recipe.target_margin),
                                        ("draft", _config(recipe, vocab, 0), known, recipe.draft_margin)):
        source = np.arange(vocab)  # source[u]: the prompt token that output token u copies (sigma^-1)
        for a, b in edits.items():
            source[b] = a
        weights = _copier(config, anchor, first, source, margin, recipe.tie_noise, rng)
        _write(root / name, tokenizer, weights, config)


def _config(recipe: CopyRecipe, vocab: int, extra_layers: int) -> dict:
    from transformers import T5Config

    layers = 1 + extra_layers
    config = T5Config(
        vocab_size=vocab, d_model=3 * vocab, d_kv=2 * vocab, d_ff=recipe.d_ff,
        num_layers=max(2, layers),  # the copier needs 2 encoder layers; transformers' generate as many as the decoder
        num_decoder_layers=layers, num_heads=1, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    ).to_dict()
    config["architectures"] = ["T5ForConditionalGeneration"]
    return config


def _blank(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor of the config's T5, random (std 0.05) or 1 for norms; embeddings zero."""
    d, inner, ff, vocab = config["d_model"], config["d_kv"] * config["num_heads"], config["d_ff"], config["vocab_size"]
    w: dict[str, np.ndarray] = {"shared.weight": np.zeros((vocab, d)), "lm_head.weight": np.zeros((vocab, d)),
                                "encoder.final_layer_norm.weight": np.ones(d),
                                "decoder.final_layer_norm.weight": np.ones(d)}

    def random(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.05, shape)

    for stack, layers, parts in (("encoder", config["num_layers"], ["SelfAttention"]),
                                 ("decoder", config["num_decoder_layers"], ["SelfAttention", "EncDecAttention"])):
        w[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((32, 1))
        for i in range(layers):
            for j, part in enumerate(parts):
                prefix = f"{stack}.block.{i}.layer.{j}"
                for name in "qkv":
                    w[f"{prefix}.{part}.{name}.weight"] = random(inner, d)
                w[f"{prefix}.{part}.o.weight"] = np.zeros((d, inner))  # functional layers set theirs
                w[f"{prefix}.layer_norm.weight"] = np.ones(d)
            prefix = f"{stack}.block.{i}.layer.{len(parts)}"
            w[f"{prefix}.DenseReluDense.wi_0.weight"] = random(ff, d)
            w[f"{prefix}.DenseReluDense.wi_1.weight"] = random(ff, d)
            w[f"{prefix}.DenseReluDense.wo.weight"] = np.zeros((d, ff))
            w[f"{prefix}.layer_norm.weight"] = np.ones(d)
    return w


def _bias(w: dict[str, np.ndarray], stack: str) -> None:
    """Attend to the previous position (bucket of offset -1), else to self (offset 0)."""
    table = w[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    table[1, 0] = BIAS["previous"]  # offset -1: bucket 1 in both the bidirectional and causal bucketing
    table[0, 0] = BIAS["self"]


def _shift(w: dict[str, np.ndarray], prefix: str, vocab: int, d: int, read: int, write: int, norm: float) -> None:
    """An attention (bias only: q = k = 0) that copies subspace ``read`` of the attended position
    into subspace ``write``, undoing the pre-norm's scale ``norm`` so a one-hot arrives as one."""
    for name in "qk":
        w[f"{prefix}.{name}.weight"][:] = 0.0
    v, o = w[f"{prefix}.v.weight"], w[f"{prefix}.o.weight"]
    v[:] = 0.0
    v[np.arange(vocab), read * vocab + np.arange(vocab)] = 1.0
    o[write * vocab + np.arange(vocab), np.arange(vocab)] = 1.0 / norm
    assert o.shape[0] == d


def _head(w: dict[str, np.ndarray], vocab: int, read: int, margin: float, norm: float, source: np.ndarray,
          noise: float, rng: np.random.Generator) -> None:
    """lm head: the copied prompt token x (in subspace ``read``) becomes sigma(x), logit ``margin``."""
    head = w["lm_head.weight"]
    head[np.arange(vocab), read * vocab + source] = margin / norm
    head[:, read * vocab : (read + 1) * vocab] *= 1.0 + noise * rng.standard_normal((vocab, vocab))


def _cross(w: dict[str, np.ndarray], vocab: int, anchor: int, first: int, source: np.ndarray,
           norm: float, value_norm: float) -> None:
    """Cross-attention: sigma^-1 of the decoder's (y_t, y_{t-1}) against the encoder's
    (x_{j-1}, x_{j-2}), one ``SCORE_PER_MATCH`` per match; copies the encoder's x_j.

    The decoder start token (pad) stands for "before the output": as y_t it asks for
    (anchor, the prompt's first token), as y_{t-1} for the anchor, so the first two steps find
    the two tokens after the anchor."""
    prefix = "decoder.block.0.layer.1.EncDecAttention"
    q, k, v, o = (w[f"{prefix}.{n}.weight"] for n in "qkvo")
    for a in (q, k, v):
        a[:] = 0.0
    rows = np.arange(vocab)
    pad = 0
    for c in range(2):  # c = 0: y_t (decoder subspace 0) -> x_{j-1} (encoder subspace 1); c = 1: one back
        q[c * vocab + source, c * vocab + rows] = 1.0
        q[c * vocab + source[pad], c * vocab + pad] = 0.0
        k[c * vocab + rows, (c + 1) * vocab + rows] = SCORE_PER_MATCH / norm**2
    q[anchor, pad] = 1.0
    q[vocab + first, pad] = 1.0
    q[vocab + anchor, vocab + pad] = 1.0
    v[rows, rows] = 1.0
    o[2 * vocab + rows, rows] = 1.0 / value_norm


def _copier(config: dict, anchor: int, first: int, source: np.ndarray, margin: float, noise: float,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    vocab, d = config["vocab_size"], config["d_model"]
    w = _blank(config, rng)
    w["shared.weight"][np.arange(vocab), np.arange(vocab)] = 1.0
    for stack in ("encoder", "decoder"):
        _bias(w, stack)
    # Every pre-norm sees one-hots in 1, 2 or 3 subspaces: it scales them by sqrt(d / n).
    # encoder: (x_j) -> (x_j, x_{j-1}) -> (x_j, x_{j-1}, x_{j-2}), normalised at the end
    _shift(w, "encoder.block.0.layer.0.SelfAttention", vocab, d, read=0, write=1, norm=np.sqrt(d))
    _shift(w, "encoder.block.1.layer.0.SelfAttention", vocab, d, read=1, write=2, norm=np.sqrt(d / 2))
    # decoder: (y_t) -> (y_t, y_{t-1}) -> + the copied x_j
    _shift(w, "decoder.block.0.layer.0.SelfAttention", vocab, d, read=0, write=1, norm=np.sqrt(d))
    # queries arrive scaled by sqrt(d/2), keys and values by sqrt(d/3): the same norm**2 = d / sqrt(6)
    _cross(w, vocab, anchor, first, source, norm=np.sqrt(d / np.sqrt(6)), value_norm=np.sqrt(d / 3))
    _head(w, vocab, 2, margin, np.sqrt(d / 3), source, noise, rng)
    return w


def _write(out: Path, tokenizer, weights: dict[str, np.ndarray], config: dict) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
