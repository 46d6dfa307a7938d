"""Where this process computes (Info.device, Info.hostname): the orchestrator tells from them
whether a draft and a target share a processor."""

from __future__ import annotations

import socket


def compute_device() -> str:
    """MLX's default device: "gpu" (Metal, CUDA) or "cpu"."""
    import mlx.core as mx

    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def hostname() -> str:
    return socket.gethostname()
