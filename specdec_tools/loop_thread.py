"""An asyncio event loop in a daemon thread, for synchronous code that drives async servers.

The in-process servers and session hosts are asyncio code; the benchmark and the tests are
plain synchronous code. ``LoopThread.call`` runs one coroutine on the loop and blocks until it
returns, so both sides keep their natural style.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread; ``call`` runs a coroutine on it and waits."""

    def __init__(self, name: str = "loop-thread", timeout: float = 120) -> None:
        """``timeout``: how long ``call`` waits unless told otherwise, in seconds."""
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(
            self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
