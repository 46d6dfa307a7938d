"""The session core both draft and target services run: one model, many sessions.

All MLX work runs on one worker thread, off the asyncio loop, so health checks and Info
answer while a forward pass runs. Every step checks the caller's expected length
(ABORTED on mismatch), validates before it mutates, and restores the session if the work
fails, so no request can corrupt a session or disturb another.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from .cache_bytes import TYPICAL_PROMPT_TOKENS, typical_session_bytes
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    PrefixMismatch,
    ResourceExhausted,
    SpecdecError,
    Unavailable,
)
from .host_limits import HostLimits
from .machine_memory import machine_budget
from .session_store import Session, SessionStore
from .sizes import format_bytes
from .step_scheduler import QueuedStep, StepScheduler, restore
from .steps import Proposal, StepRequest, Verdict
from .worker_engine import WorkerEngine

logger = logging.getLogger(__name__)
Result = TypeVar("Result")


@dataclass
class HostMetrics:
    steps: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    batches: int = 0  # batched model-thread runs (a batch of one counts)
    batched_steps: int = 0  # steps that ran in them


@dataclass(frozen=True)
class StepTiming:
    """How one Propose or Verify spent its time on the worker (for metrics)."""

    kind: str  # "propose" or "verify"
    queue_s: float  # from the call's arrival on the worker's loop to the model thread starting it
    model_s: float  # the model work itself (forward passes, sampling)
    ok: bool  # False if the work failed (the session was restored)
    batch_size: int = 1  # steps in the batch this one ran in (model_s is the whole batch's)


class SessionHost:
    def __init__(self, engine: WorkerEngine, limits: HostLimits, role: str, tokenizer_fingerprint: str,
                 ranks_on_machine: int = 1):
        self.engine = engine
        # ranks_on_machine: tensor-parallel ranks sharing this machine, for the default budget.
        self.limits = limits = with_cache_budget(limits, engine, role, ranks_on_machine)
        self.role = role
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.store = SessionStore(limits.max_sessions, limits.cache_memory_bytes, limits.session_ttl_s,
                                  owner_lease_s=limits.owner_lease_s, cost=engine.cache_cost)
        self.metrics = HostMetrics()
        # Called on the event loop after every step that reached the model thread (metrics).
        self.step_listeners: list[Callable[[StepTiming], None]] = []
        self.draining = False
        self.drain_listeners: list[Callable[[], None]] = []  # told once, when draining starts
        self.broken: SpecdecError | None = None  # set by abort_steps: every call fails with it
        # One thread: MLX work is serialised, and the asyncio loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-mlx")
        self._scheduler = StepScheduler(engine, self._count_job, self._executor.submit, limits, self.metrics)
        self._expiry_task: asyncio.Task[None] | None = None
        # Watchdog: jobs submitted to the model thread and not done, and when it last made
        # progress (finished a job, or got work while idle). Updated from both threads.
        self._jobs_lock = threading.Lock()
        self._jobs_pending = 0
        self._progress_at = time.monotonic()
        self.wedged = False
        # Told (True/False) when the watchdog's verdict changes; the gRPC worker sets health.
        self.on_wedged: Callable[[bool], Awaitable[None]] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._expiry_task is None:
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_loop())
        if self._watchdog_task is None and self.limits.watchdog_s > 0:
            self._watchdog_task = asyncio.get_running_loop().create_task(self._watchdog_loop())

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            self._expiry_task = None
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def abort_steps(self, error: SpecdecError) -> None:
        """The model cannot serve any more: fail every queued and running step now with ``error``,
        and every later call too (without waiting for the model thread, which may never return)."""
        self.broken = error
        self._scheduler.abort(error)

    async def drain(self) -> None:
        """Refuse new work (UNAVAILABLE) from now on; calls already running finish."""
        self.draining = True
        for listener in self.drain_listeners:
            listener()

    async def _expire_loop(self) -> None:
        """One sweep frees what the idle TTL and the owner lease no longer hold, as a close does."""
        period = max(0.05, min(5.0, self.limits.session_ttl_s / 4, self.limits.owner_lease_s / 4))
        while True:
            await asyncio.sleep(period)
            for session in self.store.expire_idle():
                self._forget(session)
                logger.info("%s req=%s session %s expired after %gs idle", self.role, session.tag,
                            session.id[:8], self.limits.session_ttl_s)
            for session in self.store.reclaim_orphaned():
                self._forget(session)
                logger.info("%s req=%s session %s freed: its owner %s was not heard from for %gs (--owner-lease)",
                            self.role, session.tag, session.id[:8], session.owner[:8], self.limits.owner_lease_s)

    async def _watchdog_loop(self) -> None:
        limit = self.limits.watchdog_s
        period = max(0.05, min(1.0, limit / 4))
        while True:
            await asyncio.sleep(period)
            stalled = self.stalled_s()
            wedged = stalled > limit
            if wedged == self.wedged:
                continue
            self.wedged = wedged
            if wedged:
                logger.warning("%s model thread has had work waiting for %.1fs without finishing any "
                               "(watchdog %gs): NOT_SERVING, new sessions refused", self.role, stalled, limit)
            else:
                logger.warning("%s model thread is making progress again: SERVING", self.role)
            if self.on_wedged is not None:
                try:
                    await self.on_wedged(wedged)
                except Exception:  # noqa: BLE001 - the watchdog must keep watching
                    logger.exception("%s watchdog callback failed", self.role)

    def stalled_s(self) -> float:
        """Seconds the model thread has had work waiting without finishing any (0 when idle)."""
        with self._jobs_lock:
            return time.monotonic() - self._progress_at if self._jobs_pending else 0.0

    @property
    def idle(self) -> bool:
        """No step or encode is queued or running on the model thread."""
        with self._jobs_lock:
            return self._jobs_pending == 0

    async def run_on_model_thread(self, work: Callable[[], Result]) -> Result:
        """Run ``work`` on the model thread, ordered with the steps (e.g. a tensor-parallel
        ping, whose collectives must not overlap a pass); the watchdog counts it like a step."""
        job = self._executor.submit(work)
        self._count_job(job)
        return await asyncio.wrap_future(job)

    def _count_job(self, job: Future[object]) -> None:
        """Count a job (a step or an encode) for the watchdog until it is done or cancelled."""
        with self._jobs_lock:
            if self._jobs_pending == 0:
                self._progress_at = time.monotonic()  # idle until now: not stalled
            self._jobs_pending += 1
        job.add_done_callback(self._job_done)

    def _job_done(self, _: object) -> None:
        with self._jobs_lock:
            self._jobs_pending -= 1
            self._progress_at = time.monotonic()

    def _check_serving(self) -> None:
        if self.broken is not None:
            raise type(self.broken)(str(self.broken))
        if self.draining:
            raise Unavailable(f"the {self.role} service is draining (shutting down); use another replica")

    # -- operations ---------------------------------------------------------------------------
    async def open(self, prompt_ids: list[int], tag: str = "", deadline: float | None = None,
                   owner: str = "") -> Session:
        """A new session on the prompt, owned by ``owner`` ("": none; see ``SessionStore``). A caller
        that gave up meanwhile (cancelled, or its deadline passed during the encode) gets no
        session: nothing is kept for it, its reservation is given back."""
        self._check_serving()
        if self.wedged:
            raise Unavailable(
                f"the {self.role} service's model thread has made no progress for "
                f"{self.stalled_s():.0f}s (watchdog {self.limits.watchdog_s:g}s); use another replica"
            )
        self.engine.check_prompt(prompt_ids)  # (its length: where it entered, ``wire.WireLimits``)
        # The new session's positions (encoder + the decoder's first chunk) are reserved while it
        # encodes, so concurrent opens cannot all pass the budget check and overshoot together.
        reserved = self.store.reserve(len(prompt_ids))

        # Opens waiting together encode together (prompts of similar length in one padded pass).
        opening = QueuedStep("open", None, None, [], time.perf_counter(), prompt=list(prompt_ids),
                             open_deadline=deadline)
        try:
            state = await self._scheduler.submit(opening)
        finally:
            self.store.release(reserved)
        if deadline is not None and time.monotonic() >= deadline:
            logger.info("%s req=%s open dropped: the caller's deadline passed while it encoded", self.role,
                        request_tag(tag))
            raise DeadlineExceeded("the deadline passed while the prompt was encoded; no session was kept")
        session = self.store.add(state, request_tag(tag), owner)  # no await since release: still fits
        logger.info("%s req=%s session %s opened (%d prompt tokens)", self.role, session.tag, session.id[:8],
                    len(prompt_ids))
        return session

    async def propose(self, request: StepRequest) -> Proposal:
        """The draft's step: roll back, append, then propose up to ``num_draft`` tokens."""
        self.engine.check_k(request.num_draft)
        return await self._step("propose", request, request.num_draft)

    async def verify(self, request: StepRequest) -> Verdict:
        """The target's step: roll back, append (the last ``num_draft`` are drafts), score them."""
        return await self._step("verify", request, 0)

    async def _step(self, kind: str, request: StepRequest, grows_by: int) -> Proposal | Verdict:
        """Validate, roll back, append, then queue the step for the model thread's next batch.

        ``grows_by`` is how many positions the step may add (k for Propose), for the budget.
        If the request's deadline (``time.monotonic()`` clock) has passed when its batch is
        formed, it fails with DeadlineExceeded instead of running. Returns the result with the
        session's new length. A step that fails or whose caller gives up (cancellation) leaves
        the session as it was, and never fails or changes the other steps of its batch.
        """
        session = await self._acquire(request.session_id)
        released = False
        try:
            state = session.state
            saved = list(state.tokens)
            try:
                self._prepare(session, request.expected_length, request.rollback_to, request.append_tokens,
                              grows_by, request if kind == "verify" else None)
            except SpecdecError as error:
                logger.info("%s req=%s step refused: %s", self.role, session.tag, error)
                raise

            step = QueuedStep(kind, state, request, saved, time.perf_counter())
            future = self._scheduler.submit(step)

            def timed(done: asyncio.Future[Proposal | Verdict]) -> None:
                if step.finished and self.step_listeners:
                    timing = StepTiming(kind, step.started - step.arrived, step.finished - step.started,
                                        not done.cancelled() and done.exception() is None, step.batch_size)
                    for listener in self.step_listeners:
                        listener(timing)

            future.add_done_callback(timed)
            try:
                result = await asyncio.shield(future)
            except asyncio.CancelledError:
                # The caller gave up (deadline or cancel) and never sees the result. A step still
                # waiting leaves the queue; one in a running batch finishes with it. Either way,
                # once it is done, undo it and only then unlock the session.
                step.future.cancel()

                def undo(_: object) -> None:
                    restore(state, saved)
                    session.lock.release()

                future.add_done_callback(undo)
                released = True
                logger.info("%s req=%s step cancelled by the caller; session restored", self.role, session.tag)
                raise
            except SpecdecError as error:
                logger.info("%s req=%s step failed: %s", self.role, session.tag, error)
                raise
            self.metrics.steps += 1
            session.last_used = self.store.clock()
            result.length = state.length
            result.model_ms = (step.finished - step.started) * 1e3
            result.batch_size = step.batch_size
            if isinstance(result, Verdict):
                result.batch_rows = step.batch_rows
            return result
        finally:
            if not released:
                session.lock.release()

    async def rollback(self, session_id: str, expected_length: int, length: int) -> int:
        """Roll a session back: a pointer move on this thread, no MLX work, not a step."""
        if length < 1:
            raise InvalidArgument(f"length must be >= 1 (the decoder start token stays), got {length}")
        session = await self._acquire(session_id)
        try:
            self._prepare(session, expected_length, length, [], 0)
            session.last_used = self.store.clock()
            return session.state.length
        finally:
            session.lock.release()

    async def _acquire(self, session_id: str) -> Session:
        """Find a session and lock it for one step (never waits: steps must not overlap)."""
        self._check_serving()
        session = self.store.get(session_id)
        if session.lock.locked():
            # Steps of one session are sequential by contract; a concurrent one is a duplicate.
            raise PrefixMismatch(
                f"session {session_id[:12]!r} is busy with another step; steps of a session must "
                "not overlap"
            )
        await session.lock.acquire()  # free, so taken at once
        return session

    def _prepare(
        self, session: Session, expected_length: int, rollback_to: int, append_tokens: list[int], grows_by: int,
        verify: StepRequest | None = None,
    ) -> None:
        """Check the request against the session (a Verify's block and q too), then roll back and
        append: every check a step gets, before it changes anything."""
        state = session.state
        if expected_length != state.length:
            raise PrefixMismatch(
                f"session {session.id[:12]!r} has length {state.length}, the request expected "
                f"{expected_length}: a step was lost or repeated; reopen or resync the session"
            )
        base = rollback_to if rollback_to != 0 else state.length
        if not 1 <= base <= state.length:
            raise InvalidArgument(
                f"rollback_to must be in [1, {state.length}] (the session's length) or 0 (none), "
                f"got {rollback_to}"
            )
        new_length = base + len(append_tokens) + grows_by
        if new_length > self.limits.max_decoder_tokens:
            raise InvalidArgument(
                f"the step would make session {session.id[:12]!r} {new_length} decoder tokens long "
                f"(length {base} + {len(append_tokens)} appended + {grows_by} proposed); "
                f"max_decoder_tokens is {self.limits.max_decoder_tokens}"
            )
        self.engine.check_tokens(append_tokens, "append_tokens")
        self.store.check_growth(session, new_length)
        if verify is not None:
            self.engine.check_verify(new_length, verify.num_draft, verify.sampling, verify.draft_distributions)
        state.rollback_to(base)
        state.tokens.extend(append_tokens)

    async def close(self, session_id: str) -> bool:
        session = self.store.pop(session_id)
        if session is not None:
            self._forget(session)
            logger.info("%s req=%s session %s closed", self.role, session.tag, session_id[:8])
        return session is not None

    def _forget(self, session: Session) -> None:
        """A session left the store (closed, expired, reclaimed): no batch waits for it."""
        self._scheduler.forget(session.state)

    def renew(self, owner: str) -> None:
        """The owner is alive (it sent an Info): its sessions stay (``SessionStore.heard``)."""
        self.store.heard(owner)

    def snapshot(self) -> dict[str, int]:
        """Live figures for Info."""
        return {
            "live_sessions": len(self.store),
            "cached_tokens": self.store.cached_tokens,
            "cache_bytes_used": self.store.bytes_used,
            "typical_sessions_free": self.store.typical_sessions_free(),
            "sessions_opened": self.store.opened,
            "sessions_expired": self.store.expired,
            "sessions_reclaimed": self.store.reclaimed,
            "forward_passes": self.engine.forward_passes,
            "steps": self.metrics.steps,
            "request_bytes": self.metrics.request_bytes,
            "response_bytes": self.metrics.response_bytes,
            "batches": self.metrics.batches,
            "batched_steps": self.metrics.batched_steps,
        }


