"""The benchmark's T5-shaped pair (specdec_tools.t5_pair), checked with transformers' PyTorch T5:
the target embeds the draft exactly (gain 0: the same logits), and the gain perturbs it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from specdec_core.tokenizer import load_tokenizer
from specdec_tools.t5_pair import T5PairRecipe, build_t5_pair


def logits(model_dir, prompt_ids, decoder_ids):
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), decoder_input_ids=torch.tensor([decoder_ids]))
    return out.logits[0].double()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5pair")
    tiny = T5PairRecipe(gain=0.0).scaled_down()
    return {gain: build_t5_pair(root, T5PairRecipe(**{**tiny.__dict__, "gain": gain})) for gain in (0.0, 0.3)}


def test_target_embeds_the_draft_exactly_at_gain_zero(pairs):
    pair = pairs[0.0]
    tokenizer = load_tokenizer(pair.target)
    prompt = tokenizer("def read_config(path): return json.loads(path.read_text())").input_ids
    decoder = [0] + prompt[:9]
    draft, target = logits(pair.draft, prompt, decoder), logits(pair.target, prompt, decoder)
    draft_config = json.loads((pair.draft / "config.json").read_text())
    target_config = json.loads((pair.target / "config.json").read_text())
    assert target_config["d_model"] == 2 * draft_config["d_model"]
    assert target_config["num_decoder_layers"] == 2 * draft_config["num_decoder_layers"]
    # the models share nothing but the draft's weights: equal logits mean the embedding is exact
    assert torch.allclose(target, draft, atol=1e-4 * draft.abs().max().item())
    assert draft.std() > 3  # peaked, not flat: LOGIT_STD


def test_the_gain_perturbs_the_target(pairs):
    tokenizer = load_tokenizer(pairs[0.0].target)
    prompt = tokenizer("class Formatter: pass").input_ids
    decoder = [0] + prompt[:9]
    draft = logits(pairs[0.3].draft, prompt, decoder)
    target = logits(pairs[0.3].target, prompt, decoder)
    assert (pairs[0.3].draft == pairs[0.0].draft)  # one draft serves every gain
    change = (target - draft).abs().max().item()
    assert change > 1e-2 * draft.abs().max().item()
    assert len(tokenizer) == 1100 and draft.shape[-1] == 1128  # sentinels after the pieces, T5's padding rows



def test_a_draft_as_wide_as_the_target_is_embedded_exactly_at_gain_zero(tmp_path):
    """t5-costly's shape: the draft has the target's width and fewer layers (WIDE), the target holds it
    whole in its first layers; at gain 0 they give the same logits."""
    from specdec_tools.t5_pair import WIDE

    pair = build_t5_pair(tmp_path, T5PairRecipe(gain=0.0, draft=dict(WIDE)).scaled_down())
    draft_config = json.loads((pair.draft / "config.json").read_text())
    target_config = json.loads((pair.target / "config.json").read_text())
    assert draft_config["d_model"] == target_config["d_model"]
    assert draft_config["num_decoder_layers"] < target_config["num_decoder_layers"]
    prompt = load_tokenizer(pair.target)("def read_config(path): return json.loads(path.read_text())").input_ids
    decoder = [0] + prompt[:9]
    draft, target = logits(pair.draft, prompt, decoder), logits(pair.target, prompt, decoder)
    assert torch.allclose(target, draft, atol=1e-4 * draft.abs().max().item())
