"""The orchestrator's Prometheus metrics (``--metrics-port``, served by ``specdec_grpc.metrics``):
requests by outcome and status code, and the counters of the requests' own stats
(``orchestrator.params.Stats``), updated once per request when it ends
(``Orchestrator.generate``), so they agree exactly with the stats clients receive. docs/monitoring.md
lists every metric (tests/test_metrics.py checks it against what the services serve)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from specdec_grpc.status import status_for

from .backend_protocol import Backend, BackendSource
from .unfinished_closes import UNFINISHED_CLOSES_MAX

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CANCELLED = grpc.StatusCode.CANCELLED.name


def code_of(error: BaseException) -> str:
    """The status code a failed request got: domain errors as ``status_for`` maps them (what the
    servicer answers); a request whose caller went away is CANCELLED."""
    if isinstance(error, GeneratorExit | asyncio.CancelledError):
        return CANCELLED
    return status_for(error).name


class OrchestratorMetrics:
    """The orchestrator's metrics. ``request_ended`` is ``Orchestrator.metrics``' hook."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specdec_requests", "Generation requests that ended, by outcome (ok or "
                                "error) and gRPC status code", ["outcome", "code"], registry=r)
        self._ok = self.requests.labels("ok", grpc.StatusCode.OK.name)
        self.tokens = Counter("specdec_generation_tokens", "Tokens generated (an EOS included), as the "
                              "requests' stats count them", registry=r)
        self.steps = Counter("specdec_steps", "Speculative steps (one target pass each)", registry=r)
        self.num_drafts = Counter("specdec_spec_decode_num_drafts", "Steps that drafted (k >= 1)", registry=r)
        self.num_draft_tokens = Counter("specdec_spec_decode_num_draft_tokens", "Draft tokens proposed",
                                        registry=r)
        self.num_accepted_tokens = Counter("specdec_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                           registry=r)
        self.accepted_per_pos = Counter("specdec_spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position (1 = first)",
                                        ["position"], registry=r)
        self.draft_tokens_per_pos = Counter("specdec_spec_decode_num_draft_tokens_per_pos",
                                            "Draft tokens proposed at each draft position (1 = first)",
                                            ["position"], registry=r)
        self._per_pos: list[tuple[Any, Any]] = []  # children of the two above, by position - 1
        self.failovers = Counter("specdec_failovers", "Replica failures a request failed over from, by "
                                 "role", ["role"], registry=r)
        self._failovers = {role: self.failovers.labels(role) for role in ("draft", "target")}
        self.target_alone = Counter("specdec_target_alone_requests", "Finished requests the target "
                                    "decoded alone: speculation turned off by the request (requested), or "
                                    "no draft replica was available (no_draft)", ["reason"], registry=r)
        self.dropped = Counter("specdec_dropped_worker_reports", "Worker reports dropped as impossible, never "
                               "folded into shared state: a step's timing (step; its tokens were used) or a "
                               "load reading from Info (info)", ["role", "report"], registry=r)
        self._dropped = {(role, report): self.dropped.labels(role, report)
                         for role in ("draft", "target") for report in ("step", "info")}
        self.unfinished_closes = Counter(
            "specdec_unfinished_closes", "Session closes that failed on a replica while this orchestrator "
            "renews its owner lease, by event: failed (kept to ask again at the health checks), closed (by a "
            f"retry), dropped (given up over the bound of {UNFINISHED_CLOSES_MAX} per replica; the worker's idle "
            "TTL frees it)",
            ["role", "event"], registry=r)
        self._unfinished_closes = {(role, event): self.unfinished_closes.labels(role, event)
                                   for role in ("draft", "target") for event in ("failed", "closed", "dropped")}
        self.live = Gauge("specdec_live_generations", "Generations in flight", registry=r)
        self.ttft = Histogram("specdec_time_to_first_token_seconds", "Arrival to the first token (EOS "
                              "aside), of requests that finished", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("specdec_time_per_output_token_seconds", "(end to end - time to first "
                              "token) / (tokens - 1), of finished requests with a first token and 2 tokens "
                              "or more",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("specdec_e2e_request_latency_seconds", "Arrival to the last token, of "
                             "requests that finished", buckets=E2E_BUCKETS, registry=r)

    def watch(self, orchestrator: Any) -> None:
        """Report the orchestrator's live generations, read when scraped."""
        self.live.set_function(lambda: orchestrator.active)

    def count_failures(self, source: BackendSource) -> BackendSource:
        """A ``BackendSource`` that counts replica failures by role, then passes them on: every
        ``report_failure`` is one failover in a request's stats (``Stats.failovers``)."""
        return _CountingSource(source, self._failovers)

    def dropped_report(self, role: str, report: str, count: int = 1) -> None:
        """``count`` reports of a worker of ``role`` dropped as impossible (``report``: step or info);
        ``ReplicaPool.on_dropped_report``."""
        child = self._dropped.get((role, report))
        if child is not None:
            child.inc(count)

    def unfinished_close(self, role: str, event: str, count: int) -> None:
        """``count`` failed closes of a replica of ``role`` ``event`` (failed, closed or dropped);
        ``ReplicaPool.on_unfinished_close``."""
        child = self._unfinished_closes.get((role, event))
        if child is not None:
            child.inc(count)

    def request_ended(self, params: Any, stats: Any, error: BaseException | None, elapsed_s: float) -> None:
        """One request ended: ``stats`` (None if refused before it started) are final; ``error``
        is None if it finished (the client got its last message and stats)."""
        if error is None:
            self._ok.inc()
        else:
            self.requests.labels("error", code_of(error)).inc()
        if stats is None:
            return
        self.tokens.inc(stats.tokens)
        self.steps.inc(stats.steps)
        for role, count in stats.dropped_timings.items():
            self.dropped_report(role, "step", count)
        proposed = stats.proposed_per_position
        accepted = stats.accepted_per_position
        if proposed:
            self.num_drafts.inc(proposed[0])
            self.num_draft_tokens.inc(stats.proposed)
            self.num_accepted_tokens.inc(stats.accepted)
            per_pos = self._per_pos
            while len(per_pos) < len(proposed):
                position = str(len(per_pos) + 1)
                per_pos.append((self.draft_tokens_per_pos.labels(position), self.accepted_per_pos.labels(position)))
            for (drafted_child, accepted_child), drafted, kept in zip(per_pos, proposed, accepted, strict=False):
                drafted_child.inc(drafted)
                accepted_child.inc(kept)
        if error is None:
            if params is not None and not params.speculative:
                self.target_alone.labels("requested").inc()
            elif not stats.draft_replica:
                self.target_alone.labels("no_draft").inc()
            ttft = stats.time_to_first_token_s
            self.e2e.observe(elapsed_s)
            if ttft > 0:
                self.ttft.observe(ttft)
                if stats.tokens > 1:
                    self.tpot.observe(max(0.0, elapsed_s - ttft) / (stats.tokens - 1))


class _CountingSource:
    """A ``BackendSource`` that counts each failure it hears of by the replica's role."""

    def __init__(self, source: BackendSource, children: dict[str, Any]):
        self._source = source
        self._children = children
        self.acquire = source.acquire
        self.release = source.release
        self.sessions_sharing = source.sessions_sharing

    def report_failure(self, backend: Backend, error: Exception) -> None:
        child = self._children.get(backend.role)
        if child is not None:
            child.inc()
        self._source.report_failure(backend, error)
