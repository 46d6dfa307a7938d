"""The session core both draft and target services run: one model, many sessions.

All MLX work runs on one worker thread, off the asyncio loop, so health checks and Info
answer while a forward pass runs. Every step checks the caller's expected length
(ABORTED on mismatch), validates before it mutates, and restores the session if the work
fails, so no request can corrupt a session or disturb another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from .engine import DecoderState, Distribution, ModelEngine, Proposal, Verdict
from .errors import DeadlineExceeded, InvalidArgument, PrefixMismatch, Unavailable
from .sampling import SamplingParams
from .session_store import Session, SessionStore, capacity_for

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class HostLimits:
    max_sessions: int = 64
    max_cached_tokens: int = 262_144  # token positions over all sessions (encoder + decoder)
    max_prompt_tokens: int = 2048
    max_draft: int = 32
    session_ttl_s: float = 300.0  # an orchestrator that vanished frees its sessions after this


@dataclass
class HostMetrics:
    steps: int = 0
    request_bytes: int = 0
    response_bytes: int = 0


class SessionHost:
    def __init__(self, engine: ModelEngine, limits: HostLimits, role: str, tokenizer_fingerprint: str):
        self.engine = engine
        self.limits = limits
        self.role = role
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.store = SessionStore(limits.max_sessions, limits.max_cached_tokens, limits.session_ttl_s)
        self.metrics = HostMetrics()
        self.draining = False
        # One thread: MLX work is serialised, and the asyncio loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-mlx")
        self._expiry_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._expiry_task is None:
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_loop())

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            self._expiry_task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def drain(self) -> None:
        """Refuse new work (UNAVAILABLE) from now on; calls already running finish."""
        self.draining = True

    async def _expire_loop(self) -> None:
        period = max(0.05, min(5.0, self.limits.session_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            for session_id in self.store.expire_idle():
                logger.info("%s session %s expired after %.0fs idle", self.role, session_id[:8],
                            self.limits.session_ttl_s)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _check_serving(self) -> None:
        if self.draining:
            raise Unavailable(f"the {self.role} service is draining (shutting down); use another replica")

    # -- operations ---------------------------------------------------------------------------
    async def open(self, prompt_ids: list[int], tag: str = "", deadline: float | None = None) -> Session:
        self._check_serving()
        self.engine.check_prompt(prompt_ids)
        if len(prompt_ids) > self.limits.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt has {len(prompt_ids)} tokens; max_prompt_tokens is {self.limits.max_prompt_tokens}"
            )
        self.store.check_room(len(prompt_ids) + capacity_for(1), new_session=True)

        def start() -> DecoderState:
            _check_deadline(deadline, "encoding the prompt")
            return self.engine.start(prompt_ids)

        state = await self._run(start)
        # Re-check: other sessions may have opened while this one was encoding.
        self.store.check_room(0, new_session=True)
        return self.store.add(state, tag)

    async def step(
        self,
        session_id: str,
        expected_length: int,
        rollback_to: int,
        append_tokens: list[int],
        grows_by: int,
        work: Callable[[DecoderState], T],
        deadline: float | None = None,
    ) -> tuple[T, int]:
        """Validate, roll back, append, then run ``work`` on the worker thread.

        ``grows_by`` is how many positions ``work`` may add (k for Propose), for the budget.
        ``deadline`` (``time.monotonic()`` clock): if it has passed when the worker thread
        gets to the step, the step fails with DeadlineExceeded instead of running.
        Returns the work's result and the session's new length. A step that fails or whose
        caller gives up (cancellation) leaves the session as it was.
        """
        session = await self._acquire(session_id)
        released = False
        try:
            state = session.state
            saved = list(state.tokens)
            self._prepare(session, expected_length, rollback_to, append_tokens, grows_by)

            def guarded() -> T:
                try:
                    _check_deadline(deadline, f"{self.role} step")
                    return work(state)
                except Exception:
                    _restore(state, saved)
                    raise

            future = asyncio.get_running_loop().run_in_executor(self._executor, guarded)
            try:
                result = await asyncio.shield(future)
            except asyncio.CancelledError:
                # The caller gave up (deadline or cancel) and never sees the result: once the
                # worker thread is done, undo the step and only then unlock the session.
                def undo(_: object) -> None:
                    _restore(state, saved)
                    session.lock.release()

                future.add_done_callback(undo)
                released = True
                raise
            self.metrics.steps += 1
            session.last_used = self.store.clock()
            return result, state.length
        finally:
            if not released:
                session.lock.release()

    async def propose(
        self, session_id: str, expected_length: int, rollback_to: int, append_tokens: list[int],
        num_draft: int, params: SamplingParams, seed: int, deadline: float | None = None,
    ) -> tuple[Proposal, int]:
        """The draft's step: roll back, append, then propose up to ``num_draft`` tokens."""
        self.engine.check_k(num_draft)
        return await self.step(
            session_id, expected_length, rollback_to, append_tokens, num_draft,
            lambda state: self.engine.propose(state, num_draft, params, seed), deadline,
        )

    async def verify(
        self, session_id: str, expected_length: int, rollback_to: int, append_tokens: list[int],
        num_draft: int, params: SamplingParams, seed: int, draft_distributions: list[Distribution],
        deadline: float | None = None,
    ) -> tuple[Verdict, int]:
        """The target's step: roll back, append (the last ``num_draft`` are drafts), score them."""
        return await self.step(
            session_id, expected_length, rollback_to, append_tokens, 0,
            lambda state: self.engine.verify(state, num_draft, params, seed, draft_distributions),
            deadline,
        )

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
        self, session: Session, expected_length: int, rollback_to: int, append_tokens: list[int], grows_by: int
    ) -> None:
        """Check the request against the session, then roll back and append (validate first)."""
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
        self.engine.check_tokens(append_tokens, "append_tokens")
        self.store.check_growth(session, base + len(append_tokens) + grows_by)
        state.rollback_to(base)
        state.tokens.extend(append_tokens)

    async def close(self, session_id: str) -> bool:
        return self.store.remove(session_id)

    def close_all(self) -> int:
        ids = self.store.ids()
        for session_id in ids:
            self.store.remove(session_id)
        return len(ids)

    def snapshot(self) -> dict[str, Any]:
        """Live figures for Info."""
        return {
            "live_sessions": len(self.store),
            "cached_tokens": self.store.cached_tokens,
            "sessions_opened": self.store.opened,
            "sessions_expired": self.store.expired,
            "forward_passes": self.engine.forward_passes,
            "steps": self.metrics.steps,
            "request_bytes": self.metrics.request_bytes,
            "response_bytes": self.metrics.response_bytes,
            "time": time.time(),
        }


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(
            f"the caller's deadline passed before {what} could run (it waited for the model); "
            "nothing was changed: retry with a longer deadline or use a less loaded replica"
        )


def _restore(state: DecoderState, saved: list[int]) -> None:
    """Put a session back as it was before a failed step."""
    common = 0
    for a, b in zip(saved, state.tokens, strict=False):
        if a != b:
            break
        common += 1
    state.tokens[:] = saved
    if state.cache.length > common:
        state.cache.rollback_to(common)
