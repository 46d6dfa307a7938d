"""What draft and target processes share: config, model loading, the common RPCs, main().

The two differ only in the one RPC they add (Propose or Verify); everything else about a
session (open, roll back, close, Info) is here, thin over ``SessionHost``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from specdec_core import blas
from specdec_core.cache_bytes import typical_session_bytes
from specdec_core.device import compute_device, hostname
from specdec_core.engine_choice import EngineChoice, build_engine
from specdec_core.errors import CheckpointError
from specdec_core.host_limits import HostLimits
from specdec_core.kv_cache import KV_BITS, KV_GROUP_SIZES
from specdec_core.limits import Checked, OneLineErrorParser, add_limit_arguments, at_least, limits_from_args
from specdec_core.ngram import MAX_NGRAM
from specdec_core.session_host import SessionHost
from specdec_core.tokenizer import load_tokenizer, tokenizer_fingerprint
from specdec_grpc.logging_setup import configure_logging
from specdec_grpc.metrics import WorkerMetrics, serve_metrics
from specdec_grpc.ports import require_free
from specdec_grpc.security import Security
from specdec_grpc.server import (
    RunningServer,
    add_server_arguments,
    announce,
    create_server,
    serve_until_signal,
)
from specdec_grpc.status import deadline_of, grpc_method
from specdec_grpc.step_streams import StepStreams
from specdec_grpc.tensor_parallel_worker import TensorParallel
from specdec_grpc.wire import WireLimits
from specdec_pb import specdec_pb2 as pb

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS = {"draft": REPO_ROOT / "models" / "demo-draft", "target": REPO_ROOT / "models" / "demo-target"}
DEFAULT_PORTS = {"draft": 50061, "target": 50071}
NGRAM_SIZES = at_least(1, MAX_NGRAM)  # tokens in a match (--ngram-min, --ngram-max, --hybrid-min-match)


@dataclass
class WorkerConfig:
    """Everything a draft or target process is configured with (one object per service)."""

    role: str
    model: str
    dtype: str | None = None
    quantize: int | None = None
    kv_bits: int | None = None  # the sessions' K/V cache in 8 or 4 bits (--kv-bits); None: the model's dtype
    limits: HostLimits = field(default_factory=HostLimits)
    host: str = "127.0.0.1"
    port: int = 0
    max_message_mb: int | None = None  # None: sized from the limits and vocabulary (needed_message_mb)
    grace_s: float = 10.0
    security: Security = field(default_factory=Security)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: a free one); None: off
    # How a draft proposes: "model", "ngram" (prompt lookup, no weights) or "hybrid" (both).
    method: str = "model"
    ngram_min: int = 1
    ngram_max: int = 4
    hybrid_min_match: int = 3
    # Ranks the model is split over (a target only). None: one process, or the size of the
    # group this process was started in by mlx.launch.
    tensor_parallel: int | None = None

    @classmethod
    def from_args(cls, role: str, args: argparse.Namespace) -> WorkerConfig:
        return cls(
            role=role,
            model=args.model,
            dtype=args.dtype,
            quantize=args.quantize,
            kv_bits=args.kv_bits,
            limits=limits_from_args(HostLimits, args),
            host=args.host,
            port=args.port,
            max_message_mb=args.max_message_mb,
            grace_s=args.grace,
            security=Security.from_args(args),
            metrics_port=args.metrics_port,
            method=getattr(args, "method", "model"),  # draft-only flags (the target has none)
            ngram_min=getattr(args, "ngram_min", 1),
            ngram_max=getattr(args, "ngram_max", 4),
            hybrid_min_match=getattr(args, "hybrid_min_match", 3),
            tensor_parallel=getattr(args, "tensor_parallel", None),
        )


def build_parser(role: str) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=f"specdec-{role}",
        description=f"The specdec {role} service: one T5 model, per-session KV caches, gRPC.",
    )
    parser.add_argument("--model", default=str(DEMO_MODELS[role]),
                        help="checkpoint directory (HF or specdec-convert output) or hub name "
                             f"(default models/demo-{role}, the bundled demo {role})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype (default: as stored; float16 overflows in T5)")
    parser.add_argument("--quantize", type=int, choices=[4, 8], help="quantize linear layers at load")
    parser.add_argument("--kv-bits", type=int, choices=list(KV_BITS),
                        help="store every session's K/V cache (cross- and self-attention) in this many bits "
                             f"per value, in groups along d_kv (mx.quantize; {KV_GROUP_SIZES[0]} where d_kv "
                             "allows): ~half (8) or a quarter (4) of bfloat16's bytes. Changes the output: it "
                             "is then this model's with this cache. Default: the model's dtype")
    add_limit_arguments(parser, HostLimits)
    add_server_arguments(
        parser, DEFAULT_PORTS[role], default_max_message_mb=None,
        max_message_help="largest request/response accepted, MiB (default: sized to the largest "
                         "legal request, --max-draft distributions over the model's vocabulary plus "
                         "--max-decoder-tokens ids, with 2x headroom: 10 MiB for T5 at --max-draft 32)",
    )
    if role == "draft":
        add_draft_method_arguments(parser)
    else:
        parser.add_argument("--tensor-parallel", type=Checked(int, at_least(1)), metavar="N",
                            help="split the model over N ranks on this machine (a loopback MLX ring; "
                                 "this process is rank 0 and serves gRPC, it starts ranks 1..N-1). "
                                 "Under mlx.launch (several machines) the group is the launcher's: "
                                 "N may be left out. See the README, 'A target larger than one machine'")
    return parser


def add_draft_method_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WorkerConfig(role="draft", model="")
    parser.add_argument("--method", choices=["model", "ngram", "hybrid"], default=defaults.method,
                        help="how the draft proposes: model (the T5 in --model); ngram (prompt lookup: "
                             "the tokens that followed the longest recent match of the output's last "
                             "tokens in the prompt or the output; no weights are loaded, --model gives "
                             "the config and tokenizer); hybrid (the n-gram match where one is at least "
                             f"--hybrid-min-match long, the model elsewhere). Default {defaults.method}")
    parser.add_argument("--ngram-min", type=Checked(int, NGRAM_SIZES), default=defaults.ngram_min,
                        help=f"shortest match the ngram draft uses (default {defaults.ngram_min}; the hybrid's "
                             "is --hybrid-min-match)")
    parser.add_argument("--ngram-max", type=Checked(int, NGRAM_SIZES), default=defaults.ngram_max,
                        help=f"longest match the ngram and hybrid drafts look up first (default {defaults.ngram_max}; "
                             f"{NGRAM_SIZES})")
    parser.add_argument("--hybrid-min-match", type=Checked(int, NGRAM_SIZES), default=defaults.hybrid_min_match,
                        help="the hybrid draft proposes from the n-gram lookup where the match is at "
                             f"least this long, else from the model (default {defaults.hybrid_min_match}; "
                             "at most --ngram-max)")


def parse_worker_args(role: str, argv: list[str] | None = None) -> argparse.Namespace:
    """A worker's flags, each within its range, and consistent with each other (else one line on
    stderr and exit status 2, before any model is loaded)."""
    parser = build_parser(role)
    args = parser.parse_args(argv)
    method = getattr(args, "method", "model")
    if method == "ngram" and args.ngram_min > args.ngram_max:
        parser.error(f"--ngram-min {args.ngram_min} is above --ngram-max {args.ngram_max}: the shortest match "
                     "the draft uses must not be longer than the longest it looks up")
    if method == "hybrid" and args.hybrid_min_match > args.ngram_max:
        parser.error(f"--hybrid-min-match {args.hybrid_min_match} is above --ngram-max {args.ngram_max}: the "
                     "hybrid draft indexes n-grams up to --ngram-max only; raise it or lower --hybrid-min-match")
    return args


def _varint_bytes(value: int) -> int:
    return max(1, (max(value, 0).bit_length() + 6) // 7)


def needed_message_mb(limits: HostLimits, vocab_size: int) -> int:
    """A worker's message cap: the largest legal Propose/Verify request or response, twice, in MiB.

    That is ``max_draft`` draft distributions over the whole vocabulary (a sparse one at full
    support is the biggest: one varint id and 2 float16 bytes per token) plus a session's worth
    of appended token ids, or a prompt for OpenSession.
    """
    id_bytes = _varint_bytes(vocab_size - 1)
    distribution = vocab_size * (id_bytes + 2) + 16
    tokens = (limits.max_decoder_tokens + limits.max_prompt_tokens) * id_bytes
    largest = limits.max_draft * distribution + tokens + 4096
    return max(1, -(-2 * largest // (1024 * 1024)))


def build_host(config: WorkerConfig) -> SessionHost:
    if config.method != "model" and config.role != "draft":
        raise CheckpointError(f"--method {config.method} is for drafts; a {config.role} runs its model")
    engine, model_dir = build_engine(EngineChoice(config.role, config.model, config.method, config.dtype,
                                                   config.quantize, config.limits.max_draft, config.ngram_min,
                                                   config.ngram_max, config.hybrid_min_match, config.kv_bits))
    tokenizer = load_tokenizer(model_dir)
    return SessionHost(engine, config.limits, config.role, tokenizer_fingerprint(tokenizer))


class SessionServicer:
    """The RPCs draft and target share. Subclasses add Propose or Verify."""

    # Told (method name, status code) of every call answered with an error (``grpc_method``).
    on_error: Callable[[str, grpc.StatusCode], None] | None = None

    def __init__(self, host: SessionHost):
        self.host = host
        self.step_streams = StepStreams()
        host.drain_listeners.append(self.step_streams.end_all)
        limits = host.limits
        self.wire_limits = WireLimits(limits.max_prompt_tokens, limits.max_decoder_tokens, limits.max_draft,
                                      host.engine.vocab_size)

    @grpc_method
    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        self.wire_limits.check_open(request)  # before the ids become a list
        session = await self.host.open(list(request.prompt_ids), request.client_tag, deadline_of(context),
                                       request.owner)
        return pb.OpenSessionResponse(session_id=session.id, length=session.state.length)

    @grpc_method
    async def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackResponse:
        length = await self.host.rollback(request.session_id, request.expected_length, request.length)
        return pb.RollbackResponse(length=length)

    @grpc_method
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(closed=await self.host.close(request.session_id))

    @grpc_method
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        self.host.renew(request.owner)  # the orchestrator's health watch: its sessions stay
        return info_response(self.host)

    def counted(self, request: Message, response: M) -> M:
        """Count a step's bytes on the wire for Info; return the response."""
        self.host.metrics.request_bytes += request.ByteSize()
        self.host.metrics.response_bytes += response.ByteSize()
        return response


