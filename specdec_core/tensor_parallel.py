"""Tensor-parallel T5: one model spread over the ranks of an ``mx.distributed`` group.

Megatron-style splitting, so that no rank holds the whole model and every rank ends with
the same activations:

- q, k, v (self- and cross-attention) and wi / wi_0 / wi_1 are column-parallel
  (``nn.AllToShardedLinear``): rank r keeps the output rows of its heads, or of its slice of
  d_ff. Heads are independent, so attention on a rank's heads needs no communication; cross
  K/V, projected once per session by the sharded k/v, hold the rank's heads only.
- o and wo are row-parallel (``nn.ShardedToAllLinear``): rank r keeps the matching input
  columns, and one ``all_sum`` per block adds the ranks' partial outputs, so the residual
  stream is whole and identical everywhere (2 all_sums per encoder layer, 3 per decoder layer).
- The relative-position-bias tables (num_buckets, num_heads) keep the rank's head columns,
  and every Attention's ``num_heads`` is the rank's head count (``heads`` reshapes with it).
- Embeddings, layer norms and the lm head are replicated: every rank computes the same logits.

Rank r owns the r-th of ``size`` equal contiguous parts of each split axis (heads
r*H/N .. (r+1)*H/N - 1), the same partition MLX's own sharded layers use. Everything works by
replacing modules and weights of a ``T5`` in place, so the model's code needs no change.

``shard_model`` splits a model already in memory; ``load_sharded`` reads only the rank's
slice of each tensor from safetensors, so no rank ever holds the whole checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import (
    LoadedModel,
    cast_floating,
    check_dtype,
    check_dtypes,
    check_shapes,
    choose_activations,
    choose_dtype,
    drop_tied_head,
    our_names,
    read_config,
    resolve_model_path,
)
from .errors import CheckpointError
from .t5 import T5, Attention, FeedForward, ModelArgs
from .tensor_files import SafetensorsFiles, open_safetensors

logger = logging.getLogger(__name__)

# Our parameter names by how they are split. Weights of nn.Linear are (out, in).
_COLUMN_PARALLEL = re.compile(r"\.(self_attn|cross_attn)\.[qkv]\.weight$|\.mlp\.wi(_0|_1)?\.weight$")
_ROW_PARALLEL = re.compile(r"\.(self_attn|cross_attn)\.o\.weight$|\.mlp\.wo\.weight$")
_HEAD_TABLE = re.compile(r"^(encoder|decoder)_bias\.embeddings\.weight$")  # (num_buckets, num_heads)


def shard_axis(name: str) -> int | None:
    """The axis of parameter ``name`` (our names) split across ranks; None when replicated."""
    if _COLUMN_PARALLEL.search(name):
        return 0  # output rows: the rank's heads / d_ff columns
    if _ROW_PARALLEL.search(name) or _HEAD_TABLE.match(name):
        return 1  # input columns (or table columns) of the same heads / d_ff columns
    return None


def shard_index(name: str, shape: tuple[int, ...], rank: int, size: int) -> tuple[slice, ...]:
    """The index of rank ``rank``'s part of a parameter of full ``shape`` (all of it if replicated)."""
    index = [slice(None)] * len(shape)
    axis = shard_axis(name)
    if axis is not None and size > 1:
        part = shape[axis] // size
        index[axis] = slice(rank * part, (rank + 1) * part)
    return tuple(index)


