"""A worker's limits, each declared once (``limits.limit``): the worker's command line, its Info
and the docs' limits table derive from this; no MLX here."""

from __future__ import annotations

from dataclasses import dataclass

from .limits import limit


@dataclass
class HostLimits:
    max_sessions: int = limit(64, "--max-sessions", "sessions open at once; one more is RESOURCE_EXHAUSTED")
    max_cached_tokens: int = limit(
        262_144, "--max-cached-tokens",
        "token positions all sessions may hold, encoder and decoder (the cache memory budget)")
    max_prompt_tokens: int = limit(2048, "--max-prompt-tokens", "a session's prompt tokens")
    max_draft: int = limit(32, "--max-draft", "largest k accepted")
    session_ttl_s: float = limit(300.0, "--session-ttl",
                                 "seconds an idle session lives before eviction (frees what the owner "
                                 "lease does not: sessions opened without an owner, or left by a live one)")
    # Ten renewals at the orchestrator's default --health-interval (1 s): a live orchestrator may
    # miss several checks in a row (a slow answer, a busy host) without losing a session, and a
    # crashed one's sessions still come back in seconds rather than after --session-ttl.
    owner_lease_s: float = limit(
        10.0, "--owner-lease",
        "seconds a session's owner (the orchestrator process that opened it) may go unheard before "
        "its sessions are freed; it renews with every health check (Info) and every call. An "
        "orchestrator refuses to start unless this is at least 3 of its --health-interval")
    # 4096 is twice the orchestrator's largest max_tokens (2048) and the budget's per-session share
    # (262144 / 64 sessions); each position costs attention over all earlier ones.
    max_decoder_tokens: int = limit(
        4096, "--max-decoder-tokens",
        "a session's decoder length (start token + generated/appended tokens); also the most tokens "
        "one call may append, since a failover resync appends a whole generation at once. Longer is "
        "INVALID_ARGUMENT; an orchestrator whose --max-tokens-cap + --max-num-draft does not fit "
        "refuses to start")
    watchdog_s: float = limit(
        30.0, "--watchdog-s",
        "report NOT_SERVING (and refuse new sessions) while the model thread has had work waiting this "
        "many seconds without finishing any; SERVING again once it does. 0 = off (raise it where one "
        "forward pass can take longer, e.g. a large model on CPU)")
    max_batch: int = limit(16, "--max-batch",
                           "most sessions' steps run together in one batched forward pass (1 turns "
                           "batching off)")
    batch_wait_ms: float = limit(
        0.0, "--batch-wait-ms",
        "how long the model thread may hold a step that finds it idle, to gather more sessions' steps "
        "into its batch (0: never; steps that arrive while a batch runs are batched anyway)")
