"""Tensor-parallel T5 (specdec_core/tensor_parallel.py) against the unsharded model.

Two real ranks: ``mlx.launch --backend ring -n 2`` runs tests/tp_rank.py once over both tiny
float32 families (v1.0: relu, tied head; v1.1: gated-gelu, untied head). Each rank loads its
slices, encodes a prompt and decodes a block plus greedy steps with a cache; the tests
compare the ranks with each other and with the unsharded model run here. Launcher-free
tests cover a world of one, bad divisibility, and the slicing itself (with stand-in groups:
loading needs only rank and size, no communication).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx  # conftest imported specdec_core (OpenBLAS) before this
import numpy as np
import pytest
from mlx.utils import tree_flatten
from ring import fail_ring_start, skip_without_ring_backend
from tp_rank import KV_BITS, run_greedy

from specdec_core.checkpoint import load_model, save_model
from specdec_core.errors import CheckpointError
from specdec_core.tensor_files import SafetensorsFiles
from specdec_core.tensor_parallel import load_sharded, shard_model, weight_nbytes

ATOL = 1e-4
RANKS = 2
LAUNCH_TIMEOUT_S = 90.0  # two shared cores: two ranks import MLX and load two models each
RANK_SCRIPT = Path(__file__).with_name("tp_rank.py")
# What every rank keeps whole: embeddings, layer norms, lm head. Everything else (attention
# q/k/v/o, feed-forward wi/wi_0/wi_1/wo, relative-position-bias tables) is split in half.
REPLICATED = re.compile(r"^(shared|lm_head)\.weight$|\.ln\d\.weight$|_norm\.weight$")


@dataclass
class StandInGroup:
    """Rank and size of a group that is never communicated over."""

    rank_: int
    size_: int

    def rank(self) -> int:
        return self.rank_

    def size(self) -> int:
        return self.size_


def _params(model) -> dict[str, np.ndarray]:
    return {name: np.array(value.astype(mx.float32)) for name, value in tree_flatten(model.parameters())}


# -- two ranks over the ring ---------------------------------------------------------------------


def _port_pair() -> int:
    """A port p with p and p + 1 free now: mlx.launch gives rank r port p + r (not its fixed
    default, which concurrent runs on this machine would share)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two adjacent free ports")


def _launch(out: Path, checkpoints: list[Path]) -> str:
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    if launcher is None:  # installed with every MLX that has the ring backend
        pytest.fail("mlx.launch is not installed beside this Python or on PATH")
    command = [launcher, "--backend", "ring", "-n", str(RANKS), "--starting-port", str(_port_pair()),
               sys.executable, str(RANK_SCRIPT), str(out), *map(str, checkpoints)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")  # two ranks on two shared cores
    # Its own session, so a hung ring is killed with every rank it started.
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        return proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0] + f"\n[killed after {LAUNCH_TIMEOUT_S:.0f} s]"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, t5_v10_dir: Path, t5_v11_dir: Path):
    """Per family: (the unsharded model's run, the two ranks' runs, the unsharded model, its run with
    a KV_BITS cache)."""
    skip_without_ring_backend()  # a ring that is available but does not start fails (tests/ring.py)
    out = tmp_path_factory.mktemp("tp")
    checkpoints = [t5_v10_dir, t5_v11_dir]
    output = _launch(out, checkpoints)  # mlx.launch exits 0 even when a rank failed
    if not all((out / f"ring-ok-{rank}").is_file() for rank in range(RANKS)):
        fail_ring_start(output[-3000:])
    results = {}
    for i, checkpoint in enumerate(checkpoints):
        files = [out / f"{i}-{rank}.npz" for rank in range(RANKS)]
        assert all(f.is_file() for f in files), f"a rank failed on {checkpoint.name}:\n{output[-6000:]}"
        unsharded = load_model(checkpoint)
        results[checkpoint.name] = (run_greedy(unsharded.model), [dict(np.load(f)) for f in files], unsharded,
                                    run_greedy(unsharded.model, KV_BITS))
    return results


def test_ranks_compute_identical_logits(two_ranks) -> None:
    for _, ranks, *_ in two_ranks.values():
        for key in ("cached", "uncached", "split_cached", "tokens", "kv_cached", "kv_tokens"):
            assert np.array_equal(ranks[0][key], ranks[1][key]), key


def test_logits_match_the_unsharded_model(two_ranks) -> None:
    """Cached block + single steps, the uncached pass, and a model split after full loading."""
    for name, (expected, ranks, *_) in two_ranks.items():
        got = ranks[0]
        for key, reference in (("cached", "cached"), ("uncached", "uncached"), ("split_cached", "cached")):
            err = float(np.abs(got[key] - expected[reference]).max())
            print(f"{name} {key}: max |sharded - unsharded| = {err:.3g} "
                  f"(max |logit| {np.abs(expected[reference]).max():.3g})")
            assert err <= ATOL, f"{name} {key}: {err:.3g} > {ATOL}"


def test_greedy_tokens_match_the_unsharded_model(two_ranks) -> None:
    for expected, ranks, *_ in two_ranks.values():
        assert ranks[0]["tokens"].tolist() == expected["tokens"].tolist()


