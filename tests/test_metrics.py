"""Prometheus metrics (``--metrics-port``) and JSON logs (``--log-format json``).

References: the orchestrator's counters must equal the sums of the stats its clients received
(tokens, steps, drafts, draft tokens, accepted tokens per position, failovers) and the status
codes its failed clients got; a worker's must equal what its own Info RPC reports, and its
step counts the steps the orchestrator's requests made.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from harness import LoopThread, start_orchestrator_in, start_worker_in
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.client import SpecdecClient
from specdec_core.host_limits import HostLimits
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc
from specdec_tools.service_process import ServiceProcess
from specdec_tools.tiny_checkpoints import corpus_lines

PROMPTS = corpus_lines()[7:400:23][:10]
MAX_TOKENS = 24


class Scrape:
    """One scrape of a /metrics endpoint, parsed by prometheus_client's own parser."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        self.samples: dict[str, dict[frozenset, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (0 if the series does not exist yet)."""
        return self.samples.get(name, {}).get(frozenset(labels.items()), 0.0)

    def series(self, name: str, label: str) -> dict[str, float]:
        """``label``'s value -> sample, over every series of ``name``."""
        return {dict(labels)[label]: value for labels, value in self.samples.get(name, {}).items()}


def wait_for_requests(port: int, expected: int, timeout: float = 30.0) -> Scrape:
    """A scrape once ``expected`` requests have ended (a stream's last message can reach the
    client a moment before the orchestrator's generator finishes)."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(port)
        if sum(scrape.samples.get("specdec_requests_total", {}).values()) >= expected or time.monotonic() > deadline:
            return scrape
        time.sleep(0.05)


def info(address: str, role: str) -> pb.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DraftStub(channel) if role == "draft" else pb_grpc.TargetStub(channel)
        return stub.Info(pb.InfoRequest(), timeout=10)


@pytest.fixture(scope="module")
def cluster(loop: LoopThread, near_draft_dir: Path, target_dir: Path):
    draft = start_worker_in(loop, "draft", near_draft_dir, metrics_port=0)
    target = start_worker_in(loop, "target", target_dir, metrics_port=0)
    orch = start_orchestrator_in(loop, [draft.address], [target.address], metrics_port=0)
    client = SpecdecClient(orch.address, timeout=60)
    yield client, draft, target, orch
    client.close()
    for service in (orch, draft, target):
        service.stop()
        service.running.metrics.close()


@pytest.fixture(scope="module")
def served(cluster):
    """Greedy (fixed and auto k), sampled, streamed, target-alone and failing requests: the
    stats each finished one returned, and the status code each failed one got."""
    client = cluster[0]
    stats: list[pb.GenerateStats] = []
    for prompt in PROMPTS[:3]:
        stats.append(client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=3).stats)
    for prompt in PROMPTS[3:5]:
        stats.append(client.generate(prompt, max_tokens=MAX_TOKENS, num_draft="auto").stats)
    for seed, prompt in enumerate(PROMPTS[5:8]):
        stats.append(client.generate(prompt, max_tokens=MAX_TOKENS, num_draft=4, temperature=1.0,
                                     seed=seed).stats)
    stats.append(list(client.stream(PROMPTS[8], max_tokens=MAX_TOKENS, num_draft=2))[-1].stats)
    alone = client.generate(PROMPTS[9], max_tokens=MAX_TOKENS, speculative=False).stats
    stats.append(alone)
    codes: Counter[str] = Counter()
    for bad in (dict(prompt=""), dict(prompt=PROMPTS[0], max_tokens=10**6),
                dict(prompt=PROMPTS[0], temperature=-1.0)):
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(**bad)
        codes[caught.value.code().name] += 1
    assert codes == {"INVALID_ARGUMENT": 3}
    assert alone.proposed == 0 and any(s.accepted < s.proposed for s in stats)  # rejections happened
    return stats, codes, [False] * (len(stats) - 1) + [True]


def test_orchestrator_counters_agree_with_the_requests_stats(cluster, served) -> None:
    client, draft, target, orch = cluster
    stats, codes, target_alone = served
    scrape = wait_for_requests(orch.running.metrics_port, len(stats) + sum(codes.values()))

    assert scrape.value("specdec_requests_total", outcome="ok", code="OK") == len(stats)
    errors = {labels: value for labels, value in scrape.samples["specdec_requests_total"].items()
              if dict(labels)["outcome"] == "error"}
    assert {dict(labels)["code"]: value for labels, value in errors.items()} == codes
    assert scrape.value("specdec_generation_tokens_total") == sum(s.tokens for s in stats)
    assert scrape.value("specdec_steps_total") == sum(s.steps for s in stats)
    # vLLM's meanings: drafts = steps that drafted (each drafts position 1), draft tokens, accepted.
    assert scrape.value("specdec_spec_decode_num_drafts_total") == sum(
        s.proposed_per_position[0] for s in stats if s.proposed_per_position)
    assert scrape.value("specdec_spec_decode_num_draft_tokens_total") == sum(s.proposed for s in stats)
    assert scrape.value("specdec_spec_decode_num_accepted_tokens_total") == sum(s.accepted for s in stats)
    longest = max(len(s.proposed_per_position) for s in stats)
    for name, field in (("specdec_spec_decode_num_accepted_tokens_per_pos_total", "accepted_per_position"),
                        ("specdec_spec_decode_num_draft_tokens_per_pos_total", "proposed_per_position")):
        expected = {str(p + 1): sum(getattr(s, field)[p] for s in stats if len(getattr(s, field)) > p)
                    for p in range(longest)}
        assert scrape.series(name, "position") == expected, name
    failovers = scrape.series("specdec_failovers_total", "role")
    assert sum(failovers.values()) == sum(s.failovers for s in stats)
    assert scrape.value("specdec_target_alone_requests_total", reason="requested") == sum(target_alone)
    assert scrape.value("specdec_live_generations") == 0

    # Latency of the finished requests: one observation each; the time to first token is the
    # one each client was told, and end to end covers at least the generation's own total.
    assert scrape.value("specdec_e2e_request_latency_seconds_count") == len(stats)
    first = [s.time_to_first_token_ms / 1e3 for s in stats if s.time_to_first_token_ms > 0]
    assert scrape.value("specdec_time_to_first_token_seconds_count") == len(first)
    assert scrape.value("specdec_time_to_first_token_seconds_sum") == pytest.approx(sum(first), rel=1e-5)
    assert scrape.value("specdec_e2e_request_latency_seconds_sum") >= sum(s.total_ms for s in stats) / 1e3 * (1 - 1e-5)
    multi = [s for s in stats if s.time_to_first_token_ms > 0 and s.tokens > 1]
    assert scrape.value("specdec_time_per_output_token_seconds_count") == len(multi)


def test_worker_metrics_agree_with_info_and_the_requests(cluster, served) -> None:
    client, draft, target, orch = cluster
    stats = served[0]
    wait_for_requests(orch.running.metrics_port, len(stats) + sum(served[1].values()))
    # Every step verified once (no failures here). The draft's Proposes: one per step that drafted,
    # less the blocks drafted ahead and used (their Propose ran in the step before), plus every
    # block drafted ahead (pipelining: a Propose beside the Verify, used or not).
    steps_by_kind = {"verify": sum(s.steps for s in stats),
                     "propose": sum((s.proposed_per_position or [0])[0] + s.predrafts - s.predraft_hits
                                    for s in stats)}
    for worker, kind in ((draft, "propose"), (target, "verify")):
        reply = info(worker.address, worker.role)
        scrape = Scrape(worker.running.metrics_port)
        role = worker.role
        assert scrape.value("specdec_worker_forward_passes_total", role=role) == reply.metrics.forward_passes > 0
        assert scrape.value("specdec_worker_steps_total", role=role) == reply.metrics.steps == steps_by_kind[kind]
        assert scrape.value("specdec_worker_sessions_opened_total", role=role) == reply.metrics.sessions_opened
        for histogram in ("specdec_worker_step_queue_seconds", "specdec_worker_step_model_seconds"):
            assert scrape.value(f"{histogram}_count", role=role, kind=kind, outcome="ok") == reply.metrics.steps
            assert scrape.value(f"{histogram}_count", role=role, kind=kind, outcome="error") == 0
        assert scrape.value("specdec_worker_step_model_seconds_sum", role=role, kind=kind, outcome="ok") > 0
        assert scrape.value("specdec_worker_cache_memory_bytes", role=role) == reply.limits.cache_memory_bytes > 0
        assert scrape.value("specdec_worker_max_sessions", role=role) == reply.limits.max_sessions
        # Batching: every step ran in a batch; the histogram of batch sizes sums what Info counts
        # (each step observes its batch's size, so the sum is the steps-weighted total).
        assert scrape.value("specdec_worker_batches_total", role=role) == reply.metrics.batches > 0
        assert scrape.value("specdec_worker_batched_steps_total", role=role) == reply.metrics.batched_steps
        assert reply.metrics.batched_steps == reply.metrics.steps
        assert scrape.value("specdec_worker_step_batch_size_count", role=role, kind=kind) == reply.metrics.steps
        assert scrape.value("specdec_worker_step_batch_size_sum", role=role, kind=kind) >= reply.metrics.steps
        assert scrape.value("specdec_worker_max_batch", role=role) == reply.limits.max_batch == 16

    # A session held open: the gauges read what Info reads.
    with grpc.insecure_channel(draft.address) as channel:
        stub = pb_grpc.DraftStub(channel)
        opened = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=[5, 6, 7, 1], client_tag="gauges"), timeout=30)
        try:
            reply = info(draft.address, "draft")
            scrape = Scrape(draft.running.metrics_port)
            assert reply.live_sessions == 1 and reply.cached_tokens > 0
            assert scrape.value("specdec_worker_live_sessions", role="draft") == reply.live_sessions
            assert scrape.value("specdec_worker_cached_tokens", role="draft") == reply.cached_tokens
            assert scrape.value("specdec_worker_cache_bytes_used", role="draft") == reply.cache_bytes_used == (
                reply.cached_tokens * reply.cache_bytes_per_position)
            assert scrape.value("specdec_worker_cache_bytes_free", role="draft") == (
                reply.limits.cache_memory_bytes - reply.cache_bytes_used)
            assert scrape.value("specdec_worker_typical_sessions_free", role="draft") == reply.typical_sessions_free > 0
        finally:
            stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=30)
        assert Scrape(draft.running.metrics_port).value("specdec_worker_live_sessions", role="draft") == 0

        # Calls answered with an error, by method and the code the caller got.
        got: Counter[tuple[str, str]] = Counter()
        calls = [("Propose", lambda: stub.Propose(pb.ProposeRequest(session_id="gone", expected_length=1,
                                                                    num_draft=1), timeout=10)),
                 ("OpenSession", lambda: stub.OpenSession(pb.OpenSessionRequest(prompt_ids=[10**6]), timeout=10)),
                 ("Propose", lambda: stub.Propose(pb.ProposeRequest(session_id="gone", expected_length=1,
                                                                    num_draft=1), timeout=10)),
                 # a step on a stream counts as the step it is
                 ("Propose", lambda: list(stub.ProposeStream(iter([pb.ProposeRequest(
                     session_id="gone", expected_length=1, num_draft=1)]), timeout=10)))]
        for method, call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            got[method, caught.value.code().name] += 1
    assert got == {("Propose", "NOT_FOUND"): 3, ("OpenSession", "INVALID_ARGUMENT"): 1}
    rejected = Scrape(draft.running.metrics_port).samples["specdec_worker_rejected_requests_total"]
    assert {(dict(k)["method"], dict(k)["code"]): v for k, v in rejected.items()} == got


def test_the_monitoring_table_lists_every_metric_the_services_export(cluster) -> None:
    """docs/monitoring.md's table names exactly the metric families the three services serve."""
    _, draft, target, orch = cluster
    served = set()
    for service in (orch, draft, target):
        with urllib.request.urlopen(f"http://127.0.0.1:{service.running.metrics_port}/metrics", timeout=10) as reply:
            served |= {f.name for f in text_string_to_metric_families(reply.read().decode())}
    table = (Path(__file__).resolve().parent.parent / "docs" / "monitoring.md").read_text()
    documented = {name.removesuffix("_total") for line in table.splitlines() if line.startswith("| `specdec_")
                  for name in re.findall(r"`(specdec_[a-z0-9_]+)`", line.split("|")[1])}
    # prometheus_client's own ``_created`` series, which the page mentions once, are left out
    assert documented == {name for name in served if name.startswith("specdec_") and not name.endswith("_created")}


