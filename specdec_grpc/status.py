"""Domain errors -> gRPC status codes, in one place (the error table in docs/architecture.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc

from specdec_core.errors import (
    CheckpointError,
    DeadlineExceeded,
    InvalidArgument,
    PrefixMismatch,
    ResourceExhausted,
    SessionNotFound,
    SpecdecError,
    Unavailable,
)

logger = logging.getLogger(__name__)

STATUS_FOR_ERROR: dict[type[SpecdecError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    CheckpointError: grpc.StatusCode.FAILED_PRECONDITION,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    PrefixMismatch: grpc.StatusCode.ABORTED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on ``time.monotonic()``'s clock, or None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def status_for(error: BaseException) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[kind]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("%s failed unexpectedly", method)
        message = f"internal error in {method}: {type(error).__name__}: {error}"
    else:
        message = str(error)
    await send_status(context, code, message)


async def send_status(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code``; if it has already ended under us (its deadline passed or its
    caller cancelled: gRPC told the caller so), there is nobody to tell, and it ends as cancelled
    rather than as a failed send that gRPC would log at ERROR with a traceback."""
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # noqa: BLE001 - grpc's ExecuteBatchError: the call is over
        raise asyncio.CancelledError from None


def _report(servicer: Any, method: str, code: grpc.StatusCode) -> None:
    """Tell the servicer's optional ``on_error(method, code)`` hook (metrics) about a failed call."""
    hook = getattr(servicer, "on_error", None)
    if hook is not None:
        hook(method, code)


def grpc_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary servicer method: domain errors become their status, others INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Queued past its deadline: the caller has given up, so do not run the work.
            _report(self, fn.__name__, grpc.StatusCode.DEADLINE_EXCEEDED)
            await send_status(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the deadline passed before {fn.__name__} started; nothing was done")
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never crashes the server
            _report(self, fn.__name__, status_for(error))
            await _abort(context, error, fn.__name__)

    return wrapper


def grpc_stream_method(fn: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., AsyncGenerator[Any, None]]:
    """The same for server-streaming methods."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        try:
            async with contextlib.aclosing(fn(self, request, context)) as items:  # closed with the call
                async for item in items:
                    yield item
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001
            _report(self, fn.__name__, status_for(error))
            await _abort(context, error, fn.__name__)

    return wrapper
