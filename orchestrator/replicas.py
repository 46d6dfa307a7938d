"""Draft and target replicas: connection, compatibility check, least-loaded choice, health watch.

Every session is pinned to one draft and one target replica (their KV caches are
stateful). A replica that fails a call is taken out of rotation; the health watch puts it
back when it answers SERVING again and still serves a compatible model.

The same watch reads each serving replica's live load from its Info (sessions, cache bytes used
and their budget, how many typical sessions still fit, steps answered) at every check, and
derives steps per second from two consecutive readings; ``status`` reports the latest, and the
choice of a replica for a new session ranks those with room first.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

from .backends import GrpcBackend, ReplicaError

logger = logging.getLogger(__name__)

# Codes after which a replica is presumed down (not merely busy or confused about one session).
FAILURE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    # A call that ran out of time is reported here only when the request itself still had time
    # (the loop reports its own deadline to the client instead): the replica stopped answering
    # within the per-call limit, so it is stuck or far behind. Out of rotation like a dead one,
    # and back when the health watch sees SERVING: a worker whose model thread is stuck says
    # NOT_SERVING (its --watchdog-s) until it recovers; one that was merely slow returns at the
    # next health check. Simpler than a load penalty, and new sessions avoid it meanwhile.
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# A worker's --owner-lease must cover this many health checks: each renews this orchestrator's lease
# on its sessions (the Info it sends), so it may miss the rest in a row without losing one.
LEASE_RENEWALS = 3
# Fields draft and target must agree on, or their tokens mean different things.
COMPATIBILITY_FIELDS = (
    "vocab_size", "eos_token_id", "pad_token_id", "decoder_start_token_id", "tokenizer_fingerprint",
)


class StartupError(Exception):
    """The orchestrator cannot start as configured; the message says why (main exits 2)."""


class IncompatibleReplicas(StartupError):
    """Draft and target disagree on vocabulary or special ids."""


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

    @classmethod
    def read(cls, info: pb.InfoResponse, at: float, before: Load | None) -> Load:
        load = cls(info.live_sessions, info.cache_bytes_used, info.limits.cache_memory_bytes,
                   info.typical_sessions_free, info.metrics.steps, at)
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
        self.reference: pb.InfoResponse | None = None
        self._watch: asyncio.Task[None] | None = None

    def of_role(self, role: str) -> list[Replica]:
        return [r for r in self.replicas if r.role == role]

    # -- start-up -----------------------------------------------------------------------------
    async def start(self, connect_timeout_s: float = 30.0, decoder_tokens_needed: int = 0) -> None:
        """Wait for replicas, check they agree, start the health watch.

        Refuses (StartupError with a message) when no target answers in time, when any two
        replicas that answered disagree on vocabulary or special ids, or when one holds fewer
        decoder tokens per session (``--max-decoder-tokens``) than ``decoder_tokens_needed``.
        """
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
                    "the same special token ids."
                )
            held = replica.info.limits.max_decoder_tokens
            if held < decoder_tokens_needed:
                raise IncompatibleReplicas(
                    f"refusing to start: {replica.role} {replica.address} holds {held} decoder tokens per "
                    f"session (--max-decoder-tokens) and a request may need {decoder_tokens_needed} (the "
                    "start token, --max-tokens-cap tokens and a block of --max-num-draft drafts): raise "
                    "the worker's --max-decoder-tokens or lower those orchestrator flags")
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

    def incompatibility(self, info: pb.InfoResponse | None) -> str:
        if info is None or self.reference is None:
            return "no Info"
        for name in COMPATIBILITY_FIELDS:
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
        replica.backend.max_draft = replica.info.limits.max_draft  # the loop caps k at it
        replica.backend.draft_method = replica.info.draft_method  # (may it draft ahead for a seeded request?)
        replica.backend.processor = (replica.info.hostname, replica.info.device)  # (does a draft overlap?)
        replica.load = Load.read(replica.info, asyncio.get_running_loop().time(), replica.load)
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
                problem = self.incompatibility(replica.info)
                if problem:
                    replica.last_error = f"incompatible: {problem}"
                    return
                logger.info("%s %s is back", replica.role, replica.address)
                replica.healthy = True
                replica.last_error = ""
        elif not serving and replica.healthy:
            logger.warning("%s %s stopped serving", replica.role, replica.address)
            replica.healthy = False
        elif serving:
            await self._read_load(replica)
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

    def sessions_sharing(self, backend: Any) -> int:
        """Sessions on this target replica that could share its passes: the most of ours and all
        orchestrators' (its Info at the last health check), at most its --max-batch."""
        replica = self._by_backend.get(id(backend))
        if replica is None:
            return 1
        sessions = max(replica.active_sessions, replica.load.live_sessions if replica.load else 0)
        max_batch = replica.info.limits.max_batch if replica.info is not None else 0
        return max(1, min(sessions, max_batch) if max_batch else sessions)

    def release(self, backend: Any) -> None:
        replica = self._by_backend.get(id(backend))
        if replica is not None:
            replica.active_sessions = max(0, replica.active_sessions - 1)

    def report_failure(self, backend: Any, error: Exception) -> None:
        replica = self._by_backend.get(id(backend))
        if replica is None:
            return
        replica.last_error = str(error)
        if isinstance(error, ReplicaError) and error.code in FAILURE_CODES:
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
            statuses.append(status)
        return statuses
