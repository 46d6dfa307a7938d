"""The session store shared by the draft and target services.

Holds each session's decoder state behind a lock, enforces the session limit and the
cache budget in bytes (``--cache-memory``; a session's bytes from ``cache_bytes``: RESOURCE_EXHAUSTED
naming the bytes needed and free, instead of running out of memory), and evicts sessions idle
past a TTL. Session ids are unguessable (``secrets.token_urlsafe``).

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

from .cache_bytes import IndexCost, SessionCost, capacity_for, typical_session_bytes
from .decoder_state import CHUNK, DecoderState
from .errors import ResourceExhausted, SessionNotFound
from .sizes import format_bytes

# One byte a position: a store whose budget counts positions (tests of the store alone).
POSITION_COST = IndexCost(bytes_per_position=1)


@dataclass
class Session:
    id: str
    state: DecoderState
    tag: str = ""
    last_used: float = 0.0
    owner: str = ""  # the orchestrator process that opened it; "": none (the idle TTL only)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        cache_memory_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        owner_lease_s: float = float("inf"),
        cost: SessionCost = POSITION_COST,
    ):
        self.max_sessions = max_sessions
        self.cache_memory_bytes = cache_memory_bytes
        self.cost = cost  # what a session's positions cost (the engine's CacheShape or IndexCost)
        self.ttl_s = ttl_s
        self.clock = clock
        self.owner_lease_s = owner_lease_s
        self._heard: dict[str, float] = {}  # owner -> when it was last heard from (clock)
        self._sessions: dict[str, Session] = {}
        # Room held for sessions being opened (encoding): counted by check_room like live
        # sessions, so concurrent opens cannot all pass the check and overshoot together.
        self._reserved_sessions = 0
        self._reserved_bytes = 0
        self.opened = 0
        self.expired = 0
        self.reclaimed = 0  # freed because their owner went silent

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def cached_tokens(self) -> int:
        """Positions the live sessions hold memory for (encoder and decoder; for display)."""
        return sum(s.state.cached_tokens for s in self._sessions.values())

    def session_bytes(self, state: DecoderState) -> int:
        """What a live session holds: its prompt and its decoder capacity (at least the first chunk,
        which its first step allocates and its open reserved)."""
        return self.cost.session_bytes(state.cache.encoder_length, max(state.cache.capacity, CHUNK))

    def opening_bytes(self, prompt_tokens: int) -> int:
        """What a new session of ``prompt_tokens`` reserves: its prompt and the first chunk."""
        return self.cost.session_bytes(prompt_tokens, capacity_for(1))

    @property
    def bytes_used(self) -> int:
        """Bytes the live sessions hold, and the sessions being opened have reserved."""
        return sum(self.session_bytes(s.state) for s in self._sessions.values()) + self._reserved_bytes

    @property
    def bytes_free(self) -> int:
        return max(0, self.cache_memory_bytes - self.bytes_used)

    def typical_sessions_free(self) -> int:
        """How many more sessions of a typical size (``cache_bytes.TYPICAL_*``) fit: the budget's
        room and the session limit's."""
        by_bytes = self.bytes_free // max(1, typical_session_bytes(self.cost))
        return max(0, min(by_bytes, self.max_sessions - len(self._sessions) - self._reserved_sessions))

    def check_room(self, extra_bytes: int, new_session: bool, what: str = "the request") -> None:
        """Raise ResourceExhausted unless ``extra_bytes`` more fit the budget (``what`` needs them)."""
        sessions = len(self._sessions) + self._reserved_sessions
        if new_session and sessions >= self.max_sessions:
            raise ResourceExhausted(
                f"session limit reached: {sessions} of max_sessions={self.max_sessions} "
                "open or opening; close sessions or raise --max-sessions"
            )
        used = self.bytes_used
        if used + extra_bytes > self.cache_memory_bytes:
            raise ResourceExhausted(
                f"cache budget reached: {what} needs {format_bytes(extra_bytes)}, "
                f"{format_bytes(max(0, self.cache_memory_bytes - used))} free of "
                f"{format_bytes(self.cache_memory_bytes)} (--cache-memory); close sessions or raise "
                "--cache-memory"
            )

    def reserve(self, prompt_tokens: int) -> int:
        """Hold room for one new session of ``prompt_tokens`` while it is being built
        (ResourceExhausted if it does not fit); ``release`` the bytes returned once it is added
        or failed."""
        needed = self.opening_bytes(prompt_tokens)
        self.check_room(needed, new_session=True, what=f"a session of {prompt_tokens} prompt tokens")
        self._reserved_sessions += 1
        self._reserved_bytes += needed
        return needed

    def release(self, reserved_bytes: int) -> None:
        self._reserved_sessions -= 1
        self._reserved_bytes -= reserved_bytes

    def check_growth(self, session: Session, new_length: int) -> None:
        """Budget check before a step makes a session's decoder ``new_length`` long."""
        # The first chunk is already reserved (counted) from the moment the session opened.
        held = max(session.state.cache.capacity, CHUNK)
        extra = capacity_for(new_length) - held
        if extra > 0:
            self.check_room(
                extra * self.cost.bytes_per_position, new_session=False,
                what=f"growing session {session.id[:12]!r} from {held} to {capacity_for(new_length)} decoder "
                     "positions")

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
