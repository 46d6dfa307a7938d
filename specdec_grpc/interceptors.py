"""A request whose bytes are not a valid protobuf message is INVALID_ARGUMENT, not grpc's UNKNOWN."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request whose bytes did not parse; the handler answers INVALID_ARGUMENT."""

    error: str


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers a request body that is not a valid protobuf message (corrupt wire format, bad
    UTF-8 in a string) with INVALID_ARGUMENT; grpc's own answer is UNKNOWN. Wraps the
    deserializer of every method once (handlers are cached per method); on a stream of
    requests, the first malformed one ends the call."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = _tolerant(await continuation(details), method)
            if handler is not None:  # unknown methods are not cached: callers choose their names
                self._handlers[method] = handler
        return handler  # type: ignore[return-value]


def _tolerant(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.request_deserializer is None:
        return handler
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as error:
            return _Malformed(str(error))

    async def refuse(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is not a valid {method} message: {request.error}")

    if handler.request_streaming:
        if not handler.response_streaming or not inspect.isasyncgenfunction(handler.stream_stream):
            return handler  # none of ours: left to grpc
        bidi = handler.stream_stream

        async def stream_stream(requests, context):  # type: ignore[no-untyped-def]
            async def checked():  # type: ignore[no-untyped-def]
                async for request in requests:
                    if isinstance(request, _Malformed):
                        await refuse(request, context)
                    yield request

            async for item in bidi(checked(), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, handler.response_serializer)

    if not handler.response_streaming:
        inner = handler.unary_unary

        async def unary_unary(request: object, context: grpc.aio.ServicerContext) -> object:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)

    inner = handler.unary_stream
    if inspect.isasyncgenfunction(inner):

        async def unary_stream(request, context):  # type: ignore[no-untyped-def]
            if isinstance(request, _Malformed):
                await refuse(request, context)
            async for item in inner(request, context):
                yield item
    else:  # writes with context.write() (e.g. health Watch)

        async def unary_stream(request, context):  # type: ignore[no-untyped-def]
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await inner(request, context)

    return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, handler.response_serializer)
