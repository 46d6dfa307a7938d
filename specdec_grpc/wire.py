"""Conversions between protobuf messages and the domain's step types, in one place.

Both sides of the wire use these: the servicers (request in, result out) and the
orchestrator's gRPC backends (request out, result in). No MLX is imported here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from specdec_core.errors import InvalidArgument
from specdec_core.steps import Distribution, Proposal, SamplingParams, StepRequest, Verdict
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
    """The message's q as it was sent (float16 weights). Only its encoding is checked here; what the
    numbers mean is checked once, where the step is validated (``Distribution.check``)."""
    if len(message.probs_f16) % 2:
        raise InvalidArgument("probs_f16 must hold 2 bytes per probability")
    return Distribution(np.asarray(message.token_ids, dtype=np.int32), np.frombuffer(message.probs_f16, "<f2"))


# -- steps, on the worker's side ------------------------------------------------------------------

@dataclass(frozen=True)
class WireLimits:
    """Sizes a worker accepts, checked on the protobuf message before any repeated field is
    copied into Python objects: a message of 10 MiB holds millions of varint token ids, and
    each becomes a 28-byte int (and a longer decoder builds quadratic attention tensors)."""

    max_prompt_tokens: int
    max_append_tokens: int  # a session's decoder length cap (max_decoder_tokens)
    max_draft: int
    vocab_size: int

    def check_open(self, message: pb.OpenSessionRequest) -> None:
        if len(message.prompt_ids) > self.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt has {len(message.prompt_ids)} tokens; max_prompt_tokens is {self.max_prompt_tokens}"
            )

    def check_step(self, message: pb.ProposeRequest | pb.VerifyRequest) -> None:
        if len(message.append_tokens) > self.max_append_tokens:
            raise InvalidArgument(
                f"append_tokens has {len(message.append_tokens)} tokens; a session's decoder may hold "
                f"at most max_decoder_tokens={self.max_append_tokens}"
            )
        distributions = message.draft_distributions if isinstance(message, pb.VerifyRequest) else ()
        if len(distributions) > self.max_draft:
            raise InvalidArgument(
                f"{len(distributions)} draft distributions; at most one per draft token "
                f"(max_draft is {self.max_draft})"
            )
        for dist in distributions:
            if len(dist.token_ids) > self.vocab_size or len(dist.probs_f16) > 2 * self.vocab_size:
                raise InvalidArgument(
                    f"a draft distribution has more entries than the vocabulary ({self.vocab_size})"
                )


def step_from_pb(
    message: pb.ProposeRequest | pb.VerifyRequest, deadline: float | None, limits: WireLimits | None = None
) -> StepRequest:
    """A Propose or Verify request as the domain's StepRequest (q converted for Verify).
    With ``limits``, oversized repeated fields are refused before they are converted.
    ``deadline`` is the call's; the message's own ``timeout_ms`` (a step on a stream) may
    make it earlier."""
    if limits is not None:
        limits.check_step(message)
    timeout_ms = message.timeout_ms
    if not (math.isfinite(timeout_ms) and timeout_ms >= 0):
        raise InvalidArgument(f"timeout_ms must be >= 0 (0: none), got {timeout_ms}")
    if timeout_ms > 0:
        step_deadline = time.monotonic() + timeout_ms / 1e3
        deadline = step_deadline if deadline is None else min(deadline, step_deadline)
    distributions = message.draft_distributions if isinstance(message, pb.VerifyRequest) else ()
    return StepRequest(
        session_id=message.session_id,
        expected_length=message.expected_length,
        rollback_to=message.rollback_to,
        append_tokens=list(message.append_tokens),
        num_draft=message.num_draft,
        sampling=sampling_from_pb(message.sampling),
        seed=message.seed,
        draft_distributions=[distribution_from_pb(d) for d in distributions],
        deadline=deadline,
    )


def proposal_to_pb(proposal: Proposal) -> pb.ProposeResponse:
    return pb.ProposeResponse(
        tokens=proposal.tokens,
        token_probs=proposal.token_probs,
        distributions=[distribution_to_pb(d) for d in proposal.distributions],
        length=proposal.length,
        model_ms=proposal.model_ms,
        batch_size=proposal.batch_size,
    )


def verdict_to_pb(verdict: Verdict) -> pb.VerifyResponse:
    return pb.VerifyResponse(
        argmax=verdict.argmax, draft_probs=verdict.draft_probs, resampled=verdict.resampled,
        length=verdict.length, model_ms=verdict.model_ms, batch_size=verdict.batch_size,
        batch_rows=verdict.batch_rows,
    )


# -- steps, on the orchestrator's side -------------------------------------------------------------

def _step_fields(step: StepRequest) -> dict:
    return dict(
        session_id=step.session_id,
        expected_length=step.expected_length,
        rollback_to=step.rollback_to,
        append_tokens=step.append_tokens,
        num_draft=step.num_draft,
        sampling=sampling_to_pb(step.sampling),
        seed=step.seed,
    )


def propose_request_to_pb(step: StepRequest) -> pb.ProposeRequest:
    return pb.ProposeRequest(**_step_fields(step))


def verify_request_to_pb(step: StepRequest) -> pb.VerifyRequest:
    return pb.VerifyRequest(**_step_fields(step),
                            draft_distributions=[distribution_to_pb(d) for d in step.draft_distributions])


def proposal_from_pb(message: pb.ProposeResponse) -> Proposal:
    return Proposal(list(message.tokens), list(message.token_probs),
                    [distribution_from_pb(d) for d in message.distributions], message.length,
                    model_ms=message.model_ms, batch_size=message.batch_size or 1)


def verdict_from_pb(message: pb.VerifyResponse) -> Verdict:
    return Verdict(list(message.argmax), list(message.draft_probs), list(message.resampled), message.length,
                   model_ms=message.model_ms, batch_size=message.batch_size or 1, batch_rows=message.batch_rows)
