"""The committed demo pair (models/demo-draft, models/demo-target) and the tool that trains it."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec_core.checkpoint import load_model
from specdec_core.engine import ModelEngine
from specdec_core.tokenizer import load_tokenizer, tokenizer_fingerprint
from specdec_tools import demo_task, train_demo
from specdec_tools.demo_eval import greedy_decode, speculate_greedy

MODELS = Path(__file__).resolve().parents[1] / "models"
DRAFT_DIR = MODELS / "demo-draft"
TARGET_DIR = MODELS / "demo-target"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TARGET_DIR)


@pytest.fixture(scope="module")
def target() -> ModelEngine:
    return ModelEngine(load_model(TARGET_DIR))


@pytest.fixture(scope="module")
def draft() -> ModelEngine:
    return ModelEngine(load_model(DRAFT_DIR))


def test_converter_spells_numbers() -> None:
    assert demo_task.number_to_words(0) == "zero"
    assert demo_task.number_to_words(4512) == "four thousand five hundred twelve"
    assert demo_task.number_to_words(110_011) == "one hundred ten thousand eleven"
    assert demo_task.number_to_words(999_999) == (
        "nine hundred ninety nine thousand nine hundred ninety nine"
    )
    assert demo_task.is_correct("spell 20", "twenty")
    assert not demo_task.is_correct("spell 20", "twenty zero")


def test_held_out_prompts_are_never_trained_on() -> None:
    numbers = demo_task.eval_numbers(50)
    assert all(demo_task.is_held_out(n) for n in numbers)
    import numpy as np

    train = demo_task.sample_numbers(np.random.default_rng(0), 2000, held_out=False)
    assert not demo_task.is_held_out(train).any()


def test_both_models_share_the_tokenizer_and_it_round_trips(tokenizer) -> None:
    assert tokenizer_fingerprint(load_tokenizer(DRAFT_DIR)) == tokenizer_fingerprint(tokenizer)
    for text in ("spell 4512", "four thousand five hundred twelve", "spell 0", "zero",
                 demo_task.number_to_words(777_777)):
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer("spell 4512").input_ids)
    assert digits[-5:] == ["4", "5", "1", "2", "</s>"]  # every digit its own piece


def test_config_matches_the_project_conventions(target: ModelEngine, draft: ModelEngine) -> None:
    for engine in (target, draft):
        args = engine.args
        assert (args.decoder_start_token_id, args.eos_token_id, args.pad_token_id) == (0, 1, 0)
    assert target.args.vocab_size == draft.args.vocab_size
    assert draft.args.num_decoder_layers < target.args.num_decoder_layers
    total = sum(f.stat().st_size for d in (DRAFT_DIR, TARGET_DIR) for f in d.iterdir())
    assert total <= 30_000_000


def test_target_spells_held_out_numbers(target: ModelEngine, tokenizer) -> None:
    numbers = demo_task.eval_numbers(12, seed=99)
    wrong = []
    for n in numbers:
        prompt = demo_task.prompt_for(n)
        tokens, _ = greedy_decode(target, tokenizer(prompt).input_ids)
        answer = tokenizer.decode(tokens, skip_special_tokens=True)
        if answer != demo_task.number_to_words(n):
            wrong.append((prompt, answer))
    assert len(wrong) <= 1, wrong


def test_speculation_reproduces_the_target_and_accepts_most_drafts(
    target: ModelEngine, draft: ModelEngine, tokenizer
) -> None:
    proposed = accepted = 0
    for n in demo_task.eval_numbers(8, seed=7):
        ids = tokenizer(demo_task.prompt_for(n)).input_ids
        expected, _ = greedy_decode(target, ids)
        spec = speculate_greedy(draft, target, ids, k=5)
        assert spec.tokens == expected
        proposed, accepted = proposed + spec.proposed, accepted + spec.accepted
    assert accepted / proposed >= 0.6


def test_quick_training_writes_loadable_checkpoints(tmp_path: Path) -> None:
    assert train_demo.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in (train_demo.DRAFT_NAME, train_demo.TARGET_NAME):
        loaded = load_model(tmp_path / name)
        tok = load_tokenizer(tmp_path / name)
        assert loaded.args.vocab_size == len(tok)
        state = ModelEngine(loaded).start(tok("spell 12").input_ids)
        assert state.length == 1
