"""Where this process computes (Info.device, Info.hostname), for whoever reads a worker's Info. (The
orchestrator's planner learns whether a draft slows its target from their timings, not from these.)"""

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
