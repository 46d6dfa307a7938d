"""Shared fixtures: tiny T5 checkpoints built offline once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

import specdec_core  # noqa: F401 - load OpenBLAS before anything imports MLX
from specdec_tools.tiny_checkpoints import build_t5, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def t5_v10_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """v1.0 family: relu FFN, tied + scaled lm head."""
    return build_t5(tmp_path_factory.mktemp("t5_v10"), tokenizer_dir, "v1_0", seed=1)


@pytest.fixture(scope="session")
def t5_v11_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """v1.1 / flan family: gated-gelu FFN, untied lm head, no scaling."""
    return build_t5(tmp_path_factory.mktemp("t5_v11"), tokenizer_dir, "v1_1", seed=2)


@pytest.fixture(scope="session")
def draft_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A smaller v1.1 model sharing the tokenizer: the draft of a speculative pair."""
    return build_t5(tmp_path_factory.mktemp("draft"), tokenizer_dir, "v1_1", seed=3,
                    d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)


@pytest.fixture(scope="session")
def target_dir(t5_v11_dir: Path) -> Path:
    """The target of a speculative pair (the v1.1 tiny model)."""
    return t5_v11_dir


@pytest.fixture(params=["v1_0", "v1_1"])
def family_dir(request: pytest.FixtureRequest, t5_v10_dir: Path, t5_v11_dir: Path) -> Path:
    return t5_v10_dir if request.param == "v1_0" else t5_v11_dir
