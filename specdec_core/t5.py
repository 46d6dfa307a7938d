"""T5 encoder-decoder in MLX: both families, cached decoding with block appends and rollback.

- v1.0 (t5-small ... t5-11b): relu FFN, lm head tied to the shared embedding, decoder output
  scaled by d_model**-0.5 before the head.
- v1.1 / flan-t5: gated-gelu FFN, untied ``lm_head``, no scaling.

Attention is unscaled (T5 folds 1/sqrt(d_kv) into its initialisation). Relative position
bias lives in the first layer of each stack and is shared by all layers; cross-attention has
none. Names of HF checkpoints are mapped to ours in ``sanitize``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import CheckpointError, InvalidArgument
from .fast_tanh import tanh
from .kv_cache import KV, DecoderCache, KVQuantization, LayerKVCache, QuantizedKV
from .relative_position import RelativePositionBias, _distance_buckets


@dataclass
class ModelArgs:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as the encoder (HF's default)
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1 / flan-t5)
    scale_decoder_outputs: bool = True  # v1.0 scales by d_model**-0.5 before the tied head
    untied_lm_head: bool = False  # v1.1 has its own lm_head; decided by the weights present
    decoder_start_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from an HF ``config.json`` dict, ignoring keys we do not use."""
        model_type = config.get("model_type")
        if model_type not in ("t5", None) or (
            model_type is None and "d_kv" not in config
        ):
            raise CheckpointError(
                f"config.json describes a {model_type or 'non-T5'} model; specdec serves T5 "
                "(t5-*, google/t5-v1_1-*, google/flan-t5-*) checkpoints only"
            )
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in config.items() if k in known}
        if "scale_decoder_outputs" not in config:
            # Pre-transformers-5 configs: v1.1 marks itself with tie_word_embeddings=false.
            args["scale_decoder_outputs"] = config.get("tie_word_embeddings", True) is not False
        eos = config.get("eos_token_id", 1)
        args["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
        for name in ("decoder_start_token_id", "pad_token_id"):
            if args.get(name) is None:
                args.pop(name, None)
        ffn = args.get("feed_forward_proj", "relu")
        if ffn.split("-")[-1] not in ("relu", "gelu", "gelu_new") or ffn.count("-") > 1:
            raise CheckpointError(f"unsupported feed_forward_proj {ffn!r} in config.json")
        return cls(**args)


def attend(queries: mx.array, keys: KV, values: KV, bias: mx.array | None) -> mx.array:
    """Unscaled attention of (B, H, L, d_kv) queries over (B, H, S, d_kv) keys/values; scores and
    softmax in float32."""
    if isinstance(keys, QuantizedKV):
        return attend_quantized(queries, keys, values, bias)
    scores = queries @ keys.transpose(0, 1, 3, 2)  # (B, H, L, S)
    if scores.dtype != mx.float32:  # (a cast is one more graph node per session and layer)
        scores = scores.astype(mx.float32)
    if bias is not None:
        scores = scores + bias
    weights = mx.softmax(scores, axis=-1)
    if weights.dtype != values.dtype:
        weights = weights.astype(values.dtype)
    return weights @ values


def attend_quantized(queries: mx.array, keys: QuantizedKV, values: QuantizedKV, bias: mx.array | None
                     ) -> mx.array:
    """``attend`` over a quantized cache: the same float32 scores, bias and softmax, with both
    matmuls reading the packed K/V directly (no dequantized copy of the cache)."""
    spec = keys.quantization
    if spec.stored_dim != spec.head_dim:  # zero query columns meet the keys' zero padding
        queries = mx.pad(queries, [(0, 0), (0, 0), (0, 0), (0, spec.stored_dim - spec.head_dim)])
    scores = mx.quantized_matmul(queries, *keys.arrays, transpose=True, group_size=spec.group_size,
                                 bits=spec.bits)  # (B, H, L, S)
    if scores.dtype != mx.float32:
        scores = scores.astype(mx.float32)
    if bias is not None:
        scores = scores + bias
    weights = mx.softmax(scores, axis=-1)
    if weights.dtype != values.scales.dtype:
        weights = weights.astype(values.scales.dtype)
    out = mx.quantized_matmul(weights, *values.arrays, transpose=False, group_size=spec.group_size,
                              bits=spec.bits)  # (B, H, L, stored_dim)
    return out if spec.stored_dim == spec.head_dim else out[..., : spec.head_dim]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        inner = args.num_heads * args.d_kv
        self.num_heads = args.num_heads
        self.q = nn.Linear(args.d_model, inner, bias=False)
        self.k = nn.Linear(args.d_model, inner, bias=False)
        self.v = nn.Linear(args.d_model, inner, bias=False)
        self.o = nn.Linear(inner, args.d_model, bias=False)

    def heads(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, d_kv)

    @staticmethod
    def merge(x: mx.array) -> mx.array:
        """(B, H, L, d_kv) -> (B, L, H * d_kv), the inverse of ``heads``."""
        B, _, L, _ = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, L, -1)

    def project_kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return self.heads(self.k(x)), self.heads(self.v(x))

    def __call__(
        self,
        x: mx.array,
        keys: mx.array,
        values: mx.array,
        bias: mx.array | None,
    ) -> mx.array:
        return self.o(self.merge(attend(self.heads(self.q(x)), keys, values, bias)))

    def ragged(
        self, queries: mx.array, spans: list[tuple[int, int]], kvs: list[tuple[KV, KV]],
        biases: list[mx.array | None],
    ) -> mx.array:
        """Many sessions' queries (1, H, N, d_kv), session i at positions spans[i], each attending
        over its own keys/values: the output projection of all of them in one matmul."""
        if len(spans) == 1:
            out = attend(queries, *kvs[0], biases[0])
        else:
            out = mx.concatenate(
                [attend(queries[:, :, a:b], k, v, bias) for (a, b), (k, v), bias in zip(spans, kvs, biases, strict=True)],
                axis=2,
            )
        return self.o(self.merge(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gated = args.gated
        self.activation = args.activation
        if self.gated:
            self.wi_0 = nn.Linear(args.d_model, args.d_ff, bias=False)
            self.wi_1 = nn.Linear(args.d_model, args.d_ff, bias=False)
        else:
            self.wi = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.wo = nn.Linear(args.d_ff, args.d_model, bias=False)

    def _act(self, x: mx.array) -> mx.array:
        if self.activation == "relu":
            return nn.relu(x)
        if self.activation == "gelu_new" or self.gated:  # HF maps gated-gelu to the tanh form
            # x * x * x, not x**3: MLX's CPU power is a third of this function's time
            return 0.5 * x * (1.0 + tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))
        return nn.gelu(x)

    def __call__(self, x: mx.array) -> mx.array:
        if self.gated:
            return self.wo(self._act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self._act(self.wi(x)))


class RMSNorm(nn.Module):
    """T5LayerNorm: no mean subtraction, no bias, statistics in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class EncoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.ln1 = RMSNorm(args.d_model, args.layer_norm_epsilon)
        self.mlp = FeedForward(args)
        self.ln2 = RMSNorm(args.d_model, args.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        h = self.ln1(x)
        x = x + self.self_attn(h, *self.self_attn.project_kv(h), bias)
        return x + self.mlp(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.ln1 = RMSNorm(args.d_model, args.layer_norm_epsilon)
        self.cross_attn = Attention(args)
        self.ln2 = RMSNorm(args.d_model, args.layer_norm_epsilon)
        self.mlp = FeedForward(args)
        self.ln3 = RMSNorm(args.d_model, args.layer_norm_epsilon)

    def __call__(
        self,
        x: mx.array,
        self_bias: mx.array,
        cross_kv: tuple[mx.array, mx.array],
        cross_bias: mx.array | None,
    ) -> mx.array:
        """A padded batch from position 0, no cache (teacher forcing, references)."""
        h = self.ln1(x)
        x = x + self.self_attn(h, *self.self_attn.project_kv(h), self_bias)
        x = x + self.cross_attn(self.ln2(x), *cross_kv, cross_bias)
        return x + self.mlp(self.ln3(x))

    def ragged(
        self,
        x: mx.array,
        spans: list[tuple[int, int]],
        self_biases: list[mx.array | None],
        caches: list[LayerKVCache],
        cross: list[tuple[KV, KV]],
    ) -> mx.array:
        """Many sessions' new positions concatenated, (1, N, d_model), session i at spans[i].

        Norms, projections and the feed-forward run once over all N rows (the batch's gain);
        attention runs per session on its own cache and cross K/V, so no cache is copied or
        padded and each session's rows see only its own positions.
        """
        h = self.ln1(x)
        attn = self.self_attn
        queries = attn.heads(attn.q(h))
        keys, values = attn.project_kv(h)
        if len(spans) == 1:
            kvs = [caches[0].update_and_fetch(keys, values)]
        else:
            kvs = [cache.update_and_fetch(keys[:, :, a:b], values[:, :, a:b])
                   for (a, b), cache in zip(spans, caches, strict=True)]
        x = x + attn.ragged(queries, spans, kvs, self_biases)
        cross_attn = self.cross_attn
        x = x + cross_attn.ragged(cross_attn.heads(cross_attn.q(self.ln2(x))), spans, cross,
                                  [None] * len(spans))
        return x + self.mlp(self.ln3(x))


def _padding_bias(mask: mx.array | None) -> mx.array | None:
    """(B, S) 1/0 mask -> additive (B, 1, 1, S) bias; None means no padding."""
    if mask is None:
        return None
    return mx.where(mask[:, None, None, :].astype(mx.bool_), 0.0, -1e9).astype(mx.float32)


class T5(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder_layers = [EncoderLayer(args) for _ in range(args.num_layers)]
        self.encoder_bias = RelativePositionBias(args, bidirectional=True)
        self.encoder_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)
        self.decoder_layers = [DecoderLayer(args) for _ in range(args.num_decoder_layers)]
        self.decoder_bias = RelativePositionBias(args, bidirectional=False)
        self.decoder_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)
        if args.untied_lm_head:
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        # The activations' dtype; None: the weights'. The loader sets float32 on a CPU, where
        # 16-bit math is slow (specdec_core/numerics.py).
        self.activation_dtype: mx.Dtype | None = None

    def embed(self, ids: mx.array) -> mx.array:
        """Token embeddings, in ``activation_dtype``: every later activation follows them."""
        x = self.shared(ids)
        wanted = self.activation_dtype
        return x if wanted is None or wanted == x.dtype else x.astype(wanted)

    # -- encoder ------------------------------------------------------------------------
    def encode(self, input_ids: mx.array, mask: mx.array | None = None) -> mx.array:
        """(B, L) token ids -> (B, L, d_model) encoder output. ``mask`` is 1 for real tokens. The ids
        are trusted to lie in the vocabulary (``SessionHost`` checks every request's before it runs)."""
        x = self.embed(input_ids)
        L = input_ids.shape[1]
        bias = self.encoder_bias(0, L, L)
        padding = _padding_bias(mask)
        if padding is not None:
            bias = bias + padding
        for layer in self.encoder_layers:
            x = layer(x, bias)
        return self.encoder_norm(x)

    # -- decoder ------------------------------------------------------------------------
    def make_cache(self, encoder_output: mx.array, quantization: KVQuantization | None = None) -> DecoderCache:
        """A fresh session cache; cross-attention K/V are projected here, once (and quantized
        once, with ``quantization``, as the self-attention K/V will be at each append)."""
        cross: list[tuple[KV, KV]]
        if quantization is None:
            # Stored contiguous: the projection's head split is a strided view, which every later
            # attention matmul would otherwise copy again, for every session and layer of every step.
            cross = [tuple(mx.contiguous(a) for a in layer.cross_attn.project_kv(encoder_output))
                     for layer in self.decoder_layers]
            mx.eval(cross)
        else:
            cross = [tuple(quantization.quantize(a) for a in layer.cross_attn.project_kv(encoder_output))
                     for layer in self.decoder_layers]
            mx.eval([kv.arrays for pair in cross for kv in pair])
        return DecoderCache(layers=[LayerKVCache(quantization) for _ in self.decoder_layers], cross=cross)

    def decode(
        self,
        tokens: mx.array,
        cache: DecoderCache | None = None,
        encoder_output: mx.array | None = None,
        encoder_mask: mx.array | None = None,
        num_logits: int | None = None,
    ) -> mx.array:
        """Run the decoder over (B, n) new tokens; return float32 logits (B, num_logits, V).

        With a cache (B = 1) the tokens are appended after ``cache.length`` positions, as
        ``decode_sessions`` does for many sessions; without one they start at position 0 and
        cross K/V come from ``encoder_output``. The lm head runs only on the last
        ``num_logits`` positions (all when None).
        """
        n = tokens.shape[1]
        if num_logits is not None and not 0 <= num_logits <= n:
            raise InvalidArgument(f"num_logits must be in [0, {n}] for {n} decoder tokens, got {num_logits}")
        if cache is not None:
            if tokens.shape[0] != 1:
                raise InvalidArgument("a cache holds one session: decode (1, n) tokens with it")
            return self.decode_sessions([tokens[0].tolist()], [cache], [n if num_logits is None else num_logits]
                                        )[0][None]
        if encoder_output is None:
            raise InvalidArgument("decode without a cache needs encoder_output")
        bias = self._self_bias(0, n)
        cross_kvs = [layer.cross_attn.project_kv(encoder_output) for layer in self.decoder_layers]
        cross_bias = _padding_bias(encoder_mask)
        x = self.embed(tokens)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, bias, cross_kvs[i], cross_bias)
        if num_logits is not None:
            x = x[:, n - num_logits :, :]
        return self.logits(self.decoder_norm(x))

    def decode_sessions(
        self, tokens: Sequence[Sequence[int]], caches: Sequence[DecoderCache], num_logits: Sequence[int]
    ) -> list[mx.array]:
        """Many sessions' new tokens in ONE decoder pass (a ragged batch).

        Session i appends ``tokens[i]`` after its ``caches[i].length`` positions and gets the
        float32 logits of its last ``num_logits[i]`` positions, (num_logits[i], V). Sessions
        may differ in encoder length, decoder length and block size: rows are concatenated,
        never padded, and every session attends over its own cache only.
        """
        if not (len(tokens) == len(caches) == len(num_logits)) or not tokens:
            raise InvalidArgument("decode_sessions needs one token list, cache and logits count per session")
        spans: list[tuple[int, int]] = []
        flat: list[int] = []
        for seq, wanted in zip(tokens, num_logits, strict=True):
            if not seq:
                raise InvalidArgument("every session in a batch must feed at least one decoder token")
            if not 0 <= wanted <= len(seq):
                raise InvalidArgument(
                    f"num_logits must be in [0, {len(seq)}] for {len(seq)} decoder tokens, got {wanted}")
            spans.append((len(flat), len(flat) + len(seq)))
            flat.extend(seq)
        if len(spans) == 1:
            biases = [self._self_bias(caches[0].length, spans[0][1])]
        else:
            biases = self._self_biases([cache.length for cache in caches], [b - a for a, b in spans])
        x = self.embed(mx.array(flat, dtype=mx.int32)[None])
        for i, layer in enumerate(self.decoder_layers):
            x = layer.ragged(x, spans, biases, [cache.layers[i] for cache in caches],
                             [cache.cross[i] for cache in caches])
        rows = [row for (_, end), wanted in zip(spans, num_logits, strict=True) for row in range(end - wanted, end)]
        if len(rows) != len(flat):
            x = x[:, mx.array(rows, dtype=mx.int32)] if rows else x[:, :0]
        logits = self.logits(self.decoder_norm(x))[0]
        out, start = [], 0
        for wanted in num_logits:
            out.append(logits[start : start + wanted])
            start += wanted
        return out

    def _self_bias(self, offset: int, n: int) -> mx.array:
        """Relative position bias plus the causal mask for n queries at positions offset.. over all
        offset + n keys: (1, heads, n, offset + n)."""
        total = offset + n
        bias = self.decoder_bias(offset, n, total)
        if n == 1:
            return bias  # the one query is the last position: it sees every key
        causal = np.arange(total)[None, :] > np.arange(offset, total)[:, None]
        return bias + mx.array(np.where(causal, -1e9, 0.0).astype(np.float32))

    def _self_biases(self, offsets: Sequence[int], counts: Sequence[int]) -> list[mx.array]:
        """``_self_bias`` of many sessions, (1, heads, n_i, offset_i + n_i) each, for a batched pass.

        All sessions' biases come from ONE lookup into the bias table and one addition of the
        causal mask: built session by session, a bias costs about ten small operations, as much
        as a draft model's whole attention. The index arithmetic runs in numpy. (One session
        keeps ``_self_bias``, which is a little cheaper alone.)
        """
        half, table = _distance_buckets(max(o + n for o, n in zip(offsets, counts, strict=True)), False,
                                        self.decoder_bias.num_buckets, self.decoder_bias.max_distance)
        table = np.asarray(table)
        buckets, causal = [], []
        for offset, n in zip(offsets, counts, strict=True):
            relative = np.arange(offset + n)[None, :] - np.arange(offset, offset + n)[:, None]  # key - query
            buckets.append(table[relative + half].reshape(-1))
            causal.append((relative > 0).reshape(-1))
        values = self.decoder_bias.embeddings(mx.array(np.concatenate(buckets)))  # (sum of n_i * keys_i, heads)
        if max(counts) > 1:  # a single query is the last position: it sees every key
            values = values + mx.array(np.where(np.concatenate(causal), -1e9, 0.0).astype(np.float32))[:, None]
        sizes = [len(b) for b in buckets]
        parts = mx.split(values, np.cumsum(sizes)[:-1].tolist()) if len(sizes) > 1 else [values]
        return [part.reshape(n, o + n, -1).transpose(2, 0, 1)[None]
                for part, o, n in zip(parts, offsets, counts, strict=True)]

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.scale_decoder_outputs:
            hidden = hidden * (self.args.d_model**-0.5)
        if self.args.untied_lm_head:
            out = self.lm_head(hidden)
        else:
            out = self.shared.as_linear(hidden)
        return out.astype(mx.float32)

    # -- checkpoint names -----------------------------------------------------------------
    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Hugging Face T5 parameter names to ours; drop tied duplicates."""
        out: dict[str, mx.array] = {}
        for name, value in weights.items():
            new = _rename(name)
            if new is not None:
                out[new] = value
        if "shared.weight" not in out and "encoder.embed_tokens.weight" in weights:
            out["shared.weight"] = weights["encoder.embed_tokens.weight"]  # old exports
        return out


_HF_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$"),
     "encoder_bias.embeddings.weight"),
    (re.compile(r"^decoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$"),
     "decoder_bias.embeddings.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$"),
     r"encoder_layers.\1.self_attn.\2.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$"), r"encoder_layers.\1.ln1.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$"),
     r"encoder_layers.\1.mlp.\2.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$"), r"encoder_layers.\1.ln2.weight"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$"),
     r"decoder_layers.\1.self_attn.\2.weight"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$"), r"decoder_layers.\1.ln1.weight"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])\.weight$"),
     r"decoder_layers.\1.cross_attn.\2.weight"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$"), r"decoder_layers.\1.ln2.weight"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$"),
     r"decoder_layers.\1.mlp.\2.weight"),
    (re.compile(r"^decoder\.block\.(\d+)\.layer\.2\.layer_norm\.weight$"), r"decoder_layers.\1.ln3.weight"),
    (re.compile(r"^encoder\.final_layer_norm\.weight$"), "encoder_norm.weight"),
    (re.compile(r"^decoder\.final_layer_norm\.weight$"), "decoder_norm.weight"),
    (re.compile(r"^shared\.weight$"), "shared.weight"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
]
_HF_DROPPED = re.compile(r"^(encoder|decoder)\.embed_tokens\.weight$")


def _rename(name: str) -> str | None:
    if _HF_DROPPED.match(name):
        return None
    for pattern, replacement in _HF_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name  # already one of ours (a converted checkpoint)


def is_hf_layout(names: list[str] | set[str]) -> bool:
    return any(n.startswith(("encoder.block.", "decoder.block.")) for n in names)
