"""grpc.aio server set-up shared by draft, target and orchestrator.

Health (grpc.health.v1) and reflection are always on; message sizes are capped; a request
that is not valid protobuf is INVALID_ARGUMENT (not grpc's UNKNOWN); TLS (optionally mutual)
and a bearer token are opt-in (a warning is logged when a non-loopback address is bound
without either). ``serve_until_signal`` drains on SIGTERM/SIGINT: NOT_SERVING first, then a
graceful stop. A worker's watchdog may also set NOT_SERVING while its model thread is stuck.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import inspect
import ipaddress
import json
import logging
import re
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec_core.limits import Checked, at_least

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise: no stranger gets in by default
# The orchestrator's cap: client requests are text prompts, and what it relays between draft and
# target (k <= 16 float16 distributions over the vocabulary) is ~1 MiB for T5. Workers size
# theirs from their own limits (specdec_grpc.worker.needed_message_mb).
DEFAULT_MAX_MESSAGE_MB = 16
PORTS = at_least(0, 65535)  # 0: a free one
# gRPC takes a message cap in bytes as a C int: 2047 MiB is the most it holds.
MESSAGE_MB = at_least(1, 2047)
GRACE_S = at_least(0)  # 0: in-flight calls are cut at once


@dataclass
class Security:
    """TLS and token settings of one server (all optional)."""

    cert: str | None = None  # PEM server certificate
    key: str | None = None  # PEM private key
    client_ca: str | None = None  # PEM CA: when set, clients must present a cert it signed (mTLS)
    token: str | None = None  # bearer token every call must carry ("authorization: Bearer ...")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Security:
        token = read_token(args.auth_token, args.auth_token_file, "--auth-token")
        return cls(args.tls_cert, args.tls_key, args.tls_client_ca, token)

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.cert and not self.key:
            if self.client_ca:
                raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (self.cert and self.key):
            raise SystemExit("TLS needs both --tls-cert and --tls-key")
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def read_token(value: str | None, file: str | None, flag: str) -> str | None:
    """The bearer token of ``flag`` (e.g. "--auth-token") or of its ``-file`` form (the file wins,
    surrounding whitespace stripped); None when neither is given. A token given but empty would
    turn authentication off without a word, so it stops the service (SystemExit, a message)."""
    if file:
        try:
            token = Path(file).read_text().strip()
        except OSError as error:
            raise SystemExit(f"error: {flag}-file {file}: cannot read it ({error.strerror})") from None
        if not token:
            raise SystemExit(f"error: {flag}-file {file} holds no token (it is empty or whitespace only); "
                             "refusing to start with authentication off: write the token into it, or drop the flag")
        return token
    if value is not None and not value.strip():
        raise SystemExit(f"error: {flag} is empty; refusing to start with authentication off: "
                         "give a token, or drop the flag")
    return value


def add_server_arguments(
    parser: argparse.ArgumentParser,
    default_port: int,
    default_max_message_mb: int | None = DEFAULT_MAX_MESSAGE_MB,
    max_message_help: str | None = None,
) -> None:
    """Flags every specdec server takes: address, message size, grace, TLS and token."""
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network: "
                             "use TLS and a token there)")
    parser.add_argument("--port", type=Checked(int, PORTS), default=default_port,
                        help=f"port to bind; 0 picks a free one and prints it (default {default_port})")
    parser.add_argument("--max-message-mb", type=Checked(int, MESSAGE_MB), default=default_max_message_mb,
                        help=max_message_help or f"largest request/response accepted, MiB (default {default_max_message_mb})")
    parser.add_argument("--grace", type=Checked(float, GRACE_S), default=10.0,
                        help=f"seconds in-flight calls get to finish on SIGTERM (default 10; {GRACE_S})")
    parser.add_argument("--tls-cert", help="PEM certificate: serve over TLS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA; clients must present a certificate it signed (mTLS)")
    parser.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN' on every call, and on "
                        "/metrics (--metrics-port)")
    parser.add_argument("--auth-token-file", help="read the bearer token from this file instead")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="DEBUG, INFO, WARNING or ERROR (any case; default INFO)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text (default) or json: one JSON object per line with time, level, logger, "
                             "message and, on lines about a request, its request_id")
    parser.add_argument("--metrics-port", type=Checked(int, PORTS), default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (same host as the "
                             "service; over TLS with --tls-cert); 0 picks a free port and prints it "
                             "(default: off)")


def bearer_matches(header: str | bytes | None, token: str) -> bool:
    """Does an Authorization header carry ``token`` in the Bearer scheme? The scheme's name in any
    case ("bearer", "BEARER": RFC 7235), one or more spaces, then the token (compared in constant time)."""
    text = header.decode("latin-1") if isinstance(header, bytes) else header or ""
    scheme, _, credentials = text.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.lstrip(" ").encode(), token.encode())


def require_bearer_token(app: Callable[..., Any], token: str) -> Callable[..., Any]:
    """A WSGI app that answers 401 unless the request carries ``token`` as every gRPC call must
    (``bearer_matches``): /metrics of a service started with --auth-token."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if bearer_matches(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Bearer realm="specdec"')])
        return [b"missing or wrong bearer token: send 'Authorization: Bearer TOKEN' (the service's --auth-token)\n"]

    return guarded


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token (UNAUTHENTICATED). Health stays open."""

    OPEN_SERVICES = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._token = token

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (metadata 'authorization: Bearer ...')")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

        async def deny_stream(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            await deny(request, context)
            yield  # pragma: no cover - abort raised first

        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

        async def deny_bidi(requests: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            await deny(requests, context)
            yield  # pragma: no cover - abort raised first

        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny_bidi)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(self.OPEN_SERVICES):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if bearer_matches(metadata.get("authorization"), self._token):
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.request_streaming:
            return self._deny_bidi
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


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


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    draining: bool = False  # set by shutdown: NOT_SERVING for good
    wedged: bool = False  # a worker's watchdog verdict: NOT_SERVING until it clears
    metrics: Any = None  # the Prometheus endpoint (specdec_grpc.metrics.MetricsEndpoint), if on

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    async def set_wedged(self, wedged: bool) -> None:
        """The watchdog's verdict: NOT_SERVING while wedged, SERVING again once it recovers
        (unless the server is draining, which stays NOT_SERVING)."""
        self.wedged = wedged
        if not self.draining:
            await self.set_serving(not wedged)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)


async def create_server(
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    host: str = DEFAULT_HOST,
    port: int = 0,
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    security: Security | None = None,
) -> RunningServer:
    """Build, bind and start a server; port 0 binds a free port (returned)."""
    security = security or Security()
    limit = max_message_mb * 1024 * 1024
    interceptors: list[grpc.aio.ServerInterceptor] = [BearerTokenInterceptor(security.token)] if security.token else []
    interceptors.append(MalformedRequestInterceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{host}:{port}"
    credentials = security.credentials()
    if not is_loopback(host) and credentials is None and not security.token:
        logger.warning(
            "binding %s with neither TLS nor a bearer token: anyone who can reach this address can "
            "call every RPC. Across hosts use --tls-cert/--tls-key and --auth-token-file (README: "
            "Replicas and several hosts), or bind 127.0.0.1", address,
        )
    try:
        bound = (
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise SystemExit(f"cannot bind {address}: {exc}") from exc
    if bound == 0:
        raise SystemExit(f"cannot bind {address}: port in use or address not available")
    await server.start()
    running = RunningServer(server, bound, health_servicer, service_names)
    await running.set_serving(True)
    return running


async def serve_until_signal(
    running: RunningServer,
    grace: float,
    on_drain: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then: NOT_SERVING, drain hook, stop with grace.

    ``ready`` (e.g. ``announce``) runs once the signal handlers are in place, so whoever
    waits for it may send SIGTERM at once and still get a graceful exit.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    waiter = asyncio.ensure_future(running.server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        await shutdown(running, grace, on_drain)
    waiter.cancel()
    stopper.cancel()


async def shutdown(
    running: RunningServer, grace: float, on_drain: Callable[[], Awaitable[None]] | None = None
) -> None:
    """What SIGTERM does: NOT_SERVING, the drain hook, then stop (in-flight calls get ``grace`` s)."""
    logger.info("shutting down: NOT_SERVING, draining for up to %.1fs", grace)
    running.draining = True
    await running.set_serving(False)
    if on_drain is not None:
        await on_drain()
    await running.server.stop(grace)
    if running.metrics is not None:
        await asyncio.to_thread(running.metrics.close)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name (or "", all interfaces): assume the network can reach it


def announce(role: str, host: str, port: int, metrics_port: int | None = None) -> None:
    """The line scripts and tests wait for: the bound address (port 0 picks one). With metrics
    on, a line ``specdec-<role> metrics on HOST:PORT`` comes first."""
    if metrics_port is not None:
        print(f"specdec-{role} metrics on {host}:{metrics_port}", flush=True)
    print(f"specdec-{role} listening on {host}:{port}", flush=True)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and request_id
    when the message is about a request (it carries ``req=<id>``, as every such line does)."""

    REQUEST_ID = re.compile(r"\breq=(\S+)")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        match = self.REQUEST_ID.search(message)
        if match and match.group(1) != "-":  # "-": a worker call without a request id
            entry["request_id"] = match.group(1)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
