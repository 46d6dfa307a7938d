"""Shared fixtures: tiny T5 checkpoints built offline once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec_core import blas

blas.preload()  # OpenBLAS goes global before anything imports MLX (see specdec_core.blas)

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


def _noisy_copy(source: Path, out: Path, noise: float, seed: int) -> Path:
    """A copy of a checkpoint with Gaussian noise on every weight: a draft that agrees with
    its target often but not always, so both acceptance and rejection paths run."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out, dirs_exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = load_file(str(out / "model.safetensors"))
    noisy = {
        name: (w + rng.normal(0.0, noise * float(w.std() or 1.0), w.shape)).astype(w.dtype)
        for name, w in weights.items()
    }
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def near_draft_dir(tmp_path_factory: pytest.TempPathFactory, t5_v11_dir: Path) -> Path:
    """The target (t5_v11_dir) with noise: a draft with moderate acceptance."""
    return _noisy_copy(t5_v11_dir, tmp_path_factory.mktemp("near_draft"), noise=0.3, seed=7)


@pytest.fixture(scope="module")
def loop():  # type: ignore[no-untyped-def]
    """An event loop in a background thread for in-process servers (see harness.py)."""
    from harness import LoopThread

    thread = LoopThread()
    yield thread
    thread.close()
