"""A worker's limits, each declared once (``limits.limit``): the worker's command line, its Info
and the docs' limits table derive from this; no MLX here."""

from __future__ import annotations

from dataclasses import dataclass

from .limits import INT32_MAX, at_least, limit
from .sizes import MIB, parse_size


@dataclass
class HostLimits:
    max_sessions: int = limit(64, "--max-sessions", "sessions open at once; one more is RESOURCE_EXHAUSTED",
                              valid=at_least(1, INT32_MAX))
    cache_memory_bytes: int = limit(
        0, "--cache-memory",
        "bytes all sessions' caches may hold, e.g. 6GiB, 512MiB, 1.5GB (a session's bytes: its prompt "
        "and decoder positions x what a position costs at the model's shape, dtype and --kv-bits); "
        "0: from the machine, its physical memory less this process's after loading, less max(2 GiB, "
        "20%%); a session or step past it is RESOURCE_EXHAUSTED", parse=parse_size,
        valid=at_least(MIB, 2**50).or_zero("from the machine"))  # (1 PiB: more memory than any machine has)
    max_prompt_tokens: int = limit(2048, "--max-prompt-tokens", "a session's prompt tokens",
                                   valid=at_least(1, INT32_MAX))
    # A k past 256 gains nothing (at acceptance 0.99 a step's expected tokens are 92 of at most 100),
    # and the largest message, k draft distributions over the vocabulary, stays far under gRPC's 2 GiB.
    max_draft: int = limit(32, "--max-draft", "largest k accepted", valid=at_least(1, 256))
    # At least a second: a shorter TTL evicts sessions idle only between their own steps.
    session_ttl_s: float = limit(300.0, "--session-ttl",
                                 "seconds an idle session lives before eviction (frees what the owner "
                                 "lease does not: sessions opened without an owner, or left by a live one)",
                                 valid=at_least(1))
    # Ten renewals at the orchestrator's default --health-interval (1 s): a live orchestrator may
    # miss several checks in a row (a slow answer, a busy host) without losing a session, and a
    # crashed one's sessions still come back in seconds rather than after --session-ttl.
    owner_lease_s: float = limit(
        10.0, "--owner-lease",
        "seconds a session's owner (the orchestrator process that opened it) may go unheard before "
        "its sessions are freed; it renews with every health check (Info) and every call. An "
        "orchestrator refuses to start unless this is at least 3 of its --health-interval",
        valid=at_least(1))
    # 4096 is twice the orchestrator's largest max_tokens (2048); each position costs attention over
    # all earlier ones.
    max_decoder_tokens: int = limit(
        4096, "--max-decoder-tokens",
        "a session's decoder length (start token + generated/appended tokens); also the most tokens "
        "one call may append, since a failover resync appends a whole generation at once. Longer is "
        "INVALID_ARGUMENT; an orchestrator whose --max-tokens-cap + --max-num-draft does not fit "
        "refuses to start", valid=at_least(2, INT32_MAX))
    watchdog_s: float = limit(
        30.0, "--watchdog-s",
        "report NOT_SERVING (and refuse new sessions) while the model thread has had work waiting this "
        "many seconds without finishing any; SERVING again once it does. 0 = off (raise it where one "
        "forward pass can take longer, e.g. a large model on CPU)", valid=at_least(1).or_zero())
    max_batch: int = limit(16, "--max-batch",
                           "most sessions' steps run together in one batched forward pass (1 turns "
                           "batching off)", valid=at_least(1, INT32_MAX))
    batch_wait_ms: float = limit(
        0.0, "--batch-wait-ms",
        "how long the model thread may hold a step that finds it idle, to gather more sessions' steps "
        "into its batch (0: never; steps that arrive while a batch runs are batched anyway)",
        valid=at_least(0, 1000))  # a step held a second or more for company is a mistake, not a batch
