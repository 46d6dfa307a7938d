"""``specdec status --watch``: the cluster's replicas refreshed every few seconds, like ``top``.

Each refresh asks the orchestrator's ``Status`` and shows, per replica, its health, sessions,
cache use and, between this reading and the one before, the mean batch size its model thread
ran, tokens per second (a target's: tokens of this orchestrator's requests that finished on it),
steps per second and the draft acceptance (a draft's). Rates need two readings: the first block
shows "-" for them. On a terminal each block replaces the last (the screen is cleared); anywhere
else the blocks follow one another as plain text, with no escape codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from specdec_core.sizes import format_bytes
from specdec_pb import specdec_pb2 as pb

CLEAR = "\033[H\033[2J"  # cursor home, clear the screen


def _rate(now: int, before: int, seconds: float) -> str:
    return f"{(now - before) / seconds:.1f}" if seconds > 0 and now >= before else "-"


def format_block(status: pb.StatusResponse, before: pb.StatusResponse | None, seconds: float,
                 clock: str) -> str:
    """One refresh: a header line and one row per replica; rates over ``seconds`` since ``before``."""
    previous = {r.address: r for r in before.replicas} if before is not None else {}
    rows = [("role", "address", "health", "sessions", "cache used", "batch", "tokens/s", "steps/s", "accepted")]
    for r in status.replicas:
        known = r.healthy and r.cache_memory_bytes > 0
        old = previous.get(r.address)
        batch = tokens = accepted = "-"
        if old is not None:
            batches = r.batches - old.batches
            if batches > 0 and r.batched_steps >= old.batched_steps:
                batch = f"{(r.batched_steps - old.batched_steps) / batches:.1f}"
            if r.role == "target":
                tokens = _rate(r.tokens, old.tokens, seconds)
            proposed = r.draft_proposed - old.draft_proposed
            if r.role == "draft" and proposed > 0:
                accepted = f"{(r.draft_accepted - old.draft_accepted) / proposed:.0%}"
        cache = (f"{format_bytes(r.cache_bytes_used)} ({100 * r.cache_bytes_used / r.cache_memory_bytes:.1f}%)"
                 if known else "-")
        rows.append((r.role, r.address, "serving" if r.healthy else "down",
                     str(r.live_sessions) if known else "-", cache, batch, tokens,
                     f"{r.steps_per_s:.1f}" if known else "-", accepted))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"specdec status at {clock}: {status.active_generations}/{status.max_generations} generations "
             f"in flight" + (f"; rates over the last {seconds:.1f} s" if before is not None else "")]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return "\n".join(lines)


def watch(read: Callable[[], pb.StatusResponse], interval: float, count: int | None, out: TextIO,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Print a block every ``interval`` seconds, ``count`` times (None: until Ctrl-C, which the
    caller turns into a clean exit)."""
    before: pb.StatusResponse | None = None
    read_at = 0.0
    shown = 0
    terminal = out.isatty()
    while count is None or shown < count:
        if shown:
            sleep(interval)
        status, now = read(), time.monotonic()
        block = format_block(status, before, now - read_at, time.strftime("%H:%M:%S"))
        out.write((CLEAR + block if terminal else block + "\n") + "\n")
        out.flush()
        before, read_at, shown = status, now, shown + 1
