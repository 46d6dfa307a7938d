"""Prometheus metrics of the specdec services (``--metrics-port``), one class per service kind.

Every service keeps its metrics in a registry of its own (never prometheus_client's global one:
tests run several services in one process) and serves it with prometheus_client's HTTP server
on the host the gRPC server binds. All names start with ``specdec_``; docs/monitoring.md lists
every metric (tests/test_metrics.py checks it against what the services serve).

- ``OrchestratorMetrics``: requests by outcome and status code, and the counters of the
  requests' own stats (``orchestrator.params.Stats``), updated once per request when it
  ends (``Orchestrator.generate``), so they agree exactly with the stats clients receive.
- ``WorkerMetrics``: a draft's or target's sessions, cache and forward passes (read from the
  ``SessionHost`` when scraped), step latency (queue wait and model time, from
  ``SessionHost.step_listeners``) and the calls it answered with an error status.

The hot paths pay a few dictionary lookups and counter increments per step or request; the
gauges cost nothing until a scrape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .status import status_for

logger = logging.getLogger(__name__)

# Worker steps: from well under a millisecond (tiny models) to seconds (T5-11B on CPU).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # sessions per batch (--max-batch defaults to 16)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CANCELLED = grpc.StatusCode.CANCELLED.name
STEP_KIND = {"draft": "propose", "target": "verify"}


@dataclass
class MetricsEndpoint:
    """prometheus_client's HTTP server for one registry (``/metrics``), on its own thread."""

    host: str
    port: int
    _server: Any

    def close(self) -> None:
        """Stop serving and free the port (blocks up to the server's poll interval, 0.5 s)."""
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int, certfile: str | None = None,
                  keyfile: str | None = None, client_cafile: str | None = None) -> MetricsEndpoint:
    """Serve ``registry`` over HTTP (HTTPS with a certificate) on host:port; port 0 picks a free one.
    With ``client_cafile`` (the service's --tls-client-ca) a scraper must present a certificate
    that CA signed, as gRPC clients must (mutual TLS)."""
    tls = {"client_cafile": client_cafile, "client_auth_required": True} if certfile and client_cafile else {}
    try:
        server, _ = start_http_server(port, addr=host, registry=registry, certfile=certfile, keyfile=keyfile,
                                      **tls)
    except OSError as error:
        raise SystemExit(f"cannot bind the metrics port {host}:{port}: {error}") from error
    endpoint = MetricsEndpoint(host, server.server_port, server)
    logger.info("metrics on %s://%s:%d/metrics", "https" if certfile else "http", host, endpoint.port)
    return endpoint


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

    def count_failures(self, source: Any) -> Any:
        """A ``BackendSource`` that counts replica failures by role, then passes them on: every
        ``report_failure`` is one failover in a request's stats (``Stats.failovers``)."""
        return _CountingSource(source, self._failovers)

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
    def __init__(self, source: Any, children: dict[str, Any]):
        self._source = source
        self._children = children
        self.acquire = source.acquire
        self.release = source.release

    def report_failure(self, backend: Any, error: Exception) -> None:
        child = self._children.get(getattr(backend, "role", ""))
        if child is not None:
            child.inc()
        self._source.report_failure(backend, error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


class WorkerMetrics:
    """A draft's or target's metrics, around its ``SessionHost``. Every metric has a ``role``
    label (draft or target) so both kinds can share one scrape job."""

    def __init__(self, host: Any, loop: asyncio.AbstractEventLoop | None = None):
        self.registry = CollectorRegistry()
        self.host = host
        role = host.role
        r = self.registry
        self.queue = Histogram("specdec_worker_step_queue_seconds", "Propose/Verify: from the call's arrival "
                               "to the model thread starting it", ["role", "kind", "outcome"],
                               buckets=STEP_BUCKETS, registry=r)
        self.model = Histogram("specdec_worker_step_model_seconds", "Propose/Verify: the model work itself",
                               ["role", "kind", "outcome"], buckets=STEP_BUCKETS, registry=r)
        self.batch = Histogram("specdec_worker_step_batch_size", "Propose/Verify: how many sessions' steps "
                               "ran in the batched forward pass this step ran in (continuous batching)",
                               ["role", "kind"], buckets=BATCH_BUCKETS, registry=r)
        self.rejected = Counter("specdec_worker_rejected_requests", "Calls answered with an error status, "
                                "by method and code", ["role", "method", "code"], registry=r)
        self._children: dict[tuple[str, bool], tuple[Any, Any]] = {}
        for ok in (True, False):  # the role's own step, so its series exist from the start
            self._child(STEP_KIND.get(role, "propose"), ok)
        r.register(_HostCollector(host, loop or asyncio.get_running_loop()))
        host.step_listeners.append(self.step_done)

    def _child(self, kind: str, ok: bool) -> tuple[Any, Any]:
        outcome = "ok" if ok else "error"
        children = (self.queue.labels(self.host.role, kind, outcome), self.model.labels(self.host.role, kind, outcome))
        self._children[kind, ok] = children
        return children

    def step_done(self, timing: Any) -> None:
        """``SessionHost.step_listeners`` entry: one Propose/Verify reached the model thread."""
        queue, model = self._children.get((timing.kind, timing.ok)) or self._child(timing.kind, timing.ok)
        queue.observe(timing.queue_s)
        model.observe(timing.model_s)
        if timing.ok:
            self.batch.labels(self.host.role, timing.kind).observe(timing.batch_size)

    def refused(self, method: str, code: grpc.StatusCode) -> None:
        """``SessionServicer.on_error`` (called by ``specdec_grpc.status.grpc_method``)."""
        # A step refused on a ProposeStream/VerifyStream counts as its step, as on the unary call.
        self.rejected.labels(self.host.role, method.removesuffix("Stream"), code.name).inc()


class _HostCollector(Collector):
    """The host's live figures, read on its event loop when scraped (the session store is the
    loop's to touch)."""

    SNAPSHOT_TIMEOUT_S = 5.0

    def __init__(self, host: Any, loop: asyncio.AbstractEventLoop):
        self.host = host
        self.loop = loop

    def _snapshot(self) -> dict[str, Any]:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop or self.loop.is_closed():
            return self.host.snapshot()
        result: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(self.host.snapshot())
            except BaseException as error:  # noqa: BLE001 - handed to the scraping thread
                result.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(take)
        except RuntimeError:  # the loop closed meanwhile
            return self.host.snapshot()
        return result.result(self.SNAPSHOT_TIMEOUT_S)

    def collect(self) -> Iterator[Metric]:
        live = self._snapshot()
        role = self.host.role
        limits = self.host.limits

        def family(kind: Callable[..., Any], name: str, doc: str, value: float) -> Metric:
            metric = kind(name, doc, labels=["role"])
            metric.add_metric([role], value)
            return metric

        yield family(GaugeMetricFamily, "specdec_worker_live_sessions", "Open sessions", live["live_sessions"])
        yield family(GaugeMetricFamily, "specdec_worker_max_sessions", "The session limit (--max-sessions)",
                     limits.max_sessions)
        yield family(GaugeMetricFamily, "specdec_worker_cached_tokens", "Token positions the sessions' "
                     "caches hold (encoder + decoder)", live["cached_tokens"])
        yield family(GaugeMetricFamily, "specdec_worker_cached_tokens_budget", "The cache budget in token "
                     "positions (--max-cached-tokens)", limits.max_cached_tokens)
        yield family(CounterMetricFamily, "specdec_worker_forward_passes", "Decoder forward passes",
                     live["forward_passes"])
        yield family(CounterMetricFamily, "specdec_worker_steps", "Propose/Verify steps that succeeded",
                     live["steps"])
        yield family(CounterMetricFamily, "specdec_worker_batches", "Batched model-thread runs (a batch "
                     "of one counts); batched_steps / batches is the mean batch size", live["batches"])
        yield family(CounterMetricFamily, "specdec_worker_batched_steps", "Steps that ran in those batches",
                     live["batched_steps"])
        yield family(GaugeMetricFamily, "specdec_worker_max_batch", "The batch limit (--max-batch)",
                     limits.max_batch)
        yield family(CounterMetricFamily, "specdec_worker_sessions_opened", "Sessions opened",
                     live["sessions_opened"])
        yield family(CounterMetricFamily, "specdec_worker_sessions_expired", "Sessions evicted after their "
                     "idle TTL", live["sessions_expired"])
