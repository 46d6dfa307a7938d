"""Byte sizes as people write and read them: ``parse_size`` for a flag (``6GiB``, ``512MiB``,
``1.5GB``, plain bytes) and ``format_bytes`` for messages and tables. No MLX here."""

from __future__ import annotations

import math
import re

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB,
    # A bare letter is binary, as in `docker --memory 6g` and `java -Xmx6g`.
    "k": KIB, "m": MIB, "g": GIB, "t": TIB,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit (B, KB/MB/GB/TB in powers of 1000,
    KiB/MiB/GiB/TiB or K/M/G/T in powers of 1024; any case). ValueError, with a message that
    shows the accepted forms, for anything else."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in UNITS:
        raise ValueError(f"{text!r} is not a size: give bytes or a number with a unit, e.g. 6GiB, 512MiB, 1.5GB")
    value = float(match.group(1)) * UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large a size")
    return int(value)


def format_bytes(count: float) -> str:
    """``count`` bytes for a person: ``512 B``, ``96.0 KiB``, ``768.0 MiB``, ``6.00 GiB``."""
    if abs(count) < KIB:
        return f"{count:.0f} B"
    if abs(count) < MIB:
        return f"{count / KIB:.1f} KiB"
    if abs(count) < GIB:
        return f"{count / MIB:.1f} MiB"
    if abs(count) < TIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / TIB:.2f} TiB"
