"""Continuous batching on a worker's model thread: the steps waiting when the thread gets free
run as ONE batched forward pass (docs/architecture.md, "Batching").

Every Propose/Verify becomes a ``QueuedStep`` and a job on the model thread. A job takes the
waiting steps of the oldest step's kind (up to ``max_batch``), drops those whose caller gave
up or whose deadline passed, and runs the rest through the engine's ``propose_batch`` or
``verify_batch``; jobs that find the queue empty return at once. So steps that arrive while a
batch runs form the next batch: nobody waits for a batch to fill unless ``batch_wait_ms`` says
so. Isolation: every step was checked alone before it was queued (``SessionHost._prepare``), its
deadline is checked as its batch forms, and if the batched pass fails, each step is restored and
rerun alone, so a failure stays with the step that caused it.

Gathering: sessions answered together tend to come back together (each through its own
orchestrator turn), but not at once. Taking only those that are back when the thread gets free
splits them into cohorts that then alternate on the model thread for good (8 clients of the
target alone ran batches of 4: every pass paid for reading the weights with half the rows). So
a batch whose previous batch's sessions are still on their way waits for them, while they
usually come back within a small share of a pass (``Gathering``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .decoder_state import DecoderState
from .errors import DeadlineExceeded
from .host_limits import HostLimits
from .steps import Proposal, StepRequest, Verdict
from .worker_engine import WorkerEngine

if TYPE_CHECKING:
    from .session_host import HostMetrics

logger = logging.getLogger(__name__)

StepResult = Proposal | Verdict | DecoderState  # what a Propose, a Verify or an open gives its caller


@dataclass(eq=False)
class QueuedStep:
    """One session's Propose or Verify (or a session's opening), from its arrival until its
    batch has run."""

    kind: str  # "propose", "verify" or "open"
    state: DecoderState | None  # already rolled back and appended (SessionHost._prepare); None: open
    request: StepRequest | None  # None: open
    saved: list[int]  # the session's tokens before the step, to restore on failure
    arrived: float  # time.perf_counter() when it reached the worker
    prompt: list[int] | None = None  # open: the prompt to encode
    open_deadline: float | None = None  # open: the caller's deadline
    future: Future[StepResult] = field(default_factory=Future)
    started: float = 0.0  # when its batch began on the model thread
    finished: float = 0.0  # when its batch ended (0: never ran)
    batch_size: int = 0
    batch_rows: int = 0  # positions its batch's pass scored (Verify: the sum of every k+1)
    prepared: list[int] = field(init=False, default_factory=list)  # its tokens once rolled back and appended

    def __post_init__(self) -> None:
        self.prepared = list(self.state.tokens) if self.state is not None else []

    @property
    def deadline(self) -> float | None:
        return self.request.deadline if self.request is not None else self.open_deadline

    def restore(self, tokens: list[int]) -> None:
        if self.state is not None:
            restore(self.state, tokens)


# Wait for the last batch's sessions only while they come back within this share of a pass: a
# separate pass for the stragglers would cost a whole pass (the weights read again), so waiting a
# quarter of one for them pays; a session that takes longer (a draft's session, back only after
# the target's Verify) is not waited for.
GATHER_SHARE = 0.25
TURNAROUND_DECAY = 0.8  # of the mean time from a session's answer to its next step (follows load)


class Gathering:
    """What one kind of step (propose or verify) needs to gather batches: the sessions of its last
    batch, when each was answered, how long sessions take to come back, and what a pass costs."""

    def __init__(self) -> None:
        self.returning: set[int] = set()  # id(state) of the last batch's sessions not back yet
        self.answered_at = 0.0  # when the last batch was answered
        self.turnaround_s: float | None = None  # decayed mean, answer -> the session's next step
        self.pass_s = 0.0  # the last batch's pass

    def arrived(self, state: DecoderState | None, now: float) -> None:
        if id(state) in self.returning:
            self.returning.discard(id(state))
            seen = now - self.answered_at
            self.turnaround_s = seen if self.turnaround_s is None else (
                TURNAROUND_DECAY * self.turnaround_s + (1 - TURNAROUND_DECAY) * seen)

    def ran(self, batch: list[QueuedStep], pass_s: float, finished: float) -> None:
        self.returning, self.answered_at = {id(step.state) for step in batch}, finished
        self.pass_s = pass_s

    def wait_until(self, waiting: int, max_batch: int) -> float | None:
        """Until when a batch of ``waiting`` steps should wait for the last batch's sessions to come
        back, or None: it should not (none missing, room for none, or they come back too slowly)."""
        if not self.returning or waiting >= max_batch or self.turnaround_s is None:
            return None
        bound = GATHER_SHARE * self.pass_s
        if self.turnaround_s > bound:
            return None
        return self.answered_at + bound


class StepScheduler:
    """Forms batches of waiting steps and runs them on the model thread."""

    def __init__(self, engine: WorkerEngine, count_job: Callable[[Future[Any]], None],
                 run_on_model_thread: Callable[..., Future[Any]], limits: HostLimits, metrics: HostMetrics):
        self.engine = engine
        self._count_job = count_job  # the watchdog counts every step until it is done
        self._run_on_model_thread = run_on_model_thread
        self.max_batch = max(1, limits.max_batch)
        self.batch_wait_s = max(0.0, limits.batch_wait_ms) / 1e3
        self.metrics = metrics
        self._waiting: deque[QueuedStep] = deque()
        self._running: list[QueuedStep] = []  # the batch on the model thread now
        self._arrived = threading.Condition()
        self._gathering = {"propose": Gathering(), "verify": Gathering()}

    def submit(self, step: QueuedStep) -> asyncio.Future[StepResult]:
        """Queue a step; returns an asyncio future of its result (call on the event loop)."""
        self._count_job(step.future)
        with self._arrived:
            if step.kind in self._gathering:
                self._gathering[step.kind].arrived(step.state, step.arrived)
            self._waiting.append(step)
            self._arrived.notify()
        self._run_on_model_thread(self._run_next)
        return asyncio.wrap_future(step.future)

    # -- on the model thread ------------------------------------------------------------------
    def _run_next(self) -> None:
        batch = self._take()
        if batch:
            self.run(batch)

    def _take(self) -> list[QueuedStep]:
        """The next batch: waiting steps of the oldest one's kind, at most max_batch."""
        with self._arrived:
            if not self._drop_cancelled():
                return []
            if self.batch_wait_s > 0 and self._waiting[0].kind != "open":  # an open is never held
                # Hold the oldest step up to batch_wait_s after its arrival for more to join.
                until = self._waiting[0].arrived + self.batch_wait_s
                while self._drop_cancelled() < self.max_batch and (left := until - time.perf_counter()) > 0:
                    self._arrived.wait(left)
                if not self._drop_cancelled():
                    return []
            self._gather()
            if not self._drop_cancelled():
                return []
            kind = self._waiting[0].kind
            batch = [step for step in self._waiting if step.kind == kind][: self.max_batch]
            for step in batch:
                self._waiting.remove(step)
        # A step whose caller gives up from now on finishes with its batch and is undone after.
        return [step for step in batch if _claim(step.future)]

    def _gather(self) -> None:
        """Hold the next batch while the last batch of its kind still has sessions on their way
        back that usually come back soon (``Gathering``); called holding ``_arrived``."""
        kind = self._waiting[0].kind
        if self.max_batch == 1 or kind not in self._gathering:
            return
        gathering = self._gathering[kind]
        while True:
            same = sum(step.kind == kind for step in self._waiting)
            until = gathering.wait_until(same, self.max_batch)
            if until is None or (left := until - time.perf_counter()) <= 0:
                return
            self._arrived.wait(left)

    def forget(self, state: DecoderState) -> None:
        """A closed session will not come back: no batch waits for it."""
        with self._arrived:
            for gathering in self._gathering.values():
                gathering.returning.discard(id(state))

    def _drop_cancelled(self) -> int:
        """Forget waiting steps that already have an answer: their caller gave up (and restores
        them) or ``abort`` answered them; how many still wait."""
        if any(step.future.done() for step in self._waiting):
            self._waiting = deque(step for step in self._waiting if not step.future.done())
        return len(self._waiting)

    def abort(self, error: Exception) -> None:
        """Answer every waiting and running step with ``error`` now (the model can no longer
        serve, e.g. a tensor-parallel peer died mid-pass and the model thread may never return)."""
        with self._arrived:
            steps = [*self._waiting, *self._running]
        for step in steps:
            _settle(step.future, error=error)

    def run(self, batch: list[QueuedStep]) -> None:
        """Run one batch; every step's future gets its own result or its own error."""
        with self._arrived:
            self._running = batch
        try:
            self._run(batch)
        finally:
            with self._arrived:
                self._running = []

    def _run(self, batch: list[QueuedStep]) -> None:
        started = time.perf_counter()
        ready = [step for step in batch if self._admit(step)]
        results: Sequence[StepResult | Exception] = []
        if ready:
            try:
                results = self._work(ready)
            except Exception:  # noqa: BLE001 - find the step that failed: rerun each alone
                if len(ready) > 1:
                    logger.warning("a batch of %d %s steps failed; running them one by one", len(ready),
                                   ready[0].kind, exc_info=True)
                results = [self._alone(step) for step in ready]
        finished = time.perf_counter()
        if batch[0].kind != "open":  # Info's batch counters are about Propose/Verify steps
            self.metrics.batches += 1
            self.metrics.batched_steps += len(ready)
            with self._arrived:
                self._gathering[batch[0].kind].ran(batch, finished - started, finished)
        rows = sum(step.request.num_draft + 1 for step in ready) if batch[0].kind == "verify" else 0
        for step, result in zip(ready, results, strict=True):
            step.started, step.finished, step.batch_size, step.batch_rows = started, finished, len(ready), rows
            if isinstance(result, BaseException):
                _settle(step.future, error=result)
            else:
                _settle(step.future, result=result)

    def _admit(self, step: QueuedStep) -> bool:
        """A step whose deadline passed while it waited does not run: it fails alone (restored)."""
        try:
            check_deadline(step.deadline, "encoding the prompt" if step.kind == "open" else f"the {step.kind} step")
            return True
        except Exception as error:  # noqa: BLE001 - the step's own error, reported to its caller
            step.restore(step.saved)
            step.finished = step.started = time.perf_counter()
            step.batch_size = 1
            _settle(step.future, error=error)
            return False

    def _work(self, steps: list[QueuedStep]) -> Sequence[StepResult]:
        if steps[0].kind == "open":
            return self.engine.start_batch([s.prompt for s in steps])
        if steps[0].kind == "propose":
            return self.engine.propose_batch(
                [(s.state, s.request.num_draft, s.request.sampling, s.request.seed) for s in steps])
        return self.engine.verify_batch(
            [(s.state, s.request.num_draft, s.request.sampling, s.request.seed,
              list(s.request.draft_distributions)) for s in steps])

    def _alone(self, step: QueuedStep) -> StepResult | Exception:
        """Put the step back as it was queued and run it by itself: its result, or its error."""
        step.restore(step.prepared)
        try:
            return self._work([step])[0]
        except Exception as error:  # noqa: BLE001 - this step's own failure
            step.restore(step.saved)
            return error


def _claim(future: Future[StepResult]) -> bool:
    """Mark a step's future running; False if it was cancelled or already answered (abort)."""
    if future.done():
        return False
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # abort answered it just now
        return False


def _settle(future: Future[StepResult], result: StepResult | None = None, error: BaseException | None = None) -> None:
    """Give a step its answer unless it has one (``abort`` may have answered it already)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(
            f"the caller's deadline passed before {what} could run (it waited for the model); "
            "nothing was changed: retry with a longer deadline or use a less loaded replica"
        )


def restore(state: DecoderState, saved: list[int]) -> None:
    """Put a session back as it was before a failed step."""
    common = 0
    for a, b in zip(saved, state.tokens, strict=False):
        if a != b:
            break
        common += 1
    state.tokens[:] = saved
    if state.cache.length > common:
        state.cache.rollback_to(common)
