"""``specdec-orchestrator``: the service clients call, in front of draft and target replicas."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specdec_core.errors import CheckpointError
from specdec_core.limits import (
    Checked,
    OneLineErrorParser,
    above,
    add_limit_arguments,
    at_least,
    limits_from_args,
)
from specdec_core.tokenizer import load_tokenizer, tokenizer_fingerprint
from specdec_grpc.logging_setup import configure_logging
from specdec_grpc.metrics import serve_metrics
from specdec_grpc.ports import require_free
from specdec_grpc.security import Security, is_loopback, read_token
from specdec_grpc.server import (
    DEFAULT_MAX_MESSAGE_MB,
    RunningServer,
    add_server_arguments,
    announce,
    create_server,
    serve_until_signal,
)
from specdec_pb import specdec_pb2_grpc as pb_grpc

from .generation import Orchestrator, OrchestratorLimits
from .metrics import OrchestratorMetrics
from .replicas import ReplicaPool, StartupError, WorkerNeeds
from .servicer import SERVICE_NAME, OrchestratorServicer

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_DRAFT = "127.0.0.1:50061"
DEFAULT_TARGET = "127.0.0.1:50071"
CONNECT_TIMEOUT_S = above(0)
# Checks more often than every 0.1 s cost CPU on every replica and find a dead one no sooner than a
# failed call does.
HEALTH_INTERVAL_S = at_least(0.1)


@dataclass
class WorkerCredentials:
    """How the orchestrator authenticates to draft/target: TLS (optionally mutual) and a token."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            given, missing = ("--worker-tls-cert", "--worker-tls-key") if self.cert else (
                "--worker-tls-key", "--worker-tls-cert")
            raise StartupError(
                f"{given} needs {missing}: mutual TLS to the workers presents a certificate together "
                "with its private key; pass both, or neither"
            )

    def channel(self, address: str, max_message_mb: int) -> grpc.aio.Channel:
        limit = max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 2_000),
            # Reconnect quickly to a replica that comes back (default backoff reaches minutes).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if self.ca or self.cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(self.ca).read_bytes() if self.ca else None,
                private_key=Path(self.key).read_bytes() if self.key else None,
                certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
            )
            return grpc.aio.secure_channel(address, credentials, options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def cleartext_token_to(self, addresses: list[str]) -> list[str]:
        """The worker addresses off loopback that the token would reach without TLS."""
        if not self.token or self.ca or self.cert:
            return []
        return [a for a in addresses if not is_loopback(a.rsplit(":", 1)[0])]


@dataclass
class OrchestratorConfig:
    """Everything the orchestrator is configured with (one object)."""

    drafts: list[str]
    targets: list[str]
    tokenizer: str | None = None
    limits: OrchestratorLimits = field(default_factory=OrchestratorLimits)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    grace_s: float = 10.0
    connect_timeout_s: float = 60.0
    health_interval_s: float = 1.0
    security: Security = field(default_factory=Security)
    workers: WorkerCredentials = field(default_factory=WorkerCredentials)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: a free one); None: off
    step_streams: bool = True  # steps over one stream per session (False: a unary call per step)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OrchestratorConfig:
        """The config from parsed flags; inconsistent flags exit 2 with a message, like argparse."""
        token = read_token(args.worker_token, args.worker_token_file, "--worker-token")
        try:
            workers = WorkerCredentials(args.worker_tls_ca, args.worker_tls_cert, args.worker_tls_key, token)
        except StartupError as error:
            print(f"specdec-orchestrator: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        return cls(
            drafts=args.draft if args.draft is not None else [DEFAULT_DRAFT],
            targets=args.target or [DEFAULT_TARGET],
            tokenizer=args.tokenizer,
            limits=limits_from_args(OrchestratorLimits, args, pipeline=not args.no_pipeline),
            host=args.host,
            port=args.port,
            max_message_mb=args.max_message_mb,
            grace_s=args.grace,
            connect_timeout_s=args.connect_timeout,
            health_interval_s=args.health_interval,
            security=Security.from_args(args),
            workers=workers,
            metrics_port=args.metrics_port,
            step_streams=not args.unary_steps,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="specdec-orchestrator",
        description="The specdec orchestrator: speculative generation over draft and target replicas.",
    )
    parser.add_argument("--draft", action="append", metavar="HOST:PORT",
                        help=f"a draft replica; repeat for several (default {DEFAULT_DRAFT})")
    parser.add_argument("--no-draft", dest="draft", action="store_const", const=[],
                        help="run without a draft: every request decodes with the target alone")
    parser.add_argument("--target", action="append", metavar="HOST:PORT",
                        help=f"a target replica; repeat for several (default {DEFAULT_TARGET})")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the first target's model "
                        "directory, when it is on this host)")
    add_limit_arguments(parser, OrchestratorLimits)
    parser.add_argument("--no-pipeline", action="store_true",
                        help="draft only after each verdict (default: while the target verifies a block, "
                             "the draft drafts the next one as if it were fully accepted; a request's "
                             "`pipeline` field overrides this)")
    parser.add_argument("--unary-steps", action="store_true",
                        help="one unary Propose/Verify call per step (default: each session's steps go "
                             "over one long-lived ProposeStream/VerifyStream call, ~0.3-0.6 ms cheaper "
                             "per step; use this behind a proxy that does not pass bidirectional streams)")
    parser.add_argument("--connect-timeout", type=Checked(float, CONNECT_TIMEOUT_S), default=60.0,
                        help=f"seconds to wait for replicas at start-up (default 60; {CONNECT_TIMEOUT_S})")
    parser.add_argument("--health-interval", type=Checked(float, HEALTH_INTERVAL_S), default=1.0,
                        help=f"seconds between health checks of replicas (default 1; {HEALTH_INTERVAL_S})")
    parser.add_argument("--worker-tls-ca", help="PEM CA that signed the workers' certificates (TLS to workers)")
    parser.add_argument("--worker-tls-cert", help="PEM client certificate for mutual TLS to workers")
    parser.add_argument("--worker-tls-key", help="PEM private key of --worker-tls-cert")
    parser.add_argument("--worker-token", help="bearer token the workers require")
    parser.add_argument("--worker-token-file", help="read the workers' bearer token from this file")
    add_server_arguments(parser, DEFAULT_PORT)
    return parser