def with_cache_budget(limits: HostLimits, engine: WorkerEngine, role: str, ranks_on_machine: int = 1) -> HostLimits:
    """``limits`` with the cache budget settled: ``--cache-memory``, or with 0 the machine's
    (``machine_memory``); logged with what a session costs. ResourceExhausted if the machine has
    nothing left for caches."""
    cost = engine.cache_cost
    budget, source = limits.cache_memory_bytes, "--cache-memory"
    if budget <= 0:
        machine = machine_budget(engine.loaded.weight_bytes, ranks_on_machine)
        budget, source = machine.bytes, f"from the machine: {machine.describe()}"
        if budget <= 0:
            raise ResourceExhausted(f"no memory is left for session caches ({source}); give --cache-memory "
                                    "explicitly, or serve a smaller or more quantized model")
    typical = typical_session_bytes(cost)
    logger.info("%s cache budget %s (%s); a position costs %s, a typical session (%d-token prompt, its first "
                "decoder chunk) %s: %d fit", role, format_bytes(budget), source,
                format_bytes(cost.bytes_per_position), TYPICAL_PROMPT_TOKENS, format_bytes(typical),
                budget // typical)
    return replace(limits, cache_memory_bytes=budget)


def request_tag(tag: str) -> str:
    """The caller's request id as it appears in logs: printable, at most 64 characters."""
    return "".join(c for c in tag[:64] if c.isprintable() and not c.isspace()) or "-"