def info_response(host: SessionHost) -> pb.InfoResponse:
    loaded = host.engine.loaded
    args = loaded.args
    live = host.snapshot()
    limits = host.limits
    kv = host.engine.kv_quantization  # (None: the model's dtype, or an n-gram draft's no cache)
    return pb.InfoResponse(
        model_id=loaded.model_id,
        model_path=str(loaded.path.resolve()),
        vocab_size=args.vocab_size,
        eos_token_id=args.eos_token_id,
        pad_token_id=args.pad_token_id,
        decoder_start_token_id=args.decoder_start_token_id,
        tokenizer_fingerprint=host.tokenizer_fingerprint,
        dtype=loaded.dtype,
        quantization_bits=(loaded.quantization or {}).get("bits", 0),
        kv_bits=kv.bits if kv else 0,
        kv_group_size=kv.group_size if kv else 0,
        num_parameters=loaded.num_parameters,
        load_seconds=loaded.load_seconds,
        role=host.role,
        limits=pb.Limits(**{name: getattr(limits, name) for name in pb.Limits.DESCRIPTOR.fields_by_name}),
        live_sessions=live["live_sessions"],
        cached_tokens=live["cached_tokens"],
        cache_bytes_used=live["cache_bytes_used"],
        cache_bytes_per_position=host.store.cost.bytes_per_position,
        typical_session_bytes=typical_session_bytes(host.store.cost),
        typical_sessions_free=live["typical_sessions_free"],
        metrics=pb.Metrics(
            sessions_opened=live["sessions_opened"],
            sessions_expired=live["sessions_expired"],
            sessions_reclaimed=live["sessions_reclaimed"],
            forward_passes=live["forward_passes"],
            steps=live["steps"],
            response_bytes=live["response_bytes"],
            request_bytes=live["request_bytes"],
            batches=live["batches"],
            batched_steps=live["batched_steps"],
        ),
        blas=blas.active_blas,
        draft_method=host.engine.method if host.role == "draft" else "",
        tensor_parallel=host.engine.tensor_parallel,
        # an n-gram draft runs no model: it computes on the CPU whatever MLX's default device is
        device="cpu" if host.engine.method == "ngram" else compute_device(),
        hostname=hostname(),
    )


