"""Load a fast BLAS into the global symbol scope before MLX is imported.

The Linux ``mlx[cpu]`` wheel links a reference BLAS. Loading Debian's OpenBLAS
(``libopenblas.so.0``) with ``RTLD_GLOBAL`` first makes MLX resolve ``sgemm`` and
friends to it: matmuls get 8-36x faster, and a block of k+1 decoder tokens costs
about as much as one, which is what makes verification nearly free on CPU.

Set ``SPECDEC_OPENBLAS=0`` to turn it off, or ``SPECDEC_OPENBLAS=/path/libopenblas.so``
to pick a library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

logger = logging.getLogger(__name__)

_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "libopenblas.so",
)

# What preload() decided, for Info and logs: e.g. "openblas (libopenblas.so.0)".
active_blas: str = "not checked"


def preload() -> str:
    """Load OpenBLAS globally on Linux when present; return a description of the BLAS in use."""
    global active_blas
    if active_blas != "not checked":
        return active_blas
    setting = os.environ.get("SPECDEC_OPENBLAS", "1").strip()
    if platform.system() != "Linux":
        active_blas = "platform default (Accelerate/Metal on macOS)"
    elif setting.lower() in ("0", "off", "false", "no"):
        active_blas = "mlx bundled reference BLAS (SPECDEC_OPENBLAS=0)"
    elif "mlx.core" in sys.modules:
        active_blas = "mlx bundled reference BLAS (mlx was imported before specdec_core)"
    else:
        candidates = (setting,) if setting not in ("1", "on", "true", "yes") else _CANDIDATES
        active_blas = "mlx bundled reference BLAS (libopenblas.so.0 not found; apt-get install libopenblas0-pthread)"
        for name in candidates:
            try:
                ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            active_blas = f"openblas ({name})"
            break
    logger.info("BLAS in use: %s", active_blas)
    return active_blas
