"""The session store shared by the draft and target services.

Holds each session's decoder state behind a lock, enforces the session limit and the
cache-token budget (RESOURCE_EXHAUSTED instead of running out of memory), and evicts
sessions idle past a TTL. Session ids are unguessable (``secrets.token_urlsafe``).

Ownership: a session opened with an owner (an orchestrator process's random id) is freed once
that owner has not been heard from (``heard``: its Info, or a call on one of its sessions) for
the owner lease, so a crashed orchestrator's sessions come back in seconds, not after the TTL.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .decoder_state import CHUNK, DecoderState
from .errors import ResourceExhausted, SessionNotFound


@dataclass
class Session:
    id: str
    state: DecoderState
    tag: str = ""
    last_used: float = 0.0
    owner: str = ""  # the orchestrator process that opened it; "": none (the idle TTL only)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def capacity_for(length: int) -> int:
    """Decoder slots the cache allocates to hold ``length`` positions (whole chunks)."""
    return -(-length // CHUNK) * CHUNK


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        max_cached_tokens: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        owner_lease_s: float = float("inf"),
    ):
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.ttl_s = ttl_s
        self.clock = clock
        self.owner_lease_s = owner_lease_s
        self._heard: dict[str, float] = {}  # owner -> when it was last heard from (clock)
        self._sessions: dict[str, Session] = {}
        # Room held for sessions being opened (encoding): counted by check_room like live
        # sessions, so concurrent opens cannot all pass the check and overshoot together.
        self._reserved_sessions = 0
        self._reserved_tokens = 0
        self.opened = 0
        self.expired = 0
        self.reclaimed = 0  # freed because their owner went silent

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def cached_tokens(self) -> int:
        return sum(s.state.cached_tokens for s in self._sessions.values())

    def check_room(self, extra_tokens: int, new_session: bool) -> None:
        """Raise ResourceExhausted unless ``extra_tokens`` more positions fit the budget."""
        sessions = len(self._sessions) + self._reserved_sessions
        if new_session and sessions >= self.max_sessions:
            raise ResourceExhausted(
                f"session limit reached: {sessions} of max_sessions={self.max_sessions} "
                "open or opening; close sessions or raise --max-sessions"
            )
        used = self.cached_tokens + self._reserved_tokens
        if used + extra_tokens > self.max_cached_tokens:
            raise ResourceExhausted(
                f"cache budget reached: {used} + {extra_tokens} token positions would exceed "
                f"max_cached_tokens={self.max_cached_tokens}; close sessions or raise --max-cached-tokens"
            )

    def reserve(self, tokens: int) -> None:
        """Hold room for one new session of ``tokens`` positions while it is being built
        (ResourceExhausted if it does not fit); ``release`` it once it is added or failed."""
        self.check_room(tokens, new_session=True)
        self._reserved_sessions += 1
        self._reserved_tokens += tokens

    def release(self, tokens: int) -> None:
        self._reserved_sessions -= 1
        self._reserved_tokens -= tokens

    def check_growth(self, session: Session, new_length: int) -> None:
        """Budget check before a step makes a session's decoder ``new_length`` long."""
        # The first chunk is already reserved (counted) from the moment the session opened.
        extra = capacity_for(new_length) - max(session.state.cache.capacity, CHUNK)
        if extra > 0:
            self.check_room(extra, new_session=False)

    def add(self, state: DecoderState, tag: str = "", owner: str = "") -> Session:
        session = Session(id=secrets.token_urlsafe(18), state=state, tag=tag, last_used=self.clock(), owner=owner)
        self._sessions[session.id] = session
        self.heard(owner)
        self.opened += 1
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(
                f"session {session_id[:12]!r} is unknown, closed or expired (idle TTL {self.ttl_s:g}s)"
            )
        session.last_used = self.clock()
        self.heard(session.owner)
        return session

    def heard(self, owner: str) -> None:
        """The owner is alive (it sent an Info, or a call on one of its sessions): renew its lease."""
        if owner:
            self._heard[owner] = self.clock()

    def pop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def expire_idle(self) -> list[Session]:
        """Drop sessions idle past the TTL that no call is using; return them."""
        deadline = self.clock() - self.ttl_s
        stale = [s for s in self._sessions.values() if s.last_used < deadline and not s.lock.locked()]
        for session in stale:
            self.pop(session.id)
        self.expired += len(stale)
        return stale

    def reclaim_orphaned(self) -> list[Session]:
        """Drop the sessions of owners not heard from within the lease that no call is using (a
        session in use is its owner's call, or one it left running: taken once it ends); return
        them. Owners silent past the lease are forgotten."""
        silent_since = self.clock() - self.owner_lease_s
        self._heard = {owner: at for owner, at in self._heard.items() if at >= silent_since}
        orphaned = [s for s in self._sessions.values()
                    if s.owner and s.owner not in self._heard and not s.lock.locked()]
        for session in orphaned:
            self.pop(session.id)
        self.reclaimed += len(orphaned)
        return orphaned
