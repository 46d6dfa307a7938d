"""Prometheus metrics of the workers (``--metrics-port``), and the endpoint every service serves
its registry on (the orchestrator's metrics are ``orchestrator.metrics``).

Every service keeps its metrics in a registry of its own (never prometheus_client's global one:
tests run several services in one process) and serves it with prometheus_client's HTTP server
on the host the gRPC server binds. All names start with ``specdec_``; docs/monitoring.md lists
every metric (tests/test_metrics.py checks it against what the services serve).

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
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specdec_grpc.security import require_bearer_token

logger = logging.getLogger(__name__)

# Worker steps: from well under a millisecond (tiny models) to seconds (T5-11B on CPU).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # sessions per batch (--max-batch defaults to 16)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0)
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
                  keyfile: str | None = None, client_cafile: str | None = None,
                  token: str | None = None) -> MetricsEndpoint:
    """Serve ``registry`` over HTTP (HTTPS with a certificate) on host:port; port 0 picks a free one.
    With ``client_cafile`` (the service's --tls-client-ca) a scraper must present a certificate
    that CA signed, as gRPC clients must (mutual TLS); with ``token`` (its --auth-token), the bearer
    token every gRPC call carries (401 without)."""
    tls = {"client_cafile": client_cafile, "client_auth_required": True} if certfile and client_cafile else {}
    try:
        # With a token the server starts on an empty registry, and serves this one only behind the
        # check: nothing is shown to a scraper without it, even before the check is in place.
        server, _ = start_http_server(port, addr=host, registry=CollectorRegistry() if token else registry,
                                      certfile=certfile, keyfile=keyfile, **tls)
    except OSError as error:
        raise SystemExit(f"cannot bind the metrics port {host}:{port}: {error}") from error
    if token:
        server.set_app(require_bearer_token(make_wsgi_app(registry), token))
    endpoint = MetricsEndpoint(host, server.server_port, server)
    logger.info("metrics on %s://%s:%d/metrics", "https" if certfile else "http", host, endpoint.port)
    return endpoint


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
        yield family(GaugeMetricFamily, "specdec_worker_cache_bytes_used", "Cache bytes the sessions hold "
                     "(and opening sessions reserved)", live["cache_bytes_used"])
        yield family(GaugeMetricFamily, "specdec_worker_cache_bytes_free", "Cache bytes left in the budget",
                     max(0, limits.cache_memory_bytes - live["cache_bytes_used"]))
        yield family(GaugeMetricFamily, "specdec_worker_cache_memory_bytes", "The cache budget in bytes "
                     "(--cache-memory, or the machine's default)", limits.cache_memory_bytes)
        yield family(GaugeMetricFamily, "specdec_worker_typical_sessions_free", "More sessions of a typical "
                     "size (512-token prompt, 256 decoder positions) that fit now", live["typical_sessions_free"])
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
        yield family(CounterMetricFamily, "specdec_worker_sessions_reclaimed", "Sessions freed because the "
                     "orchestrator that owned them went unheard for --owner-lease", live["sessions_reclaimed"])
