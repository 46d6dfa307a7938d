"""The README's sessions table: a target's cache bytes per session, and how many such sessions
fit on a Mac beside its weights, from the one formula (``specdec_core.cache_bytes``) and the
default budget's rule (``specdec_core.machine_memory``). Formula-based; a test checks the README
prints exactly this. ``python -m specdec_tools.sessions_table`` prints it."""

from __future__ import annotations

from specdec_core.cache_bytes import CacheShape, typical_session_bytes
from specdec_core.machine_memory import MachineBudget, margin_for
from specdec_core.sizes import GIB, format_bytes

# Decoder shape (24 layers, heads x d_kv) at bfloat16, and the weights served beside the caches:
# the README's "serve" peak (GiB) at the weight setting named (8-bit for T5-11B, whose bfloat16
# weights alone need a 32 GB Mac).
TARGETS = {
    "T5-large": (CacheShape(layers=24, heads=16, d_kv=64, element_bytes=2), "bf16", 1.5),
    "T5-3B": (CacheShape(layers=24, heads=32, d_kv=128, element_bytes=2), "bf16", 5.5),
    "T5-11B": (CacheShape(layers=24, heads=128, d_kv=128, element_bytes=2), "8-bit", 12.2),
}
CACHES = {"bfloat16": None, "8-bit": 8, "4-bit": 4}  # --kv-bits
MACS_GB = (16, 32, 64, 128)


def sessions_that_fit(physical: int, weights: int, session: int) -> int:
    """Sessions the default --cache-memory admits on a machine of ``physical`` bytes."""
    return max(0, MachineBudget(physical, weights, margin_for(physical)).bytes // session)


def sessions_table() -> str:
    """One row per target; each cell gives the bfloat16 / 8-bit / 4-bit K/V cache figures."""
    caches = " / ".join(CACHES)
    lines = [f"| target (weights) | bytes per session ({caches} K/V) | "
             + " | ".join(f"{gb} GB Mac" for gb in MACS_GB) + " |",
             "|---|---:|" + "---:|" * len(MACS_GB)]
    for name, (shape, weight_setting, weights_gib) in TARGETS.items():
        sessions = [typical_session_bytes(CacheShape(shape.layers, shape.heads, shape.d_kv, shape.element_bytes,
                                                     kv_bits=bits)) for bits in CACHES.values()]
        fits = [" / ".join(str(sessions_that_fit(gb * GIB, int(weights_gib * GIB), session)) for session in sessions)
                for gb in MACS_GB]
        lines.append(f"| {name} ({weight_setting}, {weights_gib} GiB) | {' / '.join(map(format_bytes, sessions))} | "
                     + " | ".join(fits) + " |")
    return "\n".join(lines)


def main() -> None:
    print(sessions_table())


if __name__ == "__main__":
    main()
