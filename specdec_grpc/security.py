"""Who may call a specdec server: TLS (optionally mutual), a bearer token, loopback by default.

``Security`` holds one server's settings and builds its credentials; ``BearerTokenInterceptor``
refuses a gRPC call without the token (health stays open); ``require_bearer_token`` guards the
/metrics endpoint with the same check (``bearer_matches``).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token (metadata 'authorization: Bearer ...')"


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


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name (or "", all interfaces): assume the network can reach it


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


async def _deny(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A streaming method's refusal (its request, or stream of requests, is never read)."""
    await _deny(request, context)
    yield  # pragma: no cover - abort raised first


# The refusal must have the refused method's shape: gRPC serves a handler as its kind says.
_DENY_UNARY = grpc.unary_unary_rpc_method_handler(_deny)
_DENY_STREAM = grpc.unary_stream_rpc_method_handler(_deny_streaming)
_DENY_BIDI = grpc.stream_stream_rpc_method_handler(_deny_streaming)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token (UNAUTHENTICATED). Health stays open."""

    OPEN_SERVICES = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._token = token

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
            return _DENY_BIDI
        if handler is not None and handler.response_streaming:
            return _DENY_STREAM
        return _DENY_UNARY
