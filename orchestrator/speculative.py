"""The speculative loop: propose k -> verify -> accept -> roll back, with failover.

Transport-agnostic: it talks to ``DraftBackend``/``TargetBackend`` objects handed out by a
``BackendSource`` (gRPC replicas in the service, in-process hosts in the benchmark).

Each service session holds the committed decoder tokens as a prefix (``Lane.synced`` of
them) plus whatever it drafted or scored beyond. The next call rolls it back to that prefix
and appends what it lacks, in the same message (no extra round trip).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from specdec_core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from specdec_core.sampling import SamplingParams

from .acceptance import StepOutcome, accept_greedy, accept_sampled, next_num_draft
from .backends import DraftBackend, ReplicaError, StepCall, TargetBackend

logger = logging.getLogger(__name__)

AUTO_MIN_DRAFT = 1
MAX_FAILOVERS = 8  # per request: past this a flapping cluster is reported, not retried forever
DEFAULT_CALL_TIMEOUT_S = 60.0  # per call when the request has no deadline: a hung replica is failed over
# Closes of sessions abandoned by a failover run off the request path; keep them referenced.
_ABANDONED: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    num_draft: int
    num_draft_auto: bool = False
    max_num_draft: int = 16  # ceiling of the auto schedule
    sampling: SamplingParams = SamplingParams()
    delta: float = 0.0
    seed: int = 0
    speculative: bool = True

    def validate(self, max_tokens_cap: int, max_draft_cap: int) -> GenerationParams:
        if not 1 <= self.max_tokens <= max_tokens_cap:
            raise InvalidArgument(
                f"max_tokens must be in [1, {max_tokens_cap}] (max_tokens_cap), got {self.max_tokens}"
            )
        if not 1 <= self.num_draft <= max_draft_cap:
            raise InvalidArgument(
                f"num_draft must be in [1, {max_draft_cap}] (max_num_draft), got {self.num_draft}"
            )
        if not (np.isfinite(self.delta) and 0.0 <= self.delta <= 1.0):
            raise InvalidArgument(f"delta must be in [0, 1] (0 = exact), got {self.delta}")
        self.sampling.validate()
        return self


@dataclass
class Stats:
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    draft_passes: int = 0
    steps: int = 0
    target_tokens: int = 0
    tokens: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    final_num_draft: int = 0
    seed: int = 0
    wire_bytes: int = 0
    failovers: int = 0
    draft_replica: str = ""
    target_replica: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def orchestration_s(self) -> float:
        return max(0.0, self.total_s - self.draft_s - self.verify_s)


@dataclass
class StepEvent:
    tokens: list[int]  # emitted this step (EOS excluded)
    finish_reason: str | None = None  # "eos" or "length" on the last event


class BackendSource(Protocol):
    """Hands out replicas for a session and hears about their failures."""

    def acquire_draft(self, exclude: set[str]) -> DraftBackend | None: ...
    def acquire_target(self, exclude: set[str]) -> TargetBackend | None: ...
    def release(self, backend: Any) -> None: ...
    def report_failure(self, backend: Any, error: Exception) -> None: ...


@dataclass
class Lane:
    backend: Any
    session_id: str
    length: int = 1  # the service session's length
    synced: int = 1  # leading committed tokens the session holds
    failed: set[str] = field(default_factory=set)


class SpeculativeGeneration:
    """One request's generation. Iterate ``run()``; ``stats`` is complete when it ends."""

    def __init__(
        self,
        source: BackendSource,
        prompt_ids: list[int],
        params: GenerationParams,
        decoder_start_id: int,
        eos_id: int,
        deadline: float | None = None,
        tag: str = "",
    ):
        self.source = source
        self.prompt_ids = prompt_ids
        self.params = params
        self.eos_id = eos_id
        self.deadline = deadline
        self.tag = tag or secrets.token_hex(4)
        self.decoded = [decoder_start_id]  # committed decoder tokens: start + output
        self.stats = Stats(seed=params.seed, final_num_draft=params.num_draft)
        self.rng = np.random.default_rng(params.seed)
        self.draft: Lane | None = None
        self.target: Lane | None = None
        self._failed_drafts: set[str] = set()
        self._failed_targets: set[str] = set()

    # -- timing -------------------------------------------------------------------------------
    def _timeout(self) -> float:
        """A downstream call's timeout: the request's time left, at most the per-call limit."""
        if self.deadline is None:
            return DEFAULT_CALL_TIMEOUT_S
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed during generation")
        return min(left, DEFAULT_CALL_TIMEOUT_S)

    # -- sessions -----------------------------------------------------------------------------
    async def _open_target(self) -> None:
        full: list[ResourceExhausted] = []
        while True:
            backend = self.source.acquire_target(self._failed_targets)
            if backend is None:
                if full:  # every target left is at its session or cache limit
                    raise ResourceExhausted(f"every target replica is full; last: {full[-1]}")
                raise Unavailable(
                    "no target replica is available (all down or failed for this request); "
                    "start a target service or check --target addresses"
                )
            try:
                session_id = await backend.open(self.prompt_ids, self.tag, self._timeout())
            except ReplicaError as error:
                self._target_failed(backend, error)
                continue
            except ResourceExhausted as error:  # full, not broken: try another replica
                self.source.release(backend)
                self._failed_targets.add(backend.address)
                full.append(error)
                continue
            except BaseException:
                self.source.release(backend)
                raise
            self.target = Lane(backend, session_id)
            self.stats.target_replica = backend.address
            return

    async def _open_draft(self) -> None:
        while True:
            backend = self.source.acquire_draft(self._failed_drafts)
            if backend is None:
                self.draft = None  # finish with the target alone
                return
            try:
                session_id = await backend.open(self.prompt_ids, self.tag, self._timeout())
            except ReplicaError as error:
                self._draft_failed(backend, error)
                continue
            except ResourceExhausted:  # full, not broken: another draft, else the target alone
                self.source.release(backend)
                self._failed_drafts.add(backend.address)
                continue
            except BaseException:
                self.source.release(backend)
                raise
            self.draft = Lane(backend, session_id)
            self.stats.draft_replica = backend.address
            return

    def _count_failover(self, error: Exception) -> None:
        self.stats.failovers += 1
        if self.stats.failovers > MAX_FAILOVERS:
            raise Unavailable(f"gave up after {MAX_FAILOVERS} replica failures; last: {error}") from error

    def _draft_failed(self, backend: Any, error: ReplicaError) -> None:
        self.source.release(backend)
        self._raise_if_expired(error)
        logger.warning("draft %s failed (%s); failing over", backend.address, error)
        self._failed_drafts.add(backend.address)
        self.source.report_failure(backend, error)
        self._count_failover(error)

    def _target_failed(self, backend: Any, error: ReplicaError) -> None:
        self.source.release(backend)
        self._raise_if_expired(error)
        logger.warning("target %s failed (%s); failing over", backend.address, error)
        self._failed_targets.add(backend.address)
        self.source.report_failure(backend, error)
        self._count_failover(error)

    def _raise_if_expired(self, error: ReplicaError) -> None:
        """A call cut short by the request's own deadline is not the replica's fault: report
        DEADLINE_EXCEEDED instead of failing over. (A call that ran out of the per-call limit
        with time left is: the replica hangs.)"""
        slack = 0.005 if error.timed_out else 0.0  # the call's own timer fires at the deadline, not before
        if self.deadline is not None and time.monotonic() >= self.deadline - slack:
            raise DeadlineExceeded("the request's deadline passed during generation") from error

    def _abandon(self, lane: Lane) -> None:
        """Close the session of a lane given up by a failover, in the background: a dead
        replica refuses at once, one that merely failed this call frees it now, not at its TTL."""

        async def close_quietly() -> None:
            try:
                await lane.backend.close(lane.session_id)
            except Exception as error:  # noqa: BLE001 - the replica's TTL frees it instead
                logger.debug("closing abandoned session on %s failed: %s", lane.backend.address, error)

        task = asyncio.get_running_loop().create_task(close_quietly())
        _ABANDONED.add(task)
        task.add_done_callback(_ABANDONED.discard)

    async def close(self) -> None:
        """Close both sessions; safe on every exit path (errors here are only logged)."""
        lanes = [lane for lane in (self.draft, self.target) if lane is not None]
        self.draft = self.target = None
        for lane in lanes:
            try:
                await lane.backend.close(lane.session_id)
            except Exception as error:  # noqa: BLE001 - the TTL frees it if this fails
                logger.info("closing session on %s failed: %s", lane.backend.address, error)
            finally:
                self.source.release(lane.backend)

    # -- the loop -----------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[StepEvent]:
        started = time.perf_counter()
        try:
            await self._open_target()
            if self.params.speculative:
                await self._open_draft()
            k = self.params.num_draft
            produced = 0
            while True:
                remaining = self.params.max_tokens - produced
                # A step yields up to k+1 tokens; never draft past max_tokens.
                k_step = min(k, remaining - 1) if self.draft is not None else 0
                outcome, drafted = await self._step(k_step)
                emitted = outcome.emitted(drafted)
                self.stats.steps += 1
                self.stats.target_passes += 1
                self.stats.proposed += len(drafted)
                finish = None
                if self.eos_id in emitted:
                    emitted = emitted[: emitted.index(self.eos_id) + 1]
                    finish = "eos"
                # Draft tokens kept; an accepted EOS cuts the block (and the target's token) off.
                kept = min(outcome.accepted, len(emitted))
                self.stats.accepted += kept
                self.stats.target_tokens += int(len(emitted) > kept)
                self.stats.tokens += len(emitted)
                produced += len(emitted)
                self._commit(emitted, kept)
                if finish is None and produced >= self.params.max_tokens:
                    finish = "length"
                if self.params.num_draft_auto and drafted:
                    k = next_num_draft(k, outcome, len(drafted), AUTO_MIN_DRAFT, self.params.max_num_draft)
                self.stats.final_num_draft = k
                visible = [t for t in emitted if t != self.eos_id]
                if finish is not None:
                    # Free both sessions before the client hears we are done.
                    await asyncio.shield(self.close())
                    self.stats.total_s = time.perf_counter() - started
                    yield StepEvent(visible, finish)
                    return
                yield StepEvent(visible, finish)
        finally:
            self.stats.total_s = time.perf_counter() - started
            await asyncio.shield(self.close())

    def _commit(self, emitted: list[int], accepted: int) -> None:
        """Record the step's tokens; both sessions hold the committed prefix up to the kept drafts."""
        base = len(self.decoded)
        self.decoded.extend(emitted)
        kept = base + accepted
        for lane in (self.draft, self.target):
            # Only a session called this step holds the kept drafts; one that sat out keeps its prefix.
            if lane is not None and lane.synced == base:
                lane.synced = min(kept, lane.length)

    async def _step(self, k: int) -> tuple[StepOutcome, list[int]]:
        sampling = self.params.sampling
        draft_seed = int(self.rng.integers(2**63))
        target_seed = int(self.rng.integers(2**63))
        uniforms = self.rng.random(max(k, 1))
        drafted: list[int] = []
        draft_probs: list[float] = []
        distributions: Any = []
        if k > 0:
            proposal = await self._propose(k, sampling, draft_seed)
            if proposal is not None:
                drafted, draft_probs, distributions = proposal
        verified = await self._verify(drafted, sampling, target_seed, distributions)
        if sampling.greedy:
            outcome = accept_greedy(drafted, verified.argmax, uniforms, self.params.delta)
        else:
            outcome = accept_sampled(
                drafted, draft_probs, verified.draft_probs, verified.resampled, uniforms, self.params.delta
            )
        return outcome, drafted

    def _call_for(self, lane: Lane, sampling: SamplingParams, seed: int) -> StepCall:
        rollback_to = lane.synced if lane.synced < lane.length else 0
        return StepCall(
            expected_length=lane.length,
            rollback_to=rollback_to,
            append_tokens=self.decoded[lane.synced :],
            sampling=sampling,
            seed=seed,
            timeout=self._timeout(),
        )

    async def _propose(self, k: int, sampling: SamplingParams, seed: int) -> tuple[list[int], list[float], Any] | None:
        while self.draft is not None:
            lane = self.draft
            call = self._call_for(lane, sampling, seed)
            started = time.perf_counter()
            try:
                proposed = await lane.backend.propose(lane.session_id, call, k)
            except ReplicaError as error:
                self.draft = None
                self._abandon(lane)
                self._draft_failed(lane.backend, error)
                await self._open_draft()
                continue
            finally:
                self.stats.draft_s += time.perf_counter() - started
            lane.length = proposed.length
            lane.synced = len(self.decoded)
            self.stats.draft_passes += len(proposed.tokens)
            self.stats.wire_bytes += proposed.wire_bytes
            return proposed.tokens, proposed.token_probs, proposed.distributions
        return None

    async def _verify(self, drafted: list[int], sampling: SamplingParams, seed: int, distributions: Any) -> Any:
        while True:
            lane = self.target
            assert lane is not None
            call = self._call_for(lane, sampling, seed)
            call.append_tokens = call.append_tokens + drafted
            started = time.perf_counter()
            try:
                verified = await lane.backend.verify(lane.session_id, call, len(drafted), distributions)
            except ReplicaError as error:
                self.target = None
                self._abandon(lane)
                self._target_failed(lane.backend, error)
                await self._open_target()
                continue
            finally:
                self.stats.verify_s += time.perf_counter() - started
            lane.length = verified.length
            lane.synced = len(self.decoded)
            self.stats.wire_bytes += verified.wire_bytes
            return verified
