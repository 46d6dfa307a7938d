"""grpc.aio server set-up shared by draft, target and orchestrator: create, start, drain, stop.

Health (grpc.health.v1) and reflection are always on; message sizes are capped; a request
that is not valid protobuf is INVALID_ARGUMENT (``interceptors.py``); TLS (optionally mutual)
and a bearer token are opt-in (``security.py``; a warning is logged when a non-loopback address
is bound without either). ``serve_until_signal`` drains on SIGTERM/SIGINT: NOT_SERVING first,
then a graceful stop. A worker's watchdog may also set NOT_SERVING while its model thread is
stuck. Log formats: ``logging_setup.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec_core.limits import Checked, at_least
from specdec_grpc.interceptors import MalformedRequestInterceptor
from specdec_grpc.security import BearerTokenInterceptor, Security, is_loopback

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


def announce(role: str, host: str, port: int, metrics_port: int | None = None) -> None:
    """The line scripts and tests wait for: the bound address (port 0 picks one). With metrics
    on, a line ``specdec-<role> metrics on HOST:PORT`` comes first."""
    if metrics_port is not None:
        print(f"specdec-{role} metrics on {host}:{metrics_port}", flush=True)
    print(f"specdec-{role} listening on {host}:{port}", flush=True)
