"""Draft and target replicas: connection, compatibility check, least-loaded choice, health watch.

Every session is pinned to one draft and one target replica (their KV caches are
stateful). A replica that fails a call is taken out of rotation; the health watch puts it
back when it answers SERVING again and still serves a compatible model.

The same watch reads each serving replica's live load from its Info (sessions, cache bytes used
and their budget, how many typical sessions still fit, steps answered) at every check, and
derives steps per second from two consecutive readings; ``status`` reports the latest, and the
choice of a replica for a new session ranks those with room first. At each check of a serving
replica it also asks again to close the sessions whose close failed there (``UnfinishedCloses``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as default_field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec_core.host_limits import HostLimits
from specdec_core.limits import declared_limits
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

from .backend_protocol import Backend, ReplicaError, ReplicaFailure
from .backends import GrpcBackend
from .unfinished_closes import UnfinishedCloses

logger = logging.getLogger(__name__)

# Failures after which a replica is presumed down (not merely busy or confused about one session).
OUT_OF_ROTATION = {
    ReplicaFailure.DOWN,
    ReplicaFailure.REFUSED,
    ReplicaFailure.MALFORMED,
    # A call that ran out of time is reported here only when the request itself still had time
    # (the loop reports its own deadline to the client instead): the replica stopped answering
    # within the per-call limit, so it is stuck or far behind. Out of rotation like a dead one,
    # and back when the health watch sees SERVING: a worker whose model thread is stuck says
    # NOT_SERVING (its --watchdog-s) until it recovers; one that was merely slow returns at the
    # next health check. Simpler than a load penalty, and new sessions avoid it meanwhile.
    ReplicaFailure.TIMED_OUT,
}
# A worker's --owner-lease must cover this many health checks: each renews this orchestrator's lease
# on its sessions (the Info it sends), so it may miss the rest in a row without losing one.
LEASE_RENEWALS = 3
# The worker limits the orchestrator acts on (its k cap, the sessions sharing a pass, the start-up
# checks), each in the range its flag accepts, as on any worker that started: an Info outside is
# garbage, and that replica is refused (or kept out of rotation).
TRUSTED_LIMITS = {f.name: f.metadata["valid"] for f in declared_limits(HostLimits)
                  if f.name in ("max_draft", "max_batch", "max_prompt_tokens", "max_decoder_tokens")}
# Fields draft and target must agree on, or their tokens mean different things.
COMPATIBILITY_FIELDS = (
    "vocab_size", "eos_token_id", "pad_token_id", "decoder_start_token_id", "tokenizer_fingerprint",
)
# Fields every target replica must share: the output is "what this target writes alone", so a
# failover between targets of other numerics or cache settings would splice two targets' outputs.
# (Not num_parameters: a tensor-parallel rank 0 reports its own shard's.)
TARGET_FIELDS = ("dtype", "quantization_bits", "kv_bits", "kv_group_size")
# Failed closes asked again per replica at one health check, together: a backlog of 1024 drains in 16.
CLOSE_RETRIES_PER_CHECK = 64


class StartupError(Exception):
    """The orchestrator cannot start as configured; the message says why (main exits 2)."""


class IncompatibleReplicas(StartupError):
    """Draft and target disagree on vocabulary or special ids, or a worker cannot serve what this
    orchestrator's limits let a request ask."""


@dataclass(frozen=True)
class WorkerNeeds:
    """What this orchestrator's limits let a request ask of every worker (0: nothing). A worker
    whose own limits fall short would refuse some valid request mid-generation, blaming the client;
    the orchestrator refuses to start beside it instead."""

    decoder_tokens: int = 0  # a session's longest decoder (``server.decoder_tokens_needed``)
    draft: int = 0  # the largest k (--max-num-draft)
    prompt_tokens: int = 0  # the longest prompt (--max-prompt-tokens)

    def shortfall(self, limits: pb.Limits) -> str:
        """What the worker's limits (its Info) lack, in words; "" if nothing."""
        if limits.max_decoder_tokens < self.decoder_tokens:
            return (f"holds {limits.max_decoder_tokens} decoder tokens per session (--max-decoder-tokens) and "
                    f"a request may need {self.decoder_tokens} (the start token, --max-tokens-cap tokens and a "
                    "block of --max-num-draft drafts): raise the worker's --max-decoder-tokens or lower those "
                    "orchestrator flags")
        if limits.max_draft < self.draft:
            return (f"takes k up to {limits.max_draft} (its --max-draft) and a request may ask for "
                    f"{self.draft} (this orchestrator's --max-num-draft): raise the worker's --max-draft or "
                    "lower --max-num-draft")
        if limits.max_prompt_tokens < self.prompt_tokens:
            return (f"takes prompts of up to {limits.max_prompt_tokens} tokens (its --max-prompt-tokens) and "
                    f"this orchestrator accepts {self.prompt_tokens} (its --max-prompt-tokens): raise the "
                    "worker's or lower the orchestrator's")
        return ""


