"""The machine the benchmark runs on: thread caps for every process, and what it is (for the report)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import Any

from specdec_core import blas

from .cells import Settings


def limit_threads(threads: int) -> dict[str, str]:
    """Cap OpenBLAS and torch threads here; return the environment for the service processes."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads <= 0:
        return env
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    if blas.active_blas.startswith("openblas ("):
        library = blas.active_blas.removeprefix("openblas (").removesuffix(")")
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(library).openblas_set_num_threads(threads)
    import torch

    torch.set_num_threads(threads)
    return env


def machine(settings: Settings) -> dict[str, Any]:
    import mlx.core as mx
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "blas": blas.active_blas,
        "threads": settings.threads or "library defaults",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("load_average")
    load_text = f"; load average at start {load[0]:.1f}" if load else ""
    return (f"Machine: {info['platform']} ({info['machine']}), {info['cpus']} CPUs, Python {info['python']}, "
            f"MLX {info['mlx']}, BLAS {info['blas']}, threads {info['threads']}, torch {info['torch']}, "
            f"transformers {info['transformers']}{load_text}.")
