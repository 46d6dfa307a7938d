"""Sessions whose CloseSession failed on one replica, kept to be asked again (docs/configuration.md,
"Session ownership").

A close that fails while this orchestrator lives (it timed out, the replica was briefly UNAVAILABLE)
would leave the session held until the worker's idle TTL: the pool's health checks keep renewing
its owner lease. So the pool keeps each such id with its replica and asks again at the health
checks (``ReplicaPool``). Bounded: past ``capacity`` the oldest is given up, left to the TTL.
"""

from __future__ import annotations

from collections import OrderedDict

# Per replica: ids of ~40 bytes, so ~40 KB at most; a backlog this deep means the replica has failed
# closes for a long while, and the oldest are the likeliest to be gone already.
UNFINISHED_CLOSES_MAX = 1024


class UnfinishedCloses:
    """Session ids to close again on one replica, oldest first."""

    def __init__(self, capacity: int = UNFINISHED_CLOSES_MAX):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, session_id: str) -> int:
        """Keep ``session_id`` (as the newest, if kept already); how many of the oldest were given up
        to keep within the capacity."""
        self._ids[session_id] = None
        self._ids.move_to_end(session_id)
        dropped = 0
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
            dropped += 1
        return dropped

    def oldest(self, count: int) -> list[str]:
        """Up to ``count`` ids, oldest first (they stay kept until ``discard``)."""
        return [session_id for session_id, _ in zip(self._ids, range(count), strict=False)]

    def discard(self, session_id: str) -> None:
        self._ids.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._ids