def unusable_limits(info: pb.InfoResponse) -> str:
    """The limits in a worker's Info that no worker could have started with, in words ("" if none)."""
    bad = [f"{name} {getattr(info.limits, name)!r} (its flag accepts {valid})"
           for name, valid in TRUSTED_LIMITS.items() if getattr(info.limits, name) not in valid]
    return "its Info reports " + ", ".join(bad) if bad else ""


def implausible_info(info: pb.InfoResponse) -> str:
    """What makes an Info's figures impossible, in words ("" if nothing): a number that is negative
    or not finite (every one it carries is a count, an id, a size or a time), or more live sessions
    than the worker's --max-sessions."""
    bad = [f"{name} {value!r}" for name, value in _numbers(info) if not (math.isfinite(value) and value >= 0)]
    if info.live_sessions > info.limits.max_sessions > 0:
        bad.append(f"live_sessions {info.live_sessions} over max_sessions {info.limits.max_sessions}")
    return ", ".join(bad)


def _numbers(message: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number set in a message and the messages in it, by its dotted field name."""
    for field, value in message.ListFields():
        if field.message_type is not None and not field.is_repeated:
            yield from _numbers(value, f"{prefix}{field.name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{field.name}", value


@dataclass
class Load:
    """A replica's live load, from its Info at one health check."""

    live_sessions: int
    cache_bytes_used: int
    cache_memory_bytes: int  # its budget
    typical_sessions_free: int  # more sessions of a typical size that fit (bytes and session limit)
    steps: int  # Propose/Verify calls answered since the replica started
    at: float  # when it was read (event loop clock, seconds)
    steps_per_s: float = 0.0  # over the interval since the reading before (0 for the first)
    batches: int = 0  # batches its model thread ran since it started, and the steps in them
    batched_steps: int = 0

    @classmethod
    def read(cls, info: pb.InfoResponse, at: float, before: Load | None) -> Load:
        load = cls(info.live_sessions, info.cache_bytes_used, info.limits.cache_memory_bytes,
                   info.typical_sessions_free, info.metrics.steps, at)
        load.batches, load.batched_steps = info.metrics.batches, info.metrics.batched_steps
        # A counter that went back means the replica restarted: this reading starts afresh.
        if before is not None and at > before.at and load.steps >= before.steps:
            load.steps_per_s = (load.steps - before.steps) / (at - before.at)
        return load


@dataclass
class Replica:
    address: str
    role: str
    channel: grpc.aio.Channel
    backend: GrpcBackend
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    active_sessions: int = 0
    last_error: str = ""
    info: pb.InfoResponse | None = None
    load: Load | None = None  # None until read, and while the replica is not serving
    load_dropped: bool = False  # its last load report was impossible (logged once per such spell)
    unclosed: UnfinishedCloses = default_field(default_factory=UnfinishedCloses)  # sessions to close again


ChannelFactory = Callable[[str], grpc.aio.Channel]


class ReplicaPool:
    def __init__(
        self,
        drafts: Sequence[str],
        targets: Sequence[str],
        channel_factory: ChannelFactory,
        metadata: Sequence[tuple[str, str]] = (),
        health_interval_s: float = 1.0,
        step_streams: bool = True,
    ):
        if not targets:
            raise StartupError("at least one --target address is needed")
        self.metadata = tuple(metadata)
        self.health_interval_s = health_interval_s
        # Who owns the sessions this pool's requests open (one pool per orchestrator process): sent
        # with every OpenSession, renewed by the Info at every health check (docs/configuration.md).
        self.owner = secrets.token_hex(8)
        self.replicas: list[Replica] = []
        for role, addresses in (("draft", drafts), ("target", targets)):
            for address in addresses:
                channel = channel_factory(address)
                stub = pb_grpc.DraftStub(channel) if role == "draft" else pb_grpc.TargetStub(channel)
                self.replicas.append(
                    Replica(address, role, channel,
                            GrpcBackend(role, address, stub, self.metadata, step_streams, self.owner),
                            health_pb2_grpc.HealthStub(channel))
                )
        self._by_backend = {id(r.backend): r for r in self.replicas}
        for replica in self.replicas:
            replica.backend.on_unclosed = lambda session_id, r=replica: self._keep_unclosed(r, session_id)
        self.reference: pb.InfoResponse | None = None
        self.needs = WorkerNeeds()  # set by ``start``: what every replica's limits must serve
        # Told (role, "info") of every worker report dropped as impossible (OrchestratorMetrics).
        self.on_dropped_report: Callable[[str, str], None] | None = None
        # Told (role, event, count) of failed closes: "failed" (kept to ask again), "closed" (by a
        # retry), "dropped" (given up over the bound: the worker's idle TTL frees them).
        self.on_unfinished_close: Callable[[str, str, int], None] | None = None
        self._watch: asyncio.Task[None] | None = None

    def of_role(self, role: str) -> list[Replica]:
        return [r for r in self.replicas if r.role == role]

    # -- start-up -----------------------------------------------------------------------------
    async def start(self, connect_timeout_s: float = 30.0, needs: WorkerNeeds | None = None) -> None:
        """Wait for replicas, check they agree, start the health watch.

        Refuses (StartupError with a message) when no target answers in time, when any two
        replicas that answered disagree on vocabulary or special ids, or when one's limits are
        garbage or fall short of ``needs`` (decoder tokens, k, prompt tokens). A replica that
        answers later is held to the same, and kept out of rotation if it falls short.
        """
        self.needs = needs or WorkerNeeds()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout_s
        pending = list(self.replicas)
        while pending and loop.time() < deadline:
            results = await asyncio.gather(*(self._fetch_info(r, 2.0) for r in pending))
            pending = [r for r, ok in zip(pending, results, strict=True) if not ok]
            if pending:
                await asyncio.sleep(0.3)
        answered = [r for r in self.replicas if r.info is not None]
        if not any(r.role == "target" for r in answered):
            raise StartupError(
                "no target replica answered Info within "
                f"{connect_timeout_s:g}s: "
                + "; ".join(f"{r.address} ({r.last_error or 'no answer'})" for r in self.of_role("target"))
            )
        targets = [r for r in answered if r.role == "target"]
        self.reference = targets[0].info
        for replica in answered:
            problem = self.incompatibility(replica.info)
            if problem:
                raise IncompatibleReplicas(
                    f"refusing to start: {replica.role} {replica.address} is incompatible with target "
                    f"{targets[0].address}: {problem}. Draft and target must share one tokenizer and "
                    "the same special token ids; target replicas also the same dtype, quantization "
                    "and --kv-bits."
                )
            problem = self.unfit(replica.info)
            if problem:
                raise IncompatibleReplicas(f"refusing to start: {replica.role} {replica.address} {problem}")
            self._check_lease(replica)
            replica.healthy = True
        for replica in pending:
            logger.warning("%s %s not reachable yet; will use it once it answers", replica.role, replica.address)
        self._watch = asyncio.get_running_loop().create_task(self._health_watch())

    def _check_lease(self, replica: Replica) -> None:
        """Refuse a worker whose owner lease is too short for this pool's health checks to renew
        (its sessions would be freed under running requests). 0: a worker without leases."""
        lease = replica.info.limits.owner_lease_s if replica.info is not None else 0.0
        if 0 < lease < LEASE_RENEWALS * self.health_interval_s:
            raise IncompatibleReplicas(
                f"refusing to start: {replica.role} {replica.address} frees the sessions of an orchestrator "
                f"it has not heard from for {lease:g}s (--owner-lease), and this one renews at every health "
                f"check, {self.health_interval_s:g}s apart (--health-interval): the lease must cover "
                f"{LEASE_RENEWALS} checks; raise the worker's --owner-lease or lower --health-interval")

    def unfit(self, info: pb.InfoResponse) -> str:
        """Why a replica cannot serve this orchestrator's requests ("" if it can): garbage limits or
        figures in its Info, or limits short of ``needs``."""
        return unusable_limits(info) or implausible_info(info) or self.needs.shortfall(info.limits)

    def incompatibility(self, info: pb.InfoResponse | None) -> str:
        if info is None or self.reference is None:
            return "no Info"
        for name in COMPATIBILITY_FIELDS + (TARGET_FIELDS if info.role == "target" else ()):
            mine, theirs = getattr(info, name), getattr(self.reference, name)
            if mine != theirs:
                return f"{name} {mine!r} != {theirs!r}"
        return ""

    async def _fetch_info(self, replica: Replica, timeout: float) -> bool:
        try:
            replica.info = await replica.backend.stub.Info(pb.InfoRequest(owner=self.owner), timeout=timeout,
                                                           metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            replica.last_error = f"{error.code().name}: {error.details()}"
            return False
        if not unusable_limits(replica.info):  # (garbage: the replica is refused, its figures unused)
            replica.backend.max_draft = replica.info.limits.max_draft  # the loop caps k at it
            replica.backend.max_batch = replica.info.limits.max_batch  # (a step reply's batch is within it)
        replica.backend.draft_method = replica.info.draft_method  # (may it draft ahead for a seeded request?)
        self._take_load(replica, replica.info)
        if replica.info.role and replica.info.role != replica.role:
            raise StartupError(
                f"{replica.address} was given as a {replica.role} but serves as a {replica.info.role}"
            )
        return True

    async def _health_watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self._check(r) for r in self.replicas), return_exceptions=True)

    async def _check(self, replica: Replica) -> None:
        try:
            response = await replica.health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=max(0.5, self.health_interval_s),
                metadata=self.metadata,
            )
            serving = response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as error:
            serving = False
            replica.last_error = f"health: {error.code().name}"
        if serving and not replica.healthy:
            if await self._fetch_info(replica, 2.0):
                assert replica.info is not None
                problem = self.incompatibility(replica.info) or self.unfit(replica.info)
                if problem:
                    if replica.last_error != f"incompatible: {problem}":  # said once, not every check
                        logger.warning("%s %s answers again but stays out: %s", replica.role, replica.address,
                                       problem)
                    replica.last_error = f"incompatible: {problem}"
                    return
                logger.info("%s %s is back", replica.role, replica.address)
                replica.healthy = True
                replica.last_error = ""
        elif not serving and replica.healthy:
            logger.warning("%s %s stopped serving", replica.role, replica.address)
            replica.healthy = False
        elif serving:
            # Both bounded by the Info's timeout: a retry never delays the next check's lease renewal.
            await asyncio.gather(self._read_load(replica), self._close_again(replica))
        if not serving:
            replica.load = None  # no live figures for a replica that does not serve

    async def _read_load(self, replica: Replica) -> None:
        """Refresh a serving replica's live load from its Info (a cheap call answered off the
        model thread), which also renews this pool's lease on its sessions there. A failed read
        leaves no figures rather than stale ones; health stays the health check's business."""
        try:
            info = await replica.backend.stub.Info(pb.InfoRequest(owner=self.owner),
                                                   timeout=max(0.5, self.health_interval_s), metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            logger.debug("%s %s: Info failed: %s", replica.role, replica.address, error.code().name)
            replica.load = None
            return
        self._take_load(replica, info)

    def _keep_unclosed(self, replica: Replica, session_id: str) -> None:
        """A close failed while this pool renews its owner lease: without another try the worker
        would hold the session until its idle TTL."""
        dropped = replica.unclosed.add(session_id)
        self._count_unfinished(replica, "failed", 1)
        if dropped:
            logger.warning("%s %s: %d failed closes kept to retry; gave up the oldest %d (the worker's "
                           "idle TTL frees them)", replica.role, replica.address, len(replica.unclosed), dropped)
            self._count_unfinished(replica, "dropped", dropped)

    async def _close_again(self, replica: Replica) -> None:
        """Ask again to close the oldest sessions whose close failed on this serving replica; one
        still failing goes to the back of the queue."""
        timeout = max(0.5, self.health_interval_s)

        async def close_again(session_id: str) -> bool:
            try:
                await replica.backend.ask_close(session_id, timeout)
            except ReplicaError as error:
                logger.debug("%s %s: closing session %s again failed: %s", replica.role, replica.address,
                             session_id[:8], error)
                if session_id in replica.unclosed:
                    replica.unclosed.add(session_id)
                return False
            replica.unclosed.discard(session_id)
            return True

        sessions = replica.unclosed.oldest(CLOSE_RETRIES_PER_CHECK)
        if sessions:
            closed = sum(await asyncio.gather(*(close_again(s) for s in sessions)))
            if closed:
                logger.info("%s %s: closed %d session%s whose close had failed", replica.role, replica.address,
                            closed, "" if closed == 1 else "s")
                self._count_unfinished(replica, "closed", closed)

    def _count_unfinished(self, replica: Replica, event: str, count: int) -> None:
        if self.on_unfinished_close is not None:
            self.on_unfinished_close(replica.role, event, count)

    def _take_load(self, replica: Replica, info: pb.InfoResponse) -> None:
        """The replica's live load from its Info; an impossible one is dropped (no figures rather
        than garbage that would steer the choice of replicas and k), counted and logged."""
        problem = implausible_info(info)
        if problem:
            logger.log(logging.DEBUG if replica.load_dropped else logging.WARNING,
                       "%s %s: dropped an impossible load report (%s)", replica.role, replica.address, problem)
            replica.load, replica.load_dropped = None, True
            if self.on_dropped_report is not None:
                self.on_dropped_report(replica.role, "info")
            return
        replica.load_dropped = False
        replica.load = Load.read(info, asyncio.get_running_loop().time(), replica.load)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.gather(*(r.channel.close() for r in self.replicas), return_exceptions=True)

    # -- BackendSource ------------------------------------------------------------------------
    def acquire(self, role: str, exclude: set[str]) -> GrpcBackend | None:
        """The least-loaded healthy replica of a role not in ``exclude``, counted as in use. Those
        whose last Info said a typical session no longer fits come last (a smaller session may
        still fit, and the reading may be stale: they are not skipped)."""
        candidates = [r for r in self.of_role(role) if r.healthy and r.address not in exclude]
        if not candidates:
            return None
        replica = min(candidates, key=lambda r: (r.load is not None and r.load.typical_sessions_free == 0,
                                                 r.active_sessions))
        replica.active_sessions += 1
        return replica.backend

    def sessions_sharing(self, backend: Backend) -> int:
        """Sessions on this target replica that could share its passes: the most of ours and all
        orchestrators' (its Info at the last health check), at most its --max-batch."""
        replica = self._by_backend.get(id(backend))
        if replica is None:
            return 1
        sessions = max(replica.active_sessions, replica.load.live_sessions if replica.load else 0)
        max_batch = replica.info.limits.max_batch if replica.info is not None else 0
        return max(1, min(sessions, max_batch) if max_batch else sessions)

    def release(self, backend: Backend) -> None:
        replica = self._by_backend.get(id(backend))
        if replica is not None:
            replica.active_sessions = max(0, replica.active_sessions - 1)

    def report_failure(self, backend: Backend, error: Exception) -> None:
        replica = self._by_backend.get(id(backend))
        if replica is None:
            return
        replica.last_error = str(error)
        if isinstance(error, ReplicaError) and error.kind in OUT_OF_ROTATION:
            replica.healthy = False

    def status(self) -> list[pb.ReplicaStatus]:
        """Every replica: health, this orchestrator's sessions on it, and its live load as read
        at the last health check (zeros while none is known)."""
        statuses = []
        for r in self.replicas:
            status = pb.ReplicaStatus(address=r.address, role=r.role, healthy=r.healthy,
                                      active_sessions=r.active_sessions, last_error=r.last_error)
            if r.info is not None:
                status.kv_bits = r.info.kv_bits
            if r.load is not None:
                status.live_sessions = r.load.live_sessions
                status.cache_bytes_used = r.load.cache_bytes_used
                status.cache_memory_bytes = r.load.cache_memory_bytes
                status.typical_sessions_free = r.load.typical_sessions_free
                status.steps_per_s = r.load.steps_per_s
                status.batches, status.batched_steps = r.load.batches, r.load.batched_steps
            statuses.append(status)
        return statuses
