"""Domain errors. Each names the situation of the error table in docs/architecture.md it stands for; the gRPC layer maps
them to status codes in one place (``specdec_grpc.status``), so no model code knows gRPC."""

from __future__ import annotations

import os


class SpecdecError(Exception):
    """Base class: a failure a person can act on, reported with its message."""


class InvalidArgument(SpecdecError, ValueError):
    """Malformed request: empty prompt, bad k/temperature/top-p/delta, token out of vocabulary."""


class SessionNotFound(SpecdecError, KeyError):
    """Unknown, closed or expired session."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class PrefixMismatch(SpecdecError):
    """The caller's expected prefix length differs from the session's (stale or repeated step)."""


class ResourceExhausted(SpecdecError):
    """Session limit or cache-token budget reached."""


class Unavailable(SpecdecError):
    """Service draining, or no replica of a dependency left."""


class CheckpointError(SpecdecError, ValueError):
    """A checkpoint directory or hub name that cannot be loaded: missing files, not T5, bad shapes.

    One line, ``<file>: <field>: <problem>`` (the file and the field where they are known), so a
    command line tool or a service prints it as it is.
    """

    def __init__(self, problem: str, *, file: str | os.PathLike[str] | None = None, field: str | None = None):
        self.problem, self.file, self.field = problem, file, field
        text = ": ".join(str(part) for part in (file, field, problem) if part is not None)
        super().__init__(" ".join(text.split()))  # a nested error's newlines would break the one line


class DeadlineExceeded(SpecdecError):
    """The caller's deadline passed before the work was done."""
