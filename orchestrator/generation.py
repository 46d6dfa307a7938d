"""The orchestrator's domain: text in, speculative generation over replicas, text out."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from specdec_core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from specdec_core.limits import INT32_MAX, at_least, limit
from specdec_core.steps import SamplingParams

from .backend_protocol import BackendSource
from .detokenize import TextAttribution, TextStream
from .estimates import PlanMemory
from .params import GenerationParams, Stats, new_request_id
from .speculative import DEFAULT_CALL_TIMEOUT_S, SpeculativeGeneration

logger = logging.getLogger(__name__)
CANCEL_AT_DEADLINE_S = 0.01  # a cancel this close to the deadline is the deadline's


@dataclass
class OrchestratorLimits:
    """The orchestrator's limits, each declared once (``limits.limit``): flags, config and the docs'
    limits table derive from here."""

    # Characters, checked before tokenizing so an oversized prompt costs nothing: 32 per
    # default prompt token, far above what 2048 tokens of real text take (T5 pieces average
    # ~4 characters), far below the 64 MiB a message may carry.
    max_prompt_chars: int = limit(65_536, "--max-prompt-chars",
                                  "longest prompt in characters, refused before tokenizing",
                                  valid=at_least(1, INT32_MAX))
    max_prompt_tokens: int = limit(2048, "--max-prompt-tokens", "longest prompt in tokens",
                                   valid=at_least(1, INT32_MAX))
    max_tokens_cap: int = limit(2048, "--max-tokens-cap", "largest max_tokens a request may ask for",
                                valid=at_least(1, INT32_MAX))
    default_max_tokens: int = limit(64, "--default-max-tokens", "max_tokens of a request that sets none",
                                    valid=at_least(1, INT32_MAX))
    # At most 256: no worker takes a larger k (its --max-draft).
    max_num_draft: int = limit(16, "--max-num-draft", "largest k, and the ceiling of num_draft=auto",
                               valid=at_least(1, 256))
    # The published anchor's k=7 is for T5-XXL; 5 suits small pairs.
    default_num_draft: int = limit(5, "--default-num-draft", "k of a request that sets none and not auto",
                                   valid=at_least(1, 256))
    max_generations: int = limit(32, "--max-generations",
                                 "generations in flight at once; more get RESOURCE_EXHAUSTED",
                                 valid=at_least(1, INT32_MAX))
    # A hung replica is failed over after this; a pass of a large target on a slow CPU can take
    # longer (an 11B-shaped 4-bit target on 2 shared cores: over 60 s for a 4-token block).
    call_timeout_s: float = limit(DEFAULT_CALL_TIMEOUT_S, "--call-timeout",
                                  "seconds one call to a worker (open a session, a step) may take before "
                                  "its replica is failed over; a request's own deadline still applies",
                                  valid=at_least(1))
    pipeline: bool = True  # pipelined drafting unless a request says otherwise (--no-pipeline)


class RequestObserver(Protocol):
    """What the orchestrator tells about every request when it ends (specdec_grpc.metrics)."""

    def request_ended(self, params: GenerationParams | None, stats: Stats | None, error: BaseException | None,
                      elapsed_s: float) -> None:
        """``stats``: final (None if refused before it started); ``error``: None if it finished."""


@dataclass
class TextEvent:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: Stats | None = None
    from_draft: list[bool] = field(default_factory=list)  # per token: an accepted draft token?
    # With text_spans: the text as (piece, from_draft) runs; empty where it cannot be attributed
    spans: list[tuple[str, bool]] = field(default_factory=list)


class Orchestrator:
    def __init__(self, source: BackendSource, tokenizer: Any, decoder_start_id: int, eos_id: int,
                 limits: OrchestratorLimits):
        self.source = source
        self.tokenizer = tokenizer
        self.decoder_start_id = decoder_start_id
        self.eos_id = eos_id
        self.limits = limits
        self.active = 0
        self.draining = False  # set on SIGTERM: new requests get UNAVAILABLE, running ones finish
        # Told of every request's end: request_ended(params, stats, error, elapsed_s) (Prometheus).
        self.metrics: RequestObserver | None = None
        self.plan_memory = PlanMemory()  # the planner's costs per replica pair, and what requests learned

    def _ended(self, params: GenerationParams | None, stats: Stats | None, error: BaseException | None,
               elapsed_s: float) -> None:
        if self.metrics is not None:
            self.metrics.request_ended(params, stats, error, elapsed_s)

    def check_prompt(self, prompt: str) -> None:
        """The checks that cost no tokenizing: run before taking a slot or a tokenizer thread."""
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidArgument(
                f"prompt is {len(prompt)} characters; max_prompt_chars is {self.limits.max_prompt_chars}"
            )
        if not prompt or prompt.isspace():
            raise InvalidArgument("prompt is empty")

    def encode(self, prompt: str) -> list[int]:
        self.check_prompt(prompt)
        ids = list(self.tokenizer(prompt).input_ids)  # T5 tokenizers append EOS
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt is {len(ids)} tokens; max_prompt_tokens is {self.limits.max_prompt_tokens}"
            )
        return ids

    def params(self, max_tokens: int, num_draft: int, num_draft_auto: bool, sampling: SamplingParams, delta: float,
               seed: int | None, speculative: bool, pipeline: bool | None = None) -> GenerationParams:
        """Fill defaults (0 = server default) and validate against the limits. A default above
        its cap (e.g. only --max-num-draft lowered) is clamped, not turned into an error."""
        limits = self.limits
        try:
            return GenerationParams(
                max_tokens=max_tokens or min(limits.default_max_tokens, limits.max_tokens_cap),
                num_draft=num_draft or min(limits.default_num_draft, limits.max_num_draft),
                num_draft_auto=num_draft_auto,
                max_num_draft=self.limits.max_num_draft,
                sampling=sampling,
                delta=delta,
                seed=seed if seed is not None else secrets.randbits(63),
                speculative=speculative,
                seeded=seed is not None,
                pipeline=limits.pipeline if pipeline is None else pipeline,
            ).validate(self.limits.max_tokens_cap, self.limits.max_num_draft)
        except Exception as error:  # the request ends here: refused before it started
            self._ended(None, None, error, 0.0)
            raise

    async def generate(self, prompt: str, params: GenerationParams, timeout_s: float | None,
                       text_spans: bool = False) -> AsyncIterator[TextEvent]:
        """Stream text deltas; the last event has the finish reason and the stats. With
        ``text_spans`` each event also splits its text by who wrote it (``TextAttribution``: it
        decodes after every token, so only requests that ask pay for it).

        Cheap refusals come first (draining, prompt size, a free slot); the slot is held while
        the prompt is tokenized, which runs in a thread so a long prompt does not stall the
        event loop (other requests' streams, health checks)."""
        arrived = time.monotonic()
        deadline = arrived + timeout_s if timeout_s is not None else None
        try:
            if self.draining:
                raise Unavailable("the orchestrator is shutting down; retry on another instance")
            self.check_prompt(prompt)
            if self.active >= self.limits.max_generations:
                raise ResourceExhausted(
                    f"{self.active} generations in flight; max_generations is {self.limits.max_generations}"
                )
        except Exception as error:
            self._ended(params, None, error, time.monotonic() - arrived)
            raise
        request_id = new_request_id()
        outcome = "ended early"
        generation: SpeculativeGeneration | None = None
        finished_at: float | None = None  # when the last event (finish reason, stats) was ready
        failure: BaseException | None = None
        self.active += 1
        try:
            prompt_ids = await asyncio.to_thread(self.encode, prompt)
            logger.info("req=%s started: %d prompt tokens, max_tokens %d, k %s, temperature %g, seed %d",
                        request_id, len(prompt_ids), params.max_tokens,
                        "off" if not params.speculative else "auto" if params.num_draft_auto else params.num_draft,
                        params.sampling.temperature, params.seed)
            generation = SpeculativeGeneration(
                self.source, prompt_ids, params, self.decoder_start_id, self.eos_id, deadline, request_id,
                self.plan_memory, self.limits.call_timeout_s,
            )
            text = TextStream(self.tokenizer)
            attribution = TextAttribution(self.tokenizer) if text_spans else None
            async with aclosing(generation.run()) as steps:  # its sessions close when this request ends
                async for step in steps:
                    if step.tokens and not generation.stats.time_to_first_token_s:
                        generation.stats.time_to_first_token_s = time.monotonic() - arrived
                    delta = text.push(step.tokens)
                    if step.finish_reason is not None:
                        delta += text.flush()
                        stats = generation.stats
                        outcome = (f"finished ({step.finish_reason}): {stats.tokens} tokens in {stats.steps} steps, "
                                   f"acceptance {stats.acceptance_rate:.2f}, {stats.total_s * 1e3:.0f} ms, "
                                   f"draft {stats.draft_replica or '-'}, target {stats.target_replica}")
                        finished_at = time.monotonic()
                        yield TextEvent(delta, step.tokens, step.finish_reason, stats, step.from_draft,
                                        _spans(attribution, step.tokens, step.from_draft, delta))
                    else:
                        yield TextEvent(delta, step.tokens, from_draft=step.from_draft,
                                        spans=_spans(attribution, step.tokens, step.from_draft, delta))
        except BaseException as error:
            if finished_at is None:  # not the consumer closing us after the last event
                outcome = _failure(error, deadline, generation)
                failure = error
            raise
        finally:
            self.active -= 1
            # A request out of time is the client's setting, not a fault here: one WARNING line.
            level = logging.WARNING if outcome.startswith("ran out of time") else logging.INFO
            logger.log(level, "req=%s %s", request_id, outcome)
            if finished_at is None and failure is None:
                failure = RuntimeError("generation ended without a finish reason")  # INTERNAL
            self._ended(params, generation.stats if generation is not None else None, failure,
                        (finished_at or time.monotonic()) - arrived)


def _failure(error: BaseException, deadline: float | None, generation: SpeculativeGeneration | None) -> str:
    """What ended a request early, in words. A cancel once the deadline has passed is the deadline
    (the client's timer fired first and cancelled the call): said so, not as a cancel."""
    tokens = generation.stats.tokens if generation is not None else 0
    cancelled = isinstance(error, (asyncio.CancelledError, GeneratorExit))
    # The client's deadline reached us as its call's, a transit time later than its own timer.
    timed_out = deadline is not None and time.monotonic() >= deadline - CANCEL_AT_DEADLINE_S
    if isinstance(error, DeadlineExceeded) or (cancelled and timed_out):
        return f"ran out of time: the deadline passed after {tokens} tokens"
    if cancelled:
        return f"cancelled by the client after {tokens} tokens"
    return f"failed: {type(error).__name__}: {error}"


def _spans(attribution: TextAttribution | None, tokens: list[int], from_draft: list[bool], text: str
           ) -> list[tuple[str, bool]]:
    """An event's text as runs by who wrote it; [] when not asked, or when any of it cannot be
    attributed exactly (the client then prints the text plain, never a guessed colour)."""
    if attribution is None:
        return []
    runs = attribution.push(tokens, from_draft, text)
    if any(flag is None for _, flag in runs):
        return []
    return [(piece, bool(flag)) for piece, flag in runs]
