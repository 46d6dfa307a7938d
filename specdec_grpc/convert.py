"""Conversions between protobuf messages and domain types, in one place."""

from __future__ import annotations

import numpy as np

from specdec_core.engine import Distribution
from specdec_core.errors import InvalidArgument
from specdec_core.sampling import SamplingParams
from specdec_pb import specdec_pb2 as pb


def sampling_from_pb(message: pb.SamplingParams) -> SamplingParams:
    top_p = message.top_p if message.top_p != 0 else 1.0  # 0 = off; negative or NaN is rejected
    return SamplingParams(float(message.temperature), int(message.top_k), float(top_p)).validate()


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)


def distribution_to_pb(dist: Distribution) -> pb.Distribution:
    return pb.Distribution(
        token_ids=dist.token_ids.tolist(), probs_f16=dist.probs.astype("<f2").tobytes()
    )


def distribution_from_pb(message: pb.Distribution) -> Distribution:
    if len(message.probs_f16) % 2:
        raise InvalidArgument("probs_f16 must hold 2 bytes per probability")
    probs = np.frombuffer(message.probs_f16, dtype="<f2").astype(np.float32)
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise InvalidArgument("a draft distribution holds negative or non-finite probabilities")
    return Distribution(np.asarray(message.token_ids, dtype=np.int32), probs)