async def start_worker(
    config: WorkerConfig,
    servicer_class: type[SessionServicer],
    add_to_server: Callable[[SessionServicer, grpc.aio.Server], None],
    service_name: str,
    host: SessionHost | None = None,
) -> tuple[RunningServer, SessionHost]:
    """Start a draft or target server (tests call this with port 0)."""
    host = host or build_host(config)
    host.start()
    servicer = servicer_class(host)
    needed = needed_message_mb(host.limits, host.engine.vocab_size)
    max_message_mb = config.max_message_mb or needed
    if max_message_mb < needed:
        logger.warning("--max-message-mb %d is below the %d MiB the largest legal request may need "
                       "(--max-draft %d over a vocabulary of %d)", max_message_mb, needed,
                       host.limits.max_draft, host.engine.vocab_size)
    running = await create_server(
        lambda server: add_to_server(servicer, server),
        [service_name],
        host=config.host,
        port=config.port,
        max_message_mb=max_message_mb,
        security=config.security,
    )
    host.on_wedged = running.set_wedged  # the watchdog's verdict becomes the health status
    if config.metrics_port is not None:
        metrics = WorkerMetrics(host)
        servicer.on_error = metrics.refused
        running.metrics = serve_metrics(metrics.registry, config.host, config.metrics_port,
                                        config.security.cert, config.security.key,
                                        config.security.client_ca, config.security.token)
    return running, host