def check_divisible(args: ModelArgs, size: int) -> None:
    """Heads and feed-forward columns must split evenly: every rank gets an equal part."""
    problems = [
        f"{what} = {value}"
        for what, value in (("num_heads", args.num_heads), ("d_ff", args.d_ff))
        if value % size
    ]
    if problems:
        raise CheckpointError(
            f"cannot split this T5 over {size} ranks: {' and '.join(problems)} "
            f"{'is' if len(problems) == 1 else 'are'} not divisible by {size}; "
            "choose a world size that divides both num_heads and d_ff"
        )


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds (its shard when sharded)."""
    return sum(value.nbytes for _, value in tree_flatten(model.parameters()))


def is_sharded(model: T5) -> bool:
    return any(isinstance(attn.o, nn.ShardedToAllLinear) for attn in _attentions(model))


# -- the model's structure ---------------------------------------------------------------------


def _attentions(model: T5) -> Iterator[Attention]:
    for layer in model.encoder_layers:
        yield layer.self_attn
    for layer in model.decoder_layers:
        yield layer.self_attn
        yield layer.cross_attn


def _feed_forwards(model: T5) -> Iterator[FeedForward]:
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        yield layer.mlp


def _plain_linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear) or "bias" in module:
        # Quantized row-parallel layers would also need d/N divisible by the group size.
        raise CheckpointError(
            f"tensor parallelism needs the unquantized, bias-free linear layers of T5, not "
            f"{type(module).__name__}; shard the float checkpoint (quantize after sharding is "
            "not supported yet)"
        )
    return module


def _column_parallel(linear: nn.Module, group: mx.distributed.Group) -> nn.AllToShardedLinear:
    out_dims, in_dims = _plain_linear(linear).weight.shape
    return nn.AllToShardedLinear(in_dims, out_dims, bias=False, group=group)


def _row_parallel(linear: nn.Module, group: mx.distributed.Group) -> nn.ShardedToAllLinear:
    out_dims, in_dims = _plain_linear(linear).weight.shape
    return nn.ShardedToAllLinear(in_dims, out_dims, bias=False, group=group)


def _shard_modules(model: T5, group: mx.distributed.Group) -> None:
    """Give every split module its shard's shape and type; the weights are set afterwards.

    The new layers start with random weights of the shard's shape; MLX arrays are lazy, so
    neither those nor the replaced full-size ones are computed if nothing evaluates them.
    """
    size = group.size()
    for attn in _attentions(model):
        attn.q = _column_parallel(attn.q, group)
        attn.k = _column_parallel(attn.k, group)
        attn.v = _column_parallel(attn.v, group)
        attn.o = _row_parallel(attn.o, group)
        attn.num_heads //= size  # the reshape into heads (t5.py) uses it
    for mlp in _feed_forwards(model):
        for name in ("wi_0", "wi_1") if mlp.gated else ("wi",):
            setattr(mlp, name, _column_parallel(getattr(mlp, name), group))
        mlp.wo = _row_parallel(mlp.wo, group)
    for bias in (model.encoder_bias, model.decoder_bias):
        buckets, heads = bias.embeddings.weight.shape
        bias.embeddings = nn.Embedding(buckets, heads // size)


def shard_model(model: T5, group: mx.distributed.Group) -> T5:
    """Split a loaded model across ``group`` in place (see the module docstring); return it.

    Every rank must call it on the same model. A group of one leaves the model unchanged.
    """
    size = group.size()
    check_divisible(model.args, size)
    if size == 1:
        return model
    if is_sharded(model):
        raise ValueError("this model is already sharded")
    full = tree_flatten(model.parameters())
    _shard_modules(model, group)
    rank = group.rank()
    model.load_weights(
        [(name, value[shard_index(name, value.shape, rank, size)]) for name, value in full],
        strict=True,
    )
    mx.eval(model.parameters())  # copies the slices; the full arrays go with their last reference
    return model


# -- loading only this rank's slices -----------------------------------------------------------


def load_sharded(
    name_or_dir: str | os.PathLike[str],
    group: mx.distributed.Group,
    dtype: str | None = None,
) -> LoadedModel:
    """Load this rank's shard of a safetensors T5 checkpoint (HF or ``specdec-convert`` output).

    Reads each sharded tensor's slice only, so a rank's memory is its shard plus the
    replicated embeddings, norms and head. Names and dtypes follow ``load_model``: ``dtype``
    None keeps the stored one (float16 becomes float32). Quantized checkpoints and
    ``pytorch_model.bin`` are refused: convert the float checkpoint to safetensors first.
    """
    check_dtype(dtype)
    path = resolve_model_path(name_or_dir)
    config = read_config(path)
    if (config.get("specdec") or {}).get("quantization"):
        raise CheckpointError(f"{path} is quantized; tensor-parallel loading needs a float checkpoint")
    args = ModelArgs.from_dict(config)
    check_divisible(args, group.size())
    tensors = _open_safetensors(path)
    stored = our_names(tensors.names())

    rank, size = group.rank(), group.size()

    def read(ours: str) -> mx.array:
        theirs = stored[ours]
        return tensors.read_slice(theirs, shard_index(ours, tensors.shape(theirs), rank, size))

    # The replicated embedding and head first: whether the head is tied, and the stored dtype.
    replicated = {name: read(name) for name in ("shared.weight", "lm_head.weight") if name in stored}
    drop_tied_head(replicated)
    args.untied_lm_head = "lm_head.weight" in replicated
    if not args.untied_lm_head:
        stored.pop("lm_head.weight", None)
    chosen = choose_dtype(replicated, dtype)

    model = T5(args)  # lazy: its random initial weights are never computed
    check_shapes(
        {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())},
        {ours: tensors.shape(theirs) for ours, theirs in stored.items()},
        path,
    )
    check_dtypes(model, stored, tensors, path)
    if size > 1:
        _shard_modules(model, group)
    weights: list[tuple[str, mx.array]] = []
    for ours in stored:
        value = cast_floating(replicated.pop(ours) if ours in replicated else read(ours), chosen)
        mx.eval(value)  # one tensor at a time: the stored-dtype copy is freed before the next
        weights.append((ours, value))
    model.load_weights(weights, strict=True)
    model.eval()
    mx.eval(model.parameters())
    choose_activations(model, chosen, None)
    logger.info("rank %d/%d holds %.1f MB of weights", rank, size, weight_nbytes(model) / 1e6)
    return LoadedModel(model, args, path, str(name_or_dir), chosen, None)


def _open_safetensors(path: Path) -> SafetensorsFiles:
    files = open_safetensors(path)
    if files is None:
        raise CheckpointError(
            f"{path} has no safetensors weights; tensor-parallel loading reads slices of "
            "model.safetensors (or its sharded index): convert the checkpoint with specdec-convert"
        )
    return files
