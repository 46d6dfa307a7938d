"""Is a port free to bind? Asked before a service loads its model (minutes for T5-11B), so a port
in use stops it at once rather than after the load. No gRPC here: ``scripts/up`` asks it too."""

from __future__ import annotations

import errno
import socket


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (None: it can, or ``port`` is 0, any free one).

    A probe socket binds and closes at once, with SO_REUSEADDR as gRPC's own listener has, so a
    port whose last connections linger in TIME_WAIT counts as free, as it is for gRPC."""
    if port == 0:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        return f"cannot resolve {host}: {error.strerror}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return "port in use"
            return error.strerror or str(error)
    return None


def require_free(host: str, port: int, flag: str = "--port") -> None:
    """Stop the process with one line (SystemExit) when ``host:port`` cannot be bound."""
    problem = port_problem(host, port)
    if problem is not None:
        raise SystemExit(f"error: cannot bind {host}:{port} ({flag}): {problem}; "
                         f"pick another {flag} (0 picks a free one)")