def run_worker(
    role: str,
    servicer_class: type[SessionServicer],
    add_to_server: Callable[[SessionServicer, grpc.aio.Server], None],
    service_name: str,
    argv: list[str] | None = None,
) -> None:
    args = parse_worker_args(role, argv)
    configure_logging(args.log_level, args.log_format)
    config = WorkerConfig.from_args(role, args)
    ranks = TensorParallel.join(config, sys.argv[1:] if argv is None else argv)
    if ranks is not None and ranks.group.rank() != 0:
        ranks.follow(config)  # never returns
    # Before the model loads (minutes for a large one): a port in use stops it now, in one line.
    require_free(config.host, config.port)
    if config.metrics_port:
        require_free(config.host, config.metrics_port, "--metrics-port")
    try:
        host = ranks.build_host(config) if ranks is not None else build_host(config)
    except CheckpointError as error:  # a checkpoint it cannot load: one line (file, field, problem), no traceback
        if ranks is not None:
            ranks.stop_followers()
        print(f"specdec-{role}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    async def serve() -> None:
        running, started = await start_worker(config, servicer_class, add_to_server, service_name, host)
        watch = ranks.watch(running, started) if ranks is not None else None
        await serve_until_signal(running, config.grace_s, started.drain,
                                 ready=lambda: announce(role, config.host, running.port, running.metrics_port))
        if watch is not None:
            watch.cancel()
        await started.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        if ranks is not None:
            ranks.stop_followers()