def test_failovers_by_role_and_a_failed_requests_code(loop: LoopThread, draft_dir: Path, target_dir: Path) -> None:
    """A draft that died unnoticed (no health check in between) is failed over from and the
    target finishes alone; then the same with the only target: the request fails UNAVAILABLE."""
    unrenewed = HostLimits(owner_lease_s=3 * 3600)  # no health check renews the lease: it must outlast the test
    draft = start_worker_in(loop, "draft", draft_dir, unrenewed)
    target = start_worker_in(loop, "target", target_dir, unrenewed)
    orch = start_orchestrator_in(loop, [draft.address], [target.address], metrics_port=0,
                                 health_interval_s=3600)
    try:
        with SpecdecClient(orch.address, timeout=60) as client:
            draft.stop()
            reply = client.generate(PROMPTS[0], max_tokens=8, num_draft=2)
            assert reply.stats.failovers == 1 and reply.stats.draft_replica == "" and reply.stats.proposed == 0
            target.stop()
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(PROMPTS[1], max_tokens=8, num_draft=2)
        scrape = wait_for_requests(orch.running.metrics_port, 2)
        code = caught.value.code().name
        assert code == "UNAVAILABLE"
        assert scrape.value("specdec_requests_total", outcome="ok", code="OK") == 1
        assert scrape.value("specdec_requests_total", outcome="error", code=code) == 1
        # The first request's failover was the draft's; the second opens its target first, fails
        # over from it and has no target left (its client sees no stats, only the code).
        assert scrape.series("specdec_failovers_total", "role") == {"draft": reply.stats.failovers, "target": 1}
        assert scrape.value("specdec_target_alone_requests_total", reason="no_draft") == 1
    finally:
        orch.stop()
        orch.running.metrics.close()


