"""The speculative loop: propose k -> verify -> accept -> roll back, with failover.

Transport-agnostic: it talks to ``DraftBackend``/``TargetBackend`` objects handed out by a
``BackendSource`` (gRPC replicas in the service, in-process hosts in the benchmark).

Draft and target are two ``Lane``s handled by one mechanism (open, call, fail over, resync);
the one real difference is what happens when no replica of a role is left: without a draft
the target finishes alone, without a target the request fails.

Each service session holds the committed decoder tokens as a prefix (``Lane.synced`` of
them) plus whatever it drafted or scored beyond. The next call rolls it back to that prefix
and appends what it lacks, in the same message (no extra round trip). See
docs/architecture.md for the whole path of a token.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from specdec_core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from specdec_core.sampling import ACCEPT_STREAM, position_uniforms
from specdec_core.steps import Proposal, SamplingParams, StepRequest, Verdict

from .acceptance import StepOutcome, accept_greedy, accept_sampled, next_num_draft
from .backends import Backend, ReplicaError

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
    # [i]: draft tokens proposed / accepted at draft position i+1 (vLLM's per-position counters)
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_model_s: float = 0.0  # what the workers reported as model time (the rest is wire)
    target_model_s: float = 0.0
    time_to_first_token_s: float = 0.0  # set by the caller that saw the request arrive

    def count_block(self, proposed: int, accepted: int) -> None:
        """Per-position counts of one step: positions 1..proposed drafted, 1..accepted kept."""
        while len(self.proposed_per_position) < proposed:
            self.proposed_per_position.append(0)
            self.accepted_per_position.append(0)
        for i in range(proposed):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += int(i < accepted)

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
    from_draft: list[bool] = field(default_factory=list)  # per token: an accepted draft token?


class BackendSource(Protocol):
    """Hands out replicas of a role ("draft" or "target") and hears about their failures."""

    def acquire(self, role: str, exclude: set[str]) -> Backend | None: ...
    def release(self, backend: Any) -> None: ...
    def report_failure(self, backend: Any, error: Exception) -> None: ...


@dataclass
class Lane:
    """One role's session for this request: which replica holds it and what it holds.

    After a call the session holds every committed token (``decoded``, shared with the
    generation) plus the call's block (the draft's proposal, or the drafts the target scored).
    ``synced`` is derived from that, so it is never out of step with what was committed.
    """

    role: str  # "draft" or "target"
    decoded: list[int]  # the request's committed decoder tokens (the generation's own list)
    backend: Any = None  # None: no session (a draft lane with no draft left)
    session_id: str = ""
    length: int = 1  # the service session's length
    failed: set[str] = field(default_factory=set)  # replicas this request gave up on
    _held: int = 1  # committed tokens the session held after its last call
    _block: list[int] = field(default_factory=list)  # what it holds past them

    @property
    def synced(self) -> int:
        """Leading committed tokens the session holds (those of its block that were kept)."""
        held = self._held
        for mine, committed in zip(self._block, self.decoded[self._held :], strict=False):
            if mine != committed:
                break
            held += 1
        return min(held, self.length)

    def attach(self, backend: Any, session_id: str) -> None:
        """A new session: it holds the decoder start token only."""
        self.backend, self.session_id = backend, session_id
        self.length, self._held, self._block = 1, 1, []

    def record(self, length: int, block: list[int]) -> None:
        """The session's state after a call: all committed tokens, then ``block``."""
        self.length, self._held, self._block = length, len(self.decoded), block

    @property
    def max_draft(self) -> int:
        """The largest k this lane's replica takes (its --max-draft; 0: unknown, no cap)."""
        return getattr(self.backend, "max_draft", 0) or 0

    def request(self, block: list[int], num_draft: int, sampling: SamplingParams, seed: int,
                deadline: float | None, draft_distributions: Any = ()) -> StepRequest:
        """The next call: roll back to the synced prefix, append what the session lacks."""
        synced = self.synced
        return StepRequest(
            session_id=self.session_id,
            expected_length=self.length,
            rollback_to=synced if synced < self.length else 0,
            append_tokens=self.decoded[synced:] + block,
            num_draft=num_draft,
            sampling=sampling,
            seed=seed,
            draft_distributions=draft_distributions,
            deadline=deadline,
        )


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
        request_id: str = "",
    ):
        self.source = source
        self.prompt_ids = prompt_ids
        self.params = params
        self.eos_id = eos_id
        self.deadline = deadline
        self.request_id = request_id or new_request_id()
        self.decoded = [decoder_start_id]  # committed decoder tokens: start + output
        self.stats = Stats(seed=params.seed, final_num_draft=params.num_draft)
        self.draft = Lane("draft", self.decoded)
        self.target = Lane("target", self.decoded)

    # -- timing -------------------------------------------------------------------------------
    def _call_deadline(self) -> float:
        """A downstream call's deadline: the request's, at most the per-call limit from now."""
        now = time.monotonic()
        if self.deadline is None:
            return now + DEFAULT_CALL_TIMEOUT_S
        if self.deadline <= now:
            raise DeadlineExceeded("the request's deadline passed during generation")
        return min(self.deadline, now + DEFAULT_CALL_TIMEOUT_S)

    # -- lanes --------------------------------------------------------------------------------
    async def _open(self, lane: Lane, full: list[ResourceExhausted] | None = None) -> None:
        """Open the lane's session on a replica, failing over until one accepts. With no
        replica left, a target lane is an error (RESOURCE_EXHAUSTED if the last ones were full,
        as in ``full``); a draft lane stays closed (target alone)."""
        full = list(full or [])
        while True:
            backend = self.source.acquire(lane.role, lane.failed)
            if backend is None:
                if lane.role == "draft":
                    return  # finish with the target alone
                if full:  # every target left is at its session or cache limit
                    raise ResourceExhausted(f"every target replica is full; last: {full[-1]}")
                raise Unavailable(
                    "no target replica is available (all down or failed for this request); "
                    "start a target service or check --target addresses"
                )
            try:
                timeout = self._call_deadline() - time.monotonic()
                session_id = await backend.open(self.prompt_ids, self.request_id, timeout)
            except ReplicaError as error:
                self._replica_failed(lane, backend, error)
                continue
            except ResourceExhausted as error:  # full, not broken: try another replica
                self.source.release(backend)
                lane.failed.add(backend.address)
                full.append(error)
                continue
            except BaseException:
                self.source.release(backend)
                raise
            lane.attach(backend, session_id)
            if lane.role == "draft":
                self.stats.draft_replica = backend.address
            else:
                self.stats.target_replica = backend.address
            return

    async def _call(self, lane: Lane, block: list[int], num_draft: int, seed: int,
                    draft_distributions: Any = ()) -> Any:
        """One Propose or Verify on the lane, failing over (and resyncing the new replica from
        the prompt and the committed tokens) while replicas fail. None: the draft lane closed.

        A session that vanished on a live replica (NOT_FOUND, ABORTED: expired by TTL, or the
        replica restarted) is reopened there once before failing over; a full replica (its
        cache budget reached mid-request) is left for another, or for the target alone."""
        reopened: set[str] = set()
        while lane.backend is not None:
            backend = lane.backend
            request = lane.request(block, num_draft, self.params.sampling, seed, self._call_deadline(),
                                   draft_distributions)
            started = time.perf_counter()
            try:
                result = await backend.step(request)
                check_reply(lane.role, request, result, backend.address)
            except ReplicaError as error:
                self._abandon(lane)
                if error.code in SESSION_LOST and backend.address not in reopened:
                    self._raise_if_expired(error)
                    reopened.add(backend.address)
                    logger.info("req=%s %s %s lost the session (%s); reopening it there", self.request_id,
                                lane.role, backend.address, error)
                    if await self._reopen(lane, backend):
                        continue
                self._replica_failed(lane, backend, error)
                await self._open(lane)
                continue
            except ResourceExhausted as error:
                self._abandon(lane)
                self.source.release(backend)
                lane.failed.add(backend.address)
                logger.info("req=%s %s %s is full (%s); moving on", self.request_id, lane.role,
                            backend.address, error)
                await self._open(lane, [error])
                continue
            finally:
                if lane.role == "draft":
                    self.stats.draft_s += time.perf_counter() - started
                else:
                    self.stats.verify_s += time.perf_counter() - started
            lane.record(result.length, result.tokens if lane.role == "draft" else block)
            self.stats.wire_bytes += result.wire_bytes
            if lane.role == "draft":
                self.stats.draft_model_s += result.model_ms / 1e3
            else:
                self.stats.target_model_s += result.model_ms / 1e3
            return result
        return None

    async def _reopen(self, lane: Lane, backend: Any) -> bool:
        """Open a new session for the lane on the same replica; False if that fails too."""
        try:
            session_id = await backend.open(self.prompt_ids, self.request_id,
                                            self._call_deadline() - time.monotonic())
        except (ReplicaError, ResourceExhausted) as error:
            logger.info("req=%s reopening on %s failed: %s", self.request_id, backend.address, error)
            return False
        lane.attach(backend, session_id)
        return True

    def _replica_failed(self, lane: Lane, backend: Any, error: ReplicaError) -> None:
        self.source.release(backend)
        self._raise_if_expired(error)
        logger.warning("req=%s %s %s failed (%s); failing over", self.request_id, lane.role,
                       backend.address, error)
        lane.failed.add(backend.address)
        self.source.report_failure(backend, error)
        self.stats.failovers += 1
        if self.stats.failovers > MAX_FAILOVERS:
            raise Unavailable(f"gave up after {MAX_FAILOVERS} replica failures; last: {error}") from error

    def _raise_if_expired(self, error: ReplicaError) -> None:
        """A call cut short by the request's own deadline is not the replica's fault: report
        DEADLINE_EXCEEDED instead of failing over. (A call that ran out of the per-call limit
        with time left is: the replica hangs.)"""
        slack = 0.005 if error.timed_out else 0.0  # the call's own timer fires at the deadline, not before
        if self.deadline is not None and time.monotonic() >= self.deadline - slack:
            raise DeadlineExceeded("the request's deadline passed during generation") from error

    def _abandon(self, lane: Lane) -> None:
        """Detach the lane from its session and close it in the background: a dead replica
        refuses at once, one that merely failed this call frees it now, not at its TTL."""
        backend, session_id = lane.backend, lane.session_id
        lane.backend = None

        async def close_quietly() -> None:
            try:
                await backend.close(session_id)
            except Exception as error:  # noqa: BLE001 - the replica's TTL frees it instead
                logger.debug("closing abandoned session on %s failed: %s", backend.address, error)

        task = asyncio.get_running_loop().create_task(close_quietly())
        _ABANDONED.add(task)
        task.add_done_callback(_ABANDONED.discard)

    async def close(self) -> None:
        """Close both sessions; safe on every exit path (errors here are only logged)."""
        for lane in (self.draft, self.target):
            backend, lane.backend = lane.backend, None
            if backend is None:
                continue
            try:
                await backend.close(lane.session_id)
            except Exception as error:  # noqa: BLE001 - the TTL frees it if this fails
                logger.info("req=%s closing session on %s failed: %s", self.request_id, backend.address, error)
            finally:
                self.source.release(backend)

    def _replica_draft_caps(self) -> list[int]:
        """With auto k, each lane's --max-draft, so k never exceeds what a replica takes."""
        if not self.params.num_draft_auto:  # an explicit k is the caller's: a replica refuses it
            return []
        return [lane.max_draft for lane in (self.draft, self.target) if lane.max_draft > 0]

    # -- the loop -----------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[StepEvent]:
        started = time.perf_counter()
        try:
            await self._open(self.target)
            if self.params.speculative:
                await self._open(self.draft)
            k = self.params.num_draft
            produced = 0
            while True:
                remaining = self.params.max_tokens - produced
                # A step yields up to k+1 tokens; never draft past max_tokens.
                k_step = min(k, remaining - 1, *self._replica_draft_caps()) if self.draft.backend else 0
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
                self.stats.count_block(len(drafted), kept)
                self.stats.target_tokens += int(len(emitted) > kept)
                self.stats.tokens += len(emitted)
                produced += len(emitted)
                self.decoded.extend(emitted)  # the lanes see it: their synced prefix follows
                if finish is None and produced >= self.params.max_tokens:
                    finish = "length"
                if self.params.num_draft_auto and drafted:
                    k = next_num_draft(k, outcome, len(drafted), AUTO_MIN_DRAFT, self.params.max_num_draft)
                self.stats.final_num_draft = k
                visible = [t for t in emitted if t != self.eos_id]
                from_draft = [i < kept for i, t in enumerate(emitted) if t != self.eos_id]
                if finish is not None:
                    # Free both sessions before the client hears we are done.
                    await asyncio.shield(self.close())
                    self.stats.total_s = time.perf_counter() - started
                    yield StepEvent(visible, finish, from_draft)
                    return
                yield StepEvent(visible, finish, from_draft)
        finally:
            self.stats.total_s = time.perf_counter() - started
            await asyncio.shield(self.close())

    async def _step(self, k: int) -> tuple[StepOutcome, list[int]]:
        """One propose -> verify -> accept. Every random draw is keyed by the request's seed and
        the output position it decides (``position_uniforms``), never by the step."""
        sampling, seed = self.params.sampling, self.params.seed
        proposal: Proposal | None = await self._call(self.draft, [], k, seed) if k > 0 else None
        drafted = proposal.tokens if proposal is not None else []
        if proposal is not None:
            self.stats.draft_passes += len(drafted)
        distributions = proposal.distributions if proposal is not None else []
        verdict: Verdict = await self._call(self.target, drafted, len(drafted), seed, distributions)
        uniforms = position_uniforms(seed, ACCEPT_STREAM, len(self.decoded), len(drafted))
        if sampling.greedy:
            outcome = accept_greedy(drafted, verdict.argmax, uniforms, self.params.delta)
        else:
            draft_probs = proposal.token_probs if proposal is not None else []
            outcome = accept_sampled(
                drafted, draft_probs, verdict.draft_probs, verdict.resampled, uniforms, self.params.delta
            )
        return outcome, drafted


