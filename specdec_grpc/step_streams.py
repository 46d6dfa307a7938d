"""The worker's side of the step streams (ProposeStream/VerifyStream): reading a stream's requests
one step at a time, and ending idle streams when the worker drains. No MLX here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class StepStreams:
    """The requests of every open step stream (ProposeStream/VerifyStream), which ``end_all``
    can end between steps: a draining worker must not wait its whole grace period for streams
    whose sessions are idle (a draft at k = 0 may not step for a minute). A stream ended so
    finishes OK; its orchestrator asks the next step again on a new call, which the draining
    worker refuses (UNAVAILABLE), and fails over.

    The next message is read only once the last one is answered (the handler asks for it), so a
    client that sends faster than the model answers is held back by gRPC's flow control instead
    of filling the worker's memory."""

    def __init__(self) -> None:
        self._ends: set[asyncio.Future[None]] = set()
        self.ended = False

    async def requests(self, incoming: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The stream's requests, until the caller ends it or ``end_all`` does."""
        messages = aiter(incoming)
        end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ends.add(end)
        try:
            while not self.ended:
                # The read runs in its own task, so that ``end_all`` can wake a handler waiting on it.
                reading = asyncio.ensure_future(anext(messages))
                # A read abandoned by a cancel or ``end_all`` may still finish (gRPC ends it with
                # StopAsyncIteration when the call goes): its outcome is taken here, not left to
                # asyncio's "Task exception was never retrieved" at ERROR.
                reading.add_done_callback(_take_outcome)
                try:
                    await asyncio.wait((reading, end), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not reading.done():
                        reading.cancel()
                if not reading.done() or reading.cancelled():
                    break  # ended between steps
                try:
                    request = reading.result()  # raises e.g. a malformed request's abort: the handler's to raise
                except StopAsyncIteration:
                    break
                yield request
        finally:
            self._ends.discard(end)
            end.cancel()

    def end_all(self) -> None:
        self.ended = True
        for end in self._ends:
            if not end.done():
                end.set_result(None)


def _take_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