def test_json_logs_and_the_announced_metrics_port(tmp_path: Path, draft_dir: Path) -> None:
    """A worker process with --log-format json --metrics-port 0: every log line is one JSON
    object, a line about a request carries its id, and the announced port serves its metrics."""
    log = tmp_path / "draft.log"
    with ServiceProcess("draft", ["--model", str(draft_dir), "--port", "0", "--metrics-port", "0",
                                  "--log-format", "json"], log) as service:
        service.wait_port(120)
        assert service.metrics_port is not None and service.metrics_port != service.port
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.DraftStub(channel)
            opened = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=[5, 6, 1], client_tag="json-req-1"),
                                      timeout=30)
            assert Scrape(service.metrics_port).value("specdec_worker_live_sessions", role="draft") == 1
            stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=30)
        assert service.stop() == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    announced = [line for line in lines if line.startswith("specdec-draft ")]
    assert announced == [f"specdec-draft metrics on 127.0.0.1:{service.metrics_port}",
                         f"specdec-draft listening on 127.0.0.1:{service.port}"]
    entries = [json.loads(line) for line in lines if line not in announced]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    about = [e for e in entries if "req=json-req-1" in e["message"]]
    assert any(" opened" in e["message"] for e in about) and any(" closed" in e["message"] for e in about)
    assert all(e["request_id"] == "json-req-1" for e in about)
    assert all("request_id" not in e for e in entries if "req=" not in e["message"])