# Codes that mean the replica lost our session, not that it is down.
SESSION_LOST = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED})


def check_reply(role: str, request: StepRequest, result: Any, address: str) -> None:
    """A reply must have the shape the request implies; a malformed one is the replica's fault
    (ReplicaError: fail over), never something to act on."""
    k = request.num_draft
    sampled = not request.sampling.greedy
    base = request.rollback_to or request.expected_length
    if role == "draft":
        n = len(result.tokens)
        problems = [
            n > k and f"{n} tokens for k={k}",
            len(result.token_probs) != n and f"{len(result.token_probs)} probabilities for {n} tokens",
            sampled and len(result.distributions) != n and f"{len(result.distributions)} distributions for {n} tokens",
            result.length != base + len(request.append_tokens) + n and f"length {result.length}",
        ]
    else:
        problems = [
            len(result.argmax) != k + 1 and f"{len(result.argmax)} argmax for k={k}",
            sampled and len(result.draft_probs) != k and f"{len(result.draft_probs)} p(d) for k={k}",
            sampled and len(result.resampled) != k + 1 and f"{len(result.resampled)} resampled for k={k}",
            result.length != base + len(request.append_tokens) and f"length {result.length}",
        ]
    found = [p for p in problems if p]
    if found:
        raise ReplicaError(address, grpc.StatusCode.INTERNAL, "malformed reply: " + "; ".join(found))


def new_request_id() -> str:
    """A short id that every log line about one request carries, in all three processes."""
    return secrets.token_hex(4)
