"""One rank of tests/test_tensor_parallel.py, started by ``mlx.launch --backend ring``.

``python tp_rank.py OUT_DIR CHECKPOINT...``: joins the ring, writes ``ring-ok-<rank>`` once an
all_sum went through (so the test can tell "the ring cannot start here" from a failure of
the sharding), then for each checkpoint i loads this rank's shard two ways (sliced loading,
and splitting a fully loaded model) and saves what ``run_greedy`` gives as ``<i>-<rank>.npz``
(sliced loading also with a quantized K/V cache, ``kv_*``).
``run_greedy`` is also what the test runs on the unsharded model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from specdec_core import blas

blas.preload()  # before the first MLX import (see specdec_core.blas)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from specdec_core.t5 import T5  # noqa: E402

PROMPT_LEN = 13
FORCED = 3  # decoder start + two tokens fed as one block: the multi-token cached path
STEPS = 6  # then greedy single-token steps
KV_BITS = 8  # the quantized cache's run (--kv-bits)


def run_greedy(model: T5, kv_bits: int | None = None) -> dict[str, np.ndarray]:
    """Encode a fixed prompt, decode a block then greedy tokens with a cache (quantized to
    ``kv_bits``); and the same tokens once more without a cache. Logits of every position, float32."""
    from specdec_core.kv_cache import KVQuantization

    vocab = model.args.vocab_size
    prompt = np.random.default_rng(0).integers(3, vocab, size=(1, PROMPT_LEN))
    encoded = model.encode(mx.array(prompt))
    cache = model.make_cache(encoded, None if kv_bits is None else KVQuantization.for_heads(kv_bits, model.args.d_kv))
    tokens = [model.args.decoder_start_token_id, *prompt[0, : FORCED - 1].tolist()]
    steps = [model.decode(mx.array([tokens]), cache=cache)[0]]
    for _ in range(STEPS):
        tokens.append(int(mx.argmax(steps[-1][-1]).item()))
        steps.append(model.decode(mx.array([tokens[-1:]]), cache=cache)[0])
    uncached = model.decode(mx.array([tokens[:-1]]), encoder_output=encoded)[0]
    return {
        "cached": np.array(mx.concatenate(steps)),
        "uncached": np.array(uncached),
        "tokens": np.array(tokens),
    }


def run_rank(checkpoint: str, group: mx.distributed.Group, out: Path) -> None:
    """Both ways of sharding one checkpoint; a function so nothing outlives it into the next."""
    from specdec_core.checkpoint import load_model
    from specdec_core.tensor_parallel import load_sharded, shard_model, weight_nbytes

    mx.reset_peak_memory()
    loaded = load_sharded(checkpoint, group)
    peak = mx.get_peak_memory()
    sliced = run_greedy(loaded.model)
    quantized = run_greedy(loaded.model, KV_BITS)  # each rank caches its own heads, quantized
    split = run_greedy(shard_model(load_model(checkpoint).model, group))
    np.savez(out, **sliced, split_cached=split["cached"], weight_nbytes=weight_nbytes(loaded.model),
             load_peak_bytes=peak, kv_cached=quantized["cached"], kv_tokens=quantized["tokens"])


def main() -> None:
    out, checkpoints = Path(sys.argv[1]), sys.argv[2:]
    group = mx.distributed.init(strict=True, backend="ring")
    rank = group.rank()
    mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
    (out / f"ring-ok-{rank}").write_text(str(group.size()))
    for i, checkpoint in enumerate(checkpoints):
        run_rank(checkpoint, group, out / f"{i}-{rank}.npz")


if __name__ == "__main__":
    main()
