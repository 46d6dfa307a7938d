"""A status sent on a call that has already ended (its deadline passed, its caller cancelled) ends
the handler as cancelled: gRPC logs a failed send at ERROR with a traceback, which the soak test
found on workers answering OpenSessions whose deadline had passed while they waited."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specdec_core.errors import InvalidArgument
from specdec_grpc.status import grpc_method


class CallAlreadyOver(Exception):
    """Stands for grpc's ExecuteBatchError: the send failed, the call is over."""


class EndedContext:
    def __init__(self, remaining: float | None):
        self.remaining = remaining
        self.aborts: list[grpc.StatusCode] = []

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborts.append(code)
        raise CallAlreadyOver


class LiveContext(EndedContext):
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborts.append(code)
        raise grpc.aio.AbortError


class Servicer:
    @grpc_method
    async def Fails(self, request: object, context: object) -> None:
        raise InvalidArgument("bad")


@pytest.mark.parametrize("remaining", [None, -1.0], ids=["failed-after-the-call-ended", "queued-past-deadline"])
def test_a_status_for_a_call_that_ended_ends_the_handler_as_cancelled(remaining: float | None) -> None:
    context = EndedContext(remaining)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(Servicer().Fails(object(), context))
    assert context.aborts  # it did try to tell the caller


def test_a_live_call_still_gets_its_status() -> None:
    context = LiveContext(None)
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(Servicer().Fails(object(), context))
    assert context.aborts == [grpc.StatusCode.INVALID_ARGUMENT]
