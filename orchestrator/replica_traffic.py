"""What this orchestrator's requests did on each replica, for ``Status`` (``specdec status --watch``).

Counted when a request ends, from its final stats, for the replicas that finished it (a request
that failed over counts where it ended): tokens generated on its target, draft tokens proposed
and accepted on its draft. Cumulative, so a client derives rates and acceptance from two readings.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from specdec_pb import specdec_pb2 as pb

from .params import Stats


@dataclass
class Traffic:
    tokens: int = 0
    draft_proposed: int = 0
    draft_accepted: int = 0


class ReplicaTraffic:
    def __init__(self) -> None:
        self.by_address: defaultdict[str, Traffic] = defaultdict(Traffic)

    def record(self, stats: Stats) -> None:
        if stats.target_replica:
            self.by_address[stats.target_replica].tokens += stats.tokens
        if stats.draft_replica:
            draft = self.by_address[stats.draft_replica]
            draft.draft_proposed += stats.proposed
            draft.draft_accepted += stats.accepted

    def fill(self, statuses: Iterable[pb.ReplicaStatus]) -> None:
        """Add the counts to ``statuses`` (by address)."""
        for status in statuses:
            traffic = self.by_address.get(status.address)
            if traffic is not None:
                status.tokens, status.draft_proposed = traffic.tokens, traffic.draft_proposed
                status.draft_accepted = traffic.draft_accepted
