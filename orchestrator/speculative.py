"""The speculative loop: propose k -> verify -> accept -> roll back, with failover.

Transport-agnostic: it talks to ``DraftBackend``/``TargetBackend`` objects handed out by a
``BackendSource`` (gRPC replicas in the service, in-process hosts in the benchmark).

Draft and target are two ``Lane``s handled by one mechanism (open, call, fail over, resync);
the one real difference is what happens when no replica of a role is left: without a draft
the target finishes alone, without a target the request fails (``Lane.optional``).

Pipelining sits beside the serial step as one object (``drafting_ahead.DraftAhead``): the step
asks it for a block drafted ahead, and whether to draft the next one while the target verifies.

Each service session holds the committed decoder tokens as a prefix (``Lane.synced`` of
them) plus whatever it drafted or scored beyond. The next call rolls it back to that prefix
and appends what it lacks, in the same message (no extra round trip). See
docs/architecture.md for the whole path of a token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from specdec_core.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from specdec_core.sampling import ACCEPT_STREAM, position_uniforms
from specdec_core.steps import Distribution, Proposal, SamplingParams, StepRequest, Verdict

from .acceptance import StepOutcome, accept_greedy, accept_sampled
from .backend_protocol import Backend, BackendSource, ReplicaError, ReplicaFailure, loop_time
from .drafting_ahead import DraftAhead
from .estimates import PlanMemory, StepRecord
from .lanes import Lane, check_reply, draft_token_probs, drop_timing, timing_problem
from .params import GenerationParams, Stats, StepEvent, new_request_id
from .planner import Planner

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 8  # per request: past this a flapping cluster is reported, not retried forever
DEFAULT_CALL_TIMEOUT_S = 60.0  # --call-timeout's default: past it a hung replica is failed over
# Closes of sessions abandoned by a failover or a cancelled request run off the request path;
# keep them referenced.
_ABANDONED: set[asyncio.Task[None]] = set()
Result = TypeVar("Result")


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
        plan_memory: PlanMemory | None = None,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ):
        self.source = source
        self.call_timeout_s = call_timeout_s  # the most one call to a worker may take (--call-timeout)
        self.prompt_ids = prompt_ids
        self.params = params
        self.eos_id = eos_id
        self.deadline = deadline
        self.request_id = request_id or new_request_id()
        self.decoded = [decoder_start_id]  # committed decoder tokens: start + output
        self.stats = Stats(seed=params.seed, final_num_draft=params.num_draft)
        self.draft = Lane("draft", self.decoded)
        self.target = Lane("target", self.decoded)
        self.plan_memory = plan_memory  # the replica pairs' costs, and what earlier requests learned
        self.planner: Planner | None = None  # set once both sessions are open
        self.ahead = DraftAhead(params, eos_id, self.stats)  # pipelining, beside the loop
        self._closed = False  # both sessions closed (``_close_once``)

    # -- timing -------------------------------------------------------------------------------
    def _call_deadline(self) -> float:
        """A downstream call's deadline: the request's, at most the per-call limit from now."""
        now = time.monotonic()
        if self.deadline is None:
            return now + self.call_timeout_s
        if self.deadline <= now:
            raise DeadlineExceeded("the request's deadline passed during generation")
        return min(self.deadline, now + self.call_timeout_s)

    # -- lanes --------------------------------------------------------------------------------
    def _choose(self, lane: Lane, full: list[ResourceExhausted]) -> Backend | None:
        """A replica to open the lane's session on (``lane.opening`` until it is attached). None:
        none left for a draft lane (the target finishes alone); for the target lane that is an
        error (RESOURCE_EXHAUSTED if the last ones were full, as in ``full``)."""
        backend = self.source.acquire(lane.role, lane.failed)
        if backend is None and not lane.optional:
            if full:  # every target left is at its session or cache limit
                raise ResourceExhausted(f"every target replica is full; last: {full[-1]}")
            raise Unavailable(
                "no target replica is available (all down or failed for this request); "
                "start a target service or check --target addresses"
            )
        lane.opening = backend
        return backend

    async def _open(self, lane: Lane, full: list[ResourceExhausted] | None = None,
                    chosen: Backend | None = None) -> None:
        """Open the lane's session on a replica (``chosen``, or one it chooses), failing over until
        one accepts; with none left, see ``_choose``."""
        full = list(full or [])
        while True:
            backend = chosen if chosen is not None else self._choose(lane, full)
            chosen = None
            if backend is None:
                return  # a draft lane: finish with the target alone
            try:
                session_id = await self._open_session(backend)
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
            finally:
                lane.opening = None
            lane.attach(backend, session_id)
            return

    async def _open_session(self, backend: Backend) -> str:
        """Open a session for this request on ``backend``. If the request is cancelled or its
        deadline passes meanwhile, the open still runs to its end and the session it returns is
        closed: a worker that answered just as the request gave up would otherwise hold the session
        until its TTL. So the call itself carries only the per-call limit: cut by the request's
        deadline, it could lose the id of a session the worker had just made."""
        if self.deadline is not None and self.deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline passed during generation")
        opening = asyncio.ensure_future(backend.open(self.prompt_ids, self.request_id, self.call_timeout_s))
        try:
            async with asyncio.timeout_at(None if self.deadline is None else loop_time(self.deadline)):
                return await asyncio.shield(opening)
        except (asyncio.CancelledError, TimeoutError) as error:
            opening.add_done_callback(lambda done: _close_opened(backend, done))
            if isinstance(error, TimeoutError):
                raise DeadlineExceeded("the request's deadline passed while its session opened") from None
            raise

    async def _open_lanes(self) -> None:
        """Open the target's session and, when speculating, the draft's. Pipelined, both at once
        (the draft encodes its prompt while the target encodes it: only the slower open is on
        the way to the first token); otherwise one after the other, the serial baseline."""
        if not self.params.speculative:  # no draft: no planner either
            await self._open(self.target)
            return
        if not self.params.pipeline:
            await self._open(self.target)
            await self._open(self.draft)
            self._start_planner()
            return
        # The target's replica is chosen first: with none left the request fails here, before a
        # draft replica is bothered with a session for a request that cannot run. Its open task
        # starts before anything can cancel it (tasks run in the order they were made), and hands
        # the replica back itself if the open fails or is cancelled.
        chosen = self._choose(self.target, [])
        await _all(self._open(self.target, chosen=chosen), self._open_draft_and_draft_ahead())

    async def _open_draft_and_draft_ahead(self) -> None:
        """Pipelined start: open the draft's session, choose the first step's k and draft its
        block while the target still encodes the prompt (the target's open is the longer one),
        so the first Verify goes out as soon as the target's session is open."""
        await self._open(self.draft)
        self._start_planner()
        k = self.ahead.first_k = self._num_draft(self.params.max_tokens)
        if k == 0:
            return
        # None: the draft lane closed (no replica left)
        ready = self.ahead.ready = await self._call(self.draft, [], k, self.params.seed, ahead=True)
        if ready is not None:
            if self.planner is not None and ready.timed:
                self.planner.pair.observe_draft(len(ready.tokens), ready.model_ms / 1e3, ready.batch_size,
                                                time.perf_counter())

    async def _call(self, lane: Lane, block: list[int], num_draft: int, seed: int,
                    draft_distributions: Sequence[Distribution] = (), ahead: bool = False
                    ) -> Proposal | Verdict | None:
        """One Propose or Verify on the lane, failing over (and resyncing the new replica from
        the prompt and the committed tokens) while replicas fail. None: the draft lane closed.

        ``ahead``: a Propose that drafts on after the committed tokens and ``block`` (drafting
        ahead); None as soon as the session no longer holds them (after a failover).

        A session that vanished on a live replica (NOT_FOUND, ABORTED: expired by TTL, or the
        replica restarted) is reopened there once before failing over; a full replica (its
        cache budget reached mid-request) is left for another, or for the target alone."""
        reopened: set[str] = set()
        while lane.backend is not None:
            backend = lane.backend
            if ahead and not lane.holds(block):
                return None
            request = (lane.extend_request(block, num_draft, self.params.sampling, seed, self._call_deadline())
                       if ahead else lane.request(block, num_draft, self.params.sampling, seed,
                                                  self._call_deadline(), draft_distributions))
            try:
                sent = time.perf_counter()
                result = await backend.step(request)
                wall_s = time.perf_counter() - sent
                check_reply(lane.role, request, result, backend.address)
            except ReplicaError as error:
                self._abandon(lane)
                if error.kind is ReplicaFailure.SESSION_LOST and backend.address not in reopened:
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
            lane.record(result.length, block + result.added_tokens)
            self.stats.count_reply(lane.role, result, self._drop_impossible_timing(lane.role, request, result,
                                                                                   wall_s, backend))
            return result
        return None

    def _drop_impossible_timing(self, role: str, request: StepRequest, result: Proposal | Verdict, wall_s: float,
                                backend: Backend) -> bool:
        """Drop an impossible timing report (``lanes.timing_problem``), keeping the reply's tokens;
        said at WARNING once per request. True if it was dropped."""
        problem = timing_problem(role, request, result, wall_s, backend.max_batch, backend.max_draft)
        if not problem:
            return False
        drop_timing(result)
        logger.log(logging.DEBUG if self.stats.dropped_timings else logging.WARNING, "req=%s %s %s reported an "
                   "impossible timing (%s): dropped, its tokens used", self.request_id, role, backend.address,
                   problem)
        return True

    async def _reopen(self, lane: Lane, backend: Backend) -> bool:
        """Open a new session for the lane on the same replica; False if that fails too."""
        try:
            session_id = await self._open_session(backend)
        except (ReplicaError, ResourceExhausted) as error:
            logger.info("req=%s reopening on %s failed: %s", self.request_id, backend.address, error)
            return False
        except BaseException:  # cancelled: the lane holds no session there, so nothing else hands it back
            self.source.release(backend)
            raise
        lane.attach(backend, session_id)
        return True

    def _replica_failed(self, lane: Lane, backend: Backend, error: ReplicaError) -> None:
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
        _close_in_background(backend, session_id)

    async def close(self) -> None:
        """Close both sessions, at once; safe on every exit path (errors here are only logged)."""
        self.stats.draft_replica, self.stats.target_replica = self.draft.address, self.target.address
        await _all(self._close_lane(self.draft), self._close_lane(self.target))

    async def _close_lane(self, lane: Lane) -> None:
        backend, lane.backend = lane.backend, None
        if backend is None:
            return
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

    # -- choosing k ---------------------------------------------------------------------------
    def _memory_key(self) -> tuple[str, str, SamplingParams, float]:
        """What k learned from one request carries to the next under: the same two replicas
        and the same sampling (acceptance depends on temperature, top-k, top-p and delta)."""
        target = self.target.backend or self.target.opening  # pipelined, the target may still be opening
        return (self.draft.backend.address, target.address if target is not None else "", self.params.sampling,
                self.params.delta)

    def _start_planner(self) -> None:
        """Every request with a draft has a planner (fixed k too: its steps teach the pair's costs,
        and it decides drafting ahead); only auto k asks it for k. Timed or untimed:
        ``GenerationParams.timed_k``."""
        if self.draft.backend is None:
            return
        timed, key, memory = self.params.timed_k, self._memory_key(), self.plan_memory
        pair = memory.costs(key[:2]) if memory else None  # the replica pair's, shared
        self.planner = Planner(timed, pair, memory.recall(key) if timed and memory else None)

    def _store_planner(self) -> None:
        if self.planner is not None and self.plan_memory is not None and self.draft.backend is not None:
            self.plan_memory.store(self._memory_key(), self.planner.learned())

    def _num_draft(self, remaining: int) -> int:
        """This step's k: the caller's, or auto's choice (within max_num_draft and every
        replica's --max-draft); never drafting past max_tokens (a step yields up to k+1 tokens)."""
        if self.ahead.first_k is not None:  # chosen while the target opened (its block is drafted)
            k, self.ahead.first_k = self.ahead.first_k, None
            if self.params.num_draft_auto and self.draft.backend is not None:
                k = min(k, self._auto_cap())  # the target's open failed over to a replica with a lower cap
            return k
        if self.draft.backend is None:  # no draft left: the target alone
            return 0
        if not self.params.num_draft_auto or self.planner is None:
            return min(self.params.num_draft, remaining - 1)
        k = self.planner.choose(self._auto_cap(), self.ahead.held(self.draft), self._sharing())
        self.stats.final_num_draft = k
        return min(k, remaining - 1)

    def _sharing(self) -> int:
        """Sessions on the target replica that could share its pass (the pool knows; in-process: 1); the
        replica's still opening, for the first step's k."""
        target = self.target.backend or self.target.opening
        return self.source.sessions_sharing(target) if target is not None else 1

    def _auto_cap(self) -> int:
        """The largest k auto may choose: max_num_draft and every replica's --max-draft."""
        return min([self.params.max_num_draft, *self._replica_draft_caps()])

    def _sessions(self) -> tuple[Backend | None, str, Backend | None, str]:
        """Which sessions the lanes hold: a step that changed them failed over or reopened one."""
        return (self.draft.backend, self.draft.session_id, self.target.backend, self.target.session_id)

    # -- the loop -----------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[StepEvent]:
        """The request's steps, as events. Both sessions are closed once, on every way out: before
        the last event when it finishes, or as it fails or is cancelled (``_close_once``)."""
        started = time.perf_counter()
        try:
            await self._open_lanes()
            produced = 0
            loop_from: tuple[float, float] | None = None  # the last step's start, and its time in calls
            while True:
                step_started = time.perf_counter()
                if loop_from is not None and self.planner is not None:
                    self.planner.observe_loop(step_started - loop_from[0] - loop_from[1])
                remaining = self.params.max_tokens - produced
                k_step = self._num_draft(remaining)
                outcome, drafted, record = await self._step(k_step, remaining)
                loop_from = (step_started, record.propose_s + record.verify_s)
                if self.planner is not None:
                    self.planner.observe(record)
                emitted = outcome.emitted(drafted)
                finish = None
                if self.eos_id in emitted:
                    emitted = emitted[: emitted.index(self.eos_id) + 1]
                    finish = "eos"
                # Draft tokens kept; an accepted EOS cuts the block (and the target's token) off.
                kept = min(outcome.accepted, len(emitted))
                self.stats.count_step(record, len(emitted), kept)
                produced += len(emitted)
                self.decoded.extend(emitted)  # the lanes see it: their synced prefix follows
                if finish is None and produced >= self.params.max_tokens:
                    finish = "length"
                visible = [t for t in emitted if t != self.eos_id]
                from_draft = [i < kept for i, t in enumerate(emitted) if t != self.eos_id]
                if finish is not None:
                    self._store_planner()
                    await self._close_once(started)  # both sessions freed before the client hears we are done
                    yield StepEvent(visible, finish, from_draft)
                    return
                yield StepEvent(visible, finish, from_draft)
        finally:
            await self._close_once(started)

    async def _close_once(self, started: float) -> None:
        """Close both sessions unless that is done (a cancel does not cut the close short); then the
        request's total time."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.shield(self.close())
        finally:
            self.stats.total_s = time.perf_counter() - started

    # -- one step ---------------------------------------------------------------------------------
    async def _step(self, k: int, remaining: int) -> tuple[StepOutcome, list[int], StepRecord]:
        """One propose -> verify -> accept (k = 0: no Propose, the target alone; the draft
        session catches up on its next call). Every random draw is keyed by the request's seed
        and the output position it decides (``position_uniforms``), never by the step."""
        sampling, seed, sharing = self.params.sampling, self.params.seed, self._sharing()
        sessions = self._sessions()
        caught_up = len(self.decoded) - self.draft.synced  # what the draft appends before drafting
        started = time.perf_counter()
        proposal = self.ahead.take(self.draft, k)
        was_ready = proposal is not None  # drafted ahead: no Propose in this step
        if was_ready:
            caught_up = 0
        elif k > 0:
            proposal = await self._call(self.draft, [], k, seed)
        proposed_at = time.perf_counter()
        drafted = proposal.tokens if proposal is not None else []
        distributions = proposal.distributions if proposal is not None else []
        verify = self._call(self.target, drafted, len(drafted), seed, distributions)
        ahead = self.ahead.size(self.draft, self.planner, self._auto_cap(), k, drafted, remaining, sharing)
        predrafted: Proposal | None = None
        if not ahead:
            verdict: Verdict = await verify
            verify_end = ahead_end = time.perf_counter()
        else:
            # Drafting ahead while the target verifies (a failover loses the guess: None). Both
            # finish before the loop goes on: a draft session never has two steps at once.
            (verdict, verify_end), (predrafted, ahead_end) = await _all(
                _ended(verify), _ended(self._call(self.draft, drafted, ahead, seed, ahead=True)))
        verified_at = time.perf_counter()
        uniforms = position_uniforms(seed, ACCEPT_STREAM, len(self.decoded), len(drafted))
        if sampling.greedy:
            outcome = accept_greedy(drafted, verdict.argmax, uniforms, self.params.delta)
        else:
            draft_probs = draft_token_probs(proposal) if proposal is not None else []
            outcome = accept_sampled(
                drafted, draft_probs, verdict.draft_probs, verdict.resampled, uniforms, self.params.delta
            )
        self.ahead.keep(predrafted, drafted, outcome)
        record = StepRecord(
            requested=k if proposal is not None else 0,  # a draft lane that closed asked for nothing
            accepted=outcome.accepted,
            drafted=len(drafted),
            # (no failover or reopen inside, and every reply's timing believed)
            timed=self._sessions() == sessions and verdict.timed
            and all(p.timed for p in (proposal, predrafted) if p is not None),
            propose_s=proposed_at - started,
            propose_model_s=proposal.model_ms / 1e3 if proposal is not None else 0.0,
            propose_batch=proposal.batch_size if proposal is not None else 1,
            propose_end=proposed_at,
            caught_up=caught_up,
            verify_s=verified_at - proposed_at,
            verify_model_s=verdict.model_ms / 1e3,
            verify_batch=verdict.batch_size,
            verify_rows=verdict.batch_rows,
            verify_end=verify_end,
            sharing=sharing,
            drafted_ahead=was_ready,
            ahead_drafted=len(predrafted.tokens) if predrafted is not None else 0,
            ahead_model_s=predrafted.model_ms / 1e3 if predrafted is not None else 0.0,
            ahead_batch=predrafted.batch_size if predrafted is not None else 1,
            ahead_end=ahead_end,
        )
        return outcome, drafted, record


def _close_in_background(backend: Backend, session_id: str) -> None:
    """Close a session no request holds any more, off the request path (errors only logged)."""

    async def close_quietly() -> None:
        try:
            await backend.close(session_id)
        except Exception as error:  # noqa: BLE001 - the worker's owner lease or TTL frees it instead
            logger.debug("closing abandoned session on %s failed: %s", backend.address, error)

    task = asyncio.get_running_loop().create_task(close_quietly())
    _ABANDONED.add(task)
    task.add_done_callback(_ABANDONED.discard)


def _close_opened(backend: Backend, opening: asyncio.Future[str]) -> None:
    """An open whose request was cancelled has ended: close the session it opened, if any."""
    if not opening.cancelled() and opening.exception() is None:
        _close_in_background(backend, opening.result())


async def _ended(call: Awaitable[Result]) -> tuple[Result, float]:
    """A call's result and when it came (``time.perf_counter``): the planner places passes in time."""
    result = await call
    return result, time.perf_counter()


async def _all(*calls: Awaitable[Any]) -> list[Any]:
    """Run calls concurrently and wait until EVERY one has finished (unlike ``gather``, none is
    left running when another fails); then their results, or the first one's error."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        # Let each run its own clean-up (an open hands its replica back) before the caller's.
        await asyncio.wait(tasks)
        _take_errors(tasks)
        raise
    _take_errors(tasks)
    return [task.result() for task in tasks]


def _take_errors(tasks: list[asyncio.Future[Any]]) -> None:
    """Mark every task's error as seen: only the first is raised, and another one (both calls
    ran out of the request's deadline) would reach the log as "Task exception was never
    retrieved", with a traceback, at ERROR."""
    for task in tasks:
        if not task.cancelled():
            task.exception()