def test_a_quantized_cache_on_two_ranks_matches_the_unsharded_model_with_the_same_cache(two_ranks) -> None:
    """--kv-bits on a tensor-parallel target: each rank quantizes the K/V of its own heads, per
    position and head, as the unsharded model quantizes the same heads."""
    for name, (_, ranks, _, expected) in two_ranks.items():
        err = float(np.abs(ranks[0]["kv_cached"] - expected["cached"]).max())
        print(f"{name} {KV_BITS}-bit cache: max |sharded - unsharded| = {err:.3g}")
        assert err <= ATOL, f"{name}: {err:.3g} > {ATOL}"
        assert ranks[0]["kv_tokens"].tolist() == expected["tokens"].tolist()


def test_each_rank_holds_half_of_the_split_weights(two_ranks) -> None:
    """Per rank: every replicated byte plus exactly half of all others; and loading it never
    held more than the whole unsharded model (no full copy was materialised)."""
    for name, (_, ranks, unsharded, _) in two_ranks.items():
        params = dict(tree_flatten(unsharded.model.parameters()))
        replicated = sum(v.nbytes for k, v in params.items() if REPLICATED.search(k))
        split = weight_nbytes(unsharded.model) - replicated
        expected = replicated + split // RANKS
        for rank in ranks:
            print(f"{name}: rank holds {int(rank['weight_nbytes'])} B (replicated {replicated} + "
                  f"split {split} / {RANKS}); one process {weight_nbytes(unsharded.model)} B; "
                  f"peak while loading {int(rank['load_peak_bytes'])} B")
            assert int(rank["weight_nbytes"]) == expected
            assert int(rank["load_peak_bytes"]) < weight_nbytes(unsharded.model)


# -- no launcher -------------------------------------------------------------------------------------


def test_a_world_of_one_is_the_unsharded_model(family_dir: Path) -> None:
    group = mx.distributed.init()  # no launcher: the singleton group
    assert group.size() == 1
    reference = load_model(family_dir)
    loaded = load_sharded(family_dir, group)
    expected, got = _params(reference.model), _params(loaded.model)
    assert expected.keys() == got.keys()
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    assert loaded.dtype == reference.dtype and loaded.args == reference.args
    model = reference.model
    assert shard_model(model, group) is model and model.encoder_layers[0].self_attn.num_heads == 4
    assert all(np.array_equal(expected[k], v) for k, v in _params(model).items())


def test_sizes_that_do_not_divide_are_refused(t5_v10_dir: Path) -> None:
    three = StandInGroup(0, 3)  # num_heads 4, d_ff 128
    with pytest.raises(CheckpointError, match=r"num_heads = 4 and d_ff = 128 are not divisible by 3"):
        load_sharded(t5_v10_dir, three)
    model = load_model(t5_v10_dir).model
    before = _params(model)
    with pytest.raises(CheckpointError, match="not divisible by 3"):
        shard_model(model, three)
    assert all(np.array_equal(before[k], v) for k, v in _params(model).items())  # untouched


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sliced_loading_equals_splitting_the_loaded_model(t5_v11_dir: Path, tmp_path: Path, dtype: str) -> None:
    """Per rank, reading slices gives the parameters that splitting the full model gives; the
    ranks' parts together are the whole. bfloat16 is a converted (our names) directory, which
    is read as raw bytes (numpy has no bfloat16)."""
    source = save_model(load_model(t5_v11_dir, dtype="bfloat16"), tmp_path) if dtype == "bfloat16" else t5_v11_dir
    full = _params(load_model(source).model)
    parts = []
    for rank in range(RANKS):
        group = StandInGroup(rank, RANKS)
        sliced = load_sharded(source, group)
        assert sliced.dtype == dtype
        got, split = _params(sliced.model), _params(shard_model(load_model(source).model, group))
        assert got.keys() == split.keys() == full.keys()
        assert all(np.array_equal(got[k], split[k]) for k in got)
        assert sliced.model.decoder_layers[0].cross_attn.num_heads == 2
        parts.append(got)
    q = "decoder_layers.1.cross_attn.q.weight"
    assert np.array_equal(np.concatenate([p[q] for p in parts], axis=0), full[q])
    wo = "encoder_layers.0.mlp.wo.weight"
    assert np.array_equal(np.concatenate([p[wo] for p in parts], axis=1), full[wo])


def test_bfloat16_slices_read_only_the_part(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    table = mx.arange(6 * 8, dtype=mx.float32).reshape(6, 8).astype(mx.bfloat16)
    mx.save_safetensors(str(file), {"a": mx.ones((3,)), "t": table})
    slices = SafetensorsFiles([file])
    assert slices.shape("t") == (6, 8)
    got = slices.read_slice("t", (slice(None), slice(4, 8)))
    assert got.dtype == mx.bfloat16 and mx.array_equal(got, table[:, 4:]).item()
    assert mx.array_equal(slices.read_slice("t", (slice(2, 4), slice(None))), table[2:4]).item()
