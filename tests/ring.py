"""When the tensor-parallel tests may skip: only where this MLX has no ring backend at all.

Where MLX has one (its Linux and macOS wheels do), two ranks on loopback are expected to start
on this machine, so a ring that does not start is a failure of the test, not a skip.
"""

from __future__ import annotations

import mlx.core as mx
import pytest


def ring_backend_available() -> bool:
    try:
        return mx.distributed.is_available(backend="ring")
    except TypeError:  # an MLX whose is_available takes no backend: ask for any
        return mx.distributed.is_available()


def skip_without_ring_backend() -> None:
    if not ring_backend_available():
        pytest.skip("this MLX build has no ring backend (mx.distributed)")


def fail_ring_start(detail: str) -> None:
    pytest.fail("the MLX ring backend is available but did not start here (expected to work on "
                f"loopback; a failure, not a skip):\n{detail}")
