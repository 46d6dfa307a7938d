"""The session store's owner leases (``specdec_core/session_store.py``) on an injected clock: a
session belongs to the orchestrator process that opened it and is freed once that owner has gone
unheard for the lease; a session in use is kept; sessions without an owner follow the idle TTL
alone; a freed session gives its room back as a close does."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from specdec_core.decoder_state import DecoderState
from specdec_core.errors import ResourceExhausted, SessionNotFound
from specdec_core.session_store import SessionStore

LEASE_S, TTL_S = 10.0, 300.0
PROMPT_TOKENS = 100  # a session holds these plus the decoder's first chunk (256): 356 positions


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def state() -> DecoderState:
    cache = SimpleNamespace(length=0, capacity=0, encoder_length=PROMPT_TOKENS, rollback_to=lambda n: None)
    return DecoderState([0], cache)


def store(clock: Clock, max_sessions: int = 8, budget: int = 100_000) -> SessionStore:
    return SessionStore(max_sessions, budget, ttl_s=TTL_S, clock=clock, owner_lease_s=LEASE_S)


def test_an_owner_that_renews_keeps_its_sessions_and_a_silent_one_loses_them_after_the_lease() -> None:
    clock = Clock()
    sessions = store(clock)
    kept = [sessions.add(state(), owner="orch-a"), sessions.add(state(), owner="orch-a")]
    lost = sessions.add(state(), owner="orch-b")
    clock.now = 6.0
    sessions.heard("orch-a")  # its health check's Info
    clock.now = 9.9
    assert sessions.reclaim_orphaned() == []  # nobody silent for the lease yet
    clock.now = 10.5
    assert sessions.reclaim_orphaned() == [lost]
    assert sessions.reclaimed == 1 and len(sessions) == 2
    with pytest.raises(SessionNotFound):
        sessions.get(lost.id)
    clock.now = 12.0
    sessions.get(kept[0].id)  # a step on one of its sessions renews the owner too
    clock.now = 21.9
    assert sessions.reclaim_orphaned() == []
    clock.now = 22.5
    assert sorted(s.id for s in sessions.reclaim_orphaned()) == sorted(s.id for s in kept)
    assert sessions.reclaimed == 3 and len(sessions) == 0
    assert sessions.expired == 0  # the lease's doing, not the TTL's


def test_a_session_in_use_is_kept_until_its_call_ends() -> None:
    clock = Clock()
    sessions = store(clock)
    busy = sessions.add(state(), owner="orch-a")

    async def step_running() -> None:
        await busy.lock.acquire()
        clock.now = 2 * LEASE_S
        assert sessions.reclaim_orphaned() == []
        busy.lock.release()
        assert sessions.reclaim_orphaned() == [busy]

    asyncio.run(step_running())
    assert len(sessions) == 0


def test_sessions_without_an_owner_follow_the_idle_ttl_only() -> None:
    clock = Clock()
    sessions = store(clock)
    plain = sessions.add(state())
    clock.now = 30 * LEASE_S
    assert sessions.reclaim_orphaned() == [] and sessions.expire_idle() == []
    clock.now = TTL_S + 1
    assert sessions.reclaim_orphaned() == []
    assert sessions.expire_idle() == [plain]
    assert sessions.reclaimed == 0 and sessions.expired == 1


@pytest.mark.parametrize("limit", ["sessions", "budget"])
def test_a_reclaimed_session_gives_its_room_back(limit: str) -> None:
    """Full (the session limit, or the cache budget: two sessions of 356 positions in 800), a new
    session is refused; once a silent owner's session is reclaimed, it fits."""
    clock = Clock()
    sessions = store(clock, max_sessions=2) if limit == "sessions" else store(clock, budget=800)
    sessions.add(state(), owner="orch-a")
    sessions.add(state(), owner="orch-b")
    with pytest.raises(ResourceExhausted):
        sessions.reserve(PROMPT_TOKENS)
    clock.now = 5.0
    sessions.heard("orch-b")
    clock.now = LEASE_S + 1
    assert [s.owner for s in sessions.reclaim_orphaned()] == ["orch-a"]
    sessions.reserve(PROMPT_TOKENS)  # fits now
