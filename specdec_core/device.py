"""Where this process computes (Info.device, Info.hostname): the orchestrator tells from them
whether a draft and a target share a processor."""

from __future__ import annotations

import functools
import socket


@functools.cache  # fixed for the process; Info asks at every health check
def compute_device() -> str:
    """MLX's default device: "gpu" (Metal, CUDA) or "cpu"."""
    import mlx.core as mx

    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


@functools.cache
def hostname() -> str:
    return socket.gethostname()
