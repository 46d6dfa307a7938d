"""Orchestrator RPCs: GenerateRequest in, the domain's generation, responses out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from specdec_core.steps import SamplingParams
from specdec_grpc.status import grpc_method, grpc_stream_method
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc

from .generation import Orchestrator, TextEvent
from .params import GenerationParams, Stats
from .replica_traffic import ReplicaTraffic
from .replicas import ReplicaPool


def params_from_pb(orchestrator: Orchestrator, request: pb.GenerateRequest) -> GenerationParams:
    return orchestrator.params(
        max_tokens=request.max_tokens,
        num_draft=request.num_draft,
        num_draft_auto=request.num_draft_auto,
        sampling=SamplingParams(request.temperature, request.top_k, request.top_p or 1.0),
        delta=request.delta,
        seed=request.seed if request.HasField("seed") else None,
        speculative=request.speculative if request.HasField("speculative") else True,
        pipeline=request.pipeline if request.HasField("pipeline") else None,
    )


def stats_to_pb(stats: Stats) -> pb.GenerateStats:
    return pb.GenerateStats(
        proposed=stats.proposed,
        accepted=stats.accepted,
        acceptance_rate=stats.acceptance_rate,
        target_passes=stats.target_passes,
        draft_passes=stats.draft_passes,
        steps=stats.steps,
        draft_ms=stats.draft_s * 1e3,
        verify_ms=stats.verify_s * 1e3,
        orchestration_ms=stats.orchestration_s * 1e3,
        total_ms=stats.total_s * 1e3,
        tokens=stats.tokens,
        target_tokens=stats.target_tokens,
        final_num_draft=stats.final_num_draft,
        seed=stats.seed,
        draft_replica=stats.draft_replica,
        target_replica=stats.target_replica,
        wire_bytes=stats.wire_bytes,
        accepted_per_position=stats.accepted_per_position,
        proposed_per_position=stats.proposed_per_position,
        steps_per_num_draft=stats.steps_per_num_draft,
        predrafts=stats.predrafts,
        predraft_hits=stats.predraft_hits,
        wasted_draft_tokens=stats.wasted_draft_tokens,
        time_to_first_token_ms=stats.time_to_first_token_s * 1e3,
        draft_model_ms=stats.draft_model_s * 1e3,
        target_model_ms=stats.target_model_s * 1e3,
        failovers=stats.failovers,
    )


def _spans_to_pb(spans: list[tuple[str, bool]]) -> list[pb.TextSpan]:
    return [pb.TextSpan(text=piece, from_draft=flag) for piece, flag in spans]


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    def __init__(self, orchestrator: Orchestrator, pool: ReplicaPool | None):
        self.orchestrator = orchestrator
        self.pool = pool
        self.traffic = ReplicaTraffic()  # per replica, for Status

    async def _events(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[TextEvent]:
        params = params_from_pb(self.orchestrator, request)
        events = self.orchestrator.generate(request.prompt, params, _timeout(context), request.text_spans)
        async with contextlib.aclosing(events):
            async for event in events:
                if event.stats is not None:
                    self.traffic.record(event.stats)
                yield event

    @grpc_method
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        events = self._events(request, context)
        async with contextlib.aclosing(events):
            return await self._collect(events)

    @staticmethod
    async def _collect(events: AsyncIterator[TextEvent]) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        text: list[str] = []
        spans: list[tuple[str, bool]] = []
        attributed = True  # every event's text came with its spans (all or none are sent)
        async for event in events:
            text.append(event.text)
            response.token_ids.extend(event.token_ids)
            response.from_draft.extend(event.from_draft)
            attributed = attributed and (bool(event.spans) or not event.text)
            for piece, flag in event.spans:
                if spans and spans[-1][1] == flag:
                    spans[-1] = (spans[-1][0] + piece, flag)
                else:
                    spans.append((piece, flag))
            if event.finish_reason is not None:
                assert event.stats is not None
                response.text = "".join(text)
                if attributed:
                    response.spans.extend(_spans_to_pb(spans))
                response.finish_reason = event.finish_reason
                response.stats.CopyFrom(stats_to_pb(event.stats))
                return response
        raise RuntimeError("generation ended without a finish reason")

    @grpc_stream_method
    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(self._events(request, context)) as events:
            async for event in events:
                message = pb.GenerateStreamResponse(text=event.text, token_ids=event.token_ids,
                                                    from_draft=event.from_draft, spans=_spans_to_pb(event.spans))
                if event.finish_reason is not None:
                    message.finish_reason = event.finish_reason
                    message.stats.CopyFrom(stats_to_pb(event.stats))
                yield message

    @grpc_method
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        replicas = self.pool.status() if self.pool else []
        self.traffic.fill(replicas)
        return pb.StatusResponse(
            replicas=replicas,
            active_generations=self.orchestrator.active,
            max_generations=self.orchestrator.limits.max_generations,
        )


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