def decoder_tokens_needed(limits: OrchestratorLimits) -> int:
    """The longest decoder session a request can make: the start token, max_tokens_cap tokens and a
    block of max_num_draft drafts past the last committed token."""
    return 1 + limits.max_tokens_cap + limits.max_num_draft


def worker_needs(limits: OrchestratorLimits) -> WorkerNeeds:
    """What these limits let a request ask of every worker (the pool refuses workers short of it)."""
    return WorkerNeeds(decoder_tokens_needed(limits), limits.max_num_draft, limits.max_prompt_tokens)


def resolve_tokenizer(config: OrchestratorConfig, pool: ReplicaPool):  # type: ignore[no-untyped-def]
    reference = pool.reference
    assert reference is not None
    source = config.tokenizer or reference.model_path
    if not config.tokenizer and not Path(source).is_dir():
        raise StartupError(
            f"the target's model directory {source} is not on this host; pass --tokenizer DIR "
            "(a directory with the same tokenizer files)"
        )
    try:
        tokenizer = load_tokenizer(source)
    except CheckpointError as error:
        raise StartupError(str(error)) from error
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != reference.tokenizer_fingerprint:
        raise StartupError(
            f"tokenizer {source} (fingerprint {fingerprint}) differs from the target's "
            f"({reference.tokenizer_fingerprint}); pass the target's tokenizer with --tokenizer"
        )
    return tokenizer


async def start_orchestrator(config: OrchestratorConfig) -> tuple[RunningServer, ReplicaPool, Orchestrator]:
    exposed = config.workers.cleartext_token_to([*config.drafts, *config.targets])
    if exposed:
        logger.warning("the worker token goes in cleartext to %s (no --worker-tls-ca): anyone on the network "
                       "path can read it and call those workers; serve them over TLS (--tls-cert/--tls-key) "
                       "and pass --worker-tls-ca", ", ".join(exposed))
    pool = ReplicaPool(
        config.drafts, config.targets,
        lambda address: config.workers.channel(address, config.max_message_mb),
        metadata=config.workers.metadata(),
        health_interval_s=config.health_interval_s,
        step_streams=config.step_streams,
    )
    metrics = OrchestratorMetrics() if config.metrics_port is not None else None
    if metrics is not None:
        pool.on_dropped_report = metrics.dropped_report
        pool.on_unfinished_close = metrics.unfinished_close
    try:
        await pool.start(config.connect_timeout_s, worker_needs(config.limits))
        tokenizer = resolve_tokenizer(config, pool)
    except BaseException:
        await pool.close()
        raise
    reference = pool.reference
    assert reference is not None
    source = metrics.count_failures(pool) if metrics is not None else pool
    orchestrator = Orchestrator(source, tokenizer, reference.decoder_start_token_id, reference.eos_token_id,
                                config.limits)
    servicer = OrchestratorServicer(orchestrator, pool)
    running = await create_server(
        lambda server: pb_grpc.add_OrchestratorServicer_to_server(servicer, server),
        [SERVICE_NAME],
        host=config.host,
        port=config.port,
        max_message_mb=config.max_message_mb,
        security=config.security,
    )
    if metrics is not None:
        orchestrator.metrics = metrics
        metrics.watch(orchestrator)
        running.metrics = serve_metrics(metrics.registry, config.host, config.metrics_port,
                                        config.security.cert, config.security.key,
                                        config.security.client_ca, config.security.token)
    return running, pool, orchestrator


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    config = OrchestratorConfig.from_args(args)
    require_free(config.host, config.port)  # before waiting for the replicas (--connect-timeout)
    if config.metrics_port:
        require_free(config.host, config.metrics_port, "--metrics-port")

    async def serve() -> None:
        running, pool, orchestrator = await start_orchestrator(config)

        async def drain() -> None:
            orchestrator.draining = True

        await serve_until_signal(running, config.grace_s, drain,
                                 ready=lambda: announce("orchestrator", config.host, running.port,
                                                        running.metrics_port))
        await pool.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except StartupError as error:
        logger.error("%s", error)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
