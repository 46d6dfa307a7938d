"""The orchestrator's step streams (``GrpcBackend``): one ProposeStream per session, its
answers matched to its steps, and every way a stream can end (an error status, the replica
ending it between steps, a timeout, a cancel, a replica without the stream RPCs).

A real gRPC server in this process, with a scripted draft servicer: no model is loaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator.backend_protocol import ReplicaError, ReplicaFailure
from orchestrator.backends import GrpcBackend
from specdec_core.errors import InvalidArgument
from specdec_core.steps import SamplingParams, StepRequest
from specdec_pb import specdec_pb2 as pb
from specdec_pb import specdec_pb2_grpc as pb_grpc


class ScriptedDraft(pb_grpc.DraftServicer):
    """Answers a step with one token: the number of steps its session has had. The session id
    scripts the rest: "bad-..." fails INVALID_ARGUMENT, "slow-..." takes 0.6 s, and
    "once-..." ends its stream after each answer (as a replica that restarted between steps)."""

    def __init__(self, streams: bool = True):
        self.streams = streams
        self.streams_opened = 0
        self.unary_steps = 0
        self.steps: dict[str, int] = {}

    async def _answer(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        if request.session_id.startswith("bad"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "scripted refusal")
        if request.session_id.startswith("slow"):
            await asyncio.sleep(0.6)
        count = self.steps[request.session_id] = self.steps.get(request.session_id, 0) + 1
        return pb.ProposeResponse(tokens=[count], token_probs=[1.0], length=request.expected_length + 1)

    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context: grpc.aio.ServicerContext) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(closed=True)

    async def Propose(self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        self.unary_steps += 1
        return await self._answer(request, context)

    async def ProposeStream(self, requests: AsyncIterator[pb.ProposeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProposeResponse]:
        if not self.streams:  # an older worker
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.streams_opened += 1
        async for request in requests:
            yield await self._answer(request, context)
            if request.session_id.startswith("once"):
                return


def step(session_id: str, length: int = 1, timeout: float | None = 10.0) -> StepRequest:
    deadline = None if timeout is None else time.monotonic() + timeout
    return StepRequest(session_id=session_id, expected_length=length, rollback_to=0, append_tokens=[],
                       num_draft=1, sampling=SamplingParams(), seed=0, deadline=deadline)


async def serving(servicer: ScriptedDraft) -> tuple[grpc.aio.Server, GrpcBackend]:
    server = grpc.aio.server()
    pb_grpc.add_DraftServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, GrpcBackend("draft", f"127.0.0.1:{port}", pb_grpc.DraftStub(channel))


def run(test) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(test(), 30))


def test_a_sessions_steps_share_one_stream_and_each_gets_its_own_answer() -> None:
    async def test() -> None:
        servicer = ScriptedDraft()
        server, backend = await serving(servicer)
        answers = {name: [] for name in ("a", "b")}
        for i in range(5):  # two sessions' steps interleaved on one channel
            for name in answers:
                answers[name].append((await backend.step(step(name, length=1 + i))).tokens[0])
        assert answers == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 4, 5]}
        assert servicer.streams_opened == 2 and servicer.unary_steps == 0
        await backend.close("a")
        await backend.step(step("a", length=6))  # a step after the close opens a new stream
        assert servicer.streams_opened == 3
        await server.stop(None)

    run(test)


def test_an_error_ends_the_stream_and_the_next_step_opens_another() -> None:
    async def test() -> None:
        servicer = ScriptedDraft()
        server, backend = await serving(servicer)
        await backend.step(step("plain"))  # stream 1
        with pytest.raises(InvalidArgument, match="scripted refusal"):
            await backend.step(step("bad-2"))  # stream 2, ended by its error
        with pytest.raises(InvalidArgument):
            await backend.step(step("bad-2"))  # not read from the ended stream: stream 3 refuses too
        assert servicer.streams_opened == 3
        assert (await backend.step(step("plain", length=2))).tokens == [2]  # stream 1 still serves
        assert servicer.streams_opened == 3
        await server.stop(None)

    run(test)


def test_a_stream_the_replica_ended_between_steps_is_replaced_without_losing_the_step() -> None:
    async def test() -> None:
        servicer = ScriptedDraft()
        server, backend = await serving(servicer)
        for i in range(4):
            assert (await backend.step(step("once", length=1 + i))).tokens == [i + 1]
            await asyncio.sleep(0.05)  # let the end of the stream arrive before the next step
        assert servicer.streams_opened == 4  # each step found its stream ended and opened another
        assert servicer.steps["once"] == 4  # and no step was run twice or lost
        await server.stop(None)

    run(test)


def test_a_step_past_its_deadline_fails_over_and_discards_its_stream() -> None:
    async def test() -> None:
        servicer = ScriptedDraft()
        server, backend = await serving(servicer)
        await backend.step(step("slow-1", timeout=5))  # stream 1, answered in 0.6 s
        with pytest.raises(ReplicaError) as info:
            await backend.step(step("slow-1", length=2, timeout=0.2))
        assert info.value.timed_out
        # Its late answer (length 3) is never read as the next step's: that one goes out on a
        # new stream and gets its own (length 4).
        assert (await backend.step(step("slow-1", length=3, timeout=5))).length == 4
        assert servicer.streams_opened == 2
        await server.stop(None)

    run(test)


def test_a_cancelled_step_discards_its_stream() -> None:
    async def test() -> None:
        servicer = ScriptedDraft()
        server, backend = await serving(servicer)
        await backend.step(step("slow-2"))
        pending = asyncio.ensure_future(backend.step(step("slow-2", length=2)))
        await asyncio.sleep(0.2)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert (await backend.step(step("slow-2", length=5))).length == 6  # its own answer, not the cancelled one's
        assert servicer.streams_opened == 2
        await server.stop(None)

    run(test)


def test_a_replica_without_step_streams_fails_the_step_as_a_replica_error() -> None:
    """Every specdec worker serves the stream RPCs; one that does not (UNIMPLEMENTED) is a replica
    that cannot serve this orchestrator: the step fails over like any replica failure."""
    async def test() -> None:
        servicer = ScriptedDraft(streams=False)
        server, backend = await serving(servicer)
        with pytest.raises(ReplicaError) as failed:
            await backend.step(step("a"))
        assert failed.value.kind is ReplicaFailure.FAILED and "UNIMPLEMENTED" in str(failed.value)
        assert servicer.unary_steps == 0
        await server.stop(None)

    run(test)


# -- the worker's side: StepStreams ------------------------------------------------------------------


def test_a_worker_reads_a_stream_no_further_than_the_step_it_answers() -> None:
    """A client that sends step after step while the model is busy must be pushed back by gRPC's
    flow control: the worker reads the next message only when the last one is answered, so at
    most one is read ahead of the step being answered (no unbounded queue in the worker)."""
    from specdec_grpc.step_streams import StepStreams

    async def test() -> None:
        read = 0

        async def fast_client() -> AsyncIterator[int]:
            nonlocal read
            for i in range(1000):
                read += 1
                yield i
                await asyncio.sleep(0)

        answered = 0
        async for _ in StepStreams().requests(fast_client()):
            await asyncio.sleep(0.005)  # the model is busy with this step
            answered += 1
            assert read - answered <= 1, f"{read - answered} messages read ahead of the answered step"
            if answered == 20:
                break

    run(test)


def test_ending_every_stream_wakes_one_waiting_for_its_next_step() -> None:
    from specdec_grpc.step_streams import StepStreams

    async def test() -> None:
        streams = StepStreams()

        async def idle_client() -> AsyncIterator[int]:
            yield 1
            await asyncio.sleep(60)  # an idle session: no next step for a minute
            yield 2

        got: list[int] = []

        async def handler() -> None:
            async for request in streams.requests(idle_client()):
                got.append(request)

        handling = asyncio.ensure_future(handler())
        await asyncio.sleep(0.05)
        streams.end_all()
        await asyncio.wait_for(handling, 1)
        assert got == [1]

    run(test)


class BusyDraft(pb_grpc.DraftServicer):
    """A ProposeStream behind ``StepStreams`` whose model is busy 5 ms a step; counts what it has
    read of the stream and the most it ever read ahead of the step it answers."""

    def __init__(self) -> None:
        from specdec_grpc.step_streams import StepStreams

        self.streams = StepStreams()
        self.read = self.answered = self.most_ahead = 0

    async def ProposeStream(self, requests: AsyncIterator[pb.ProposeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProposeResponse]:
        async def counted() -> AsyncIterator[pb.ProposeRequest]:
            async for request in requests:
                self.read += 1
                yield request

        async for request in self.streams.requests(counted()):
            await asyncio.sleep(0.005)  # the model thread is busy
            self.most_ahead = max(self.most_ahead, self.read - self.answered)
            self.answered += 1
            yield pb.ProposeResponse(tokens=[1], token_probs=[1.0], length=request.expected_length + 1)


def test_over_grpc_a_client_sending_faster_than_the_worker_answers_is_held_back() -> None:
    """200 x 4 KB steps sent at once on one stream: the worker has read at most the step it is
    answering plus one (the rest wait in gRPC's flow-control window, not in the worker)."""

    async def test() -> None:
        servicer = BusyDraft()
        server = grpc.aio.server()
        pb_grpc.add_DraftServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        padding = list(range(1000))  # ~4 KB of varints per message
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.DraftStub(channel).ProposeStream()
            for i in range(200):
                await call.write(pb.ProposeRequest(session_id="s", expected_length=i + 1, append_tokens=padding))
            await call.done_writing()
            answers = [answer async for answer in call]
        assert len(answers) == 200 and servicer.answered == 200
        assert servicer.most_ahead <= 2, servicer.most_ahead
        await server.stop(None)

    run(test)


class AnsweringDraft(pb_grpc.DraftServicer):
    """A ProposeStream behind ``StepStreams`` that answers each step at once."""

    def __init__(self) -> None:
        from specdec_grpc.step_streams import StepStreams

        self.streams = StepStreams()

    async def ProposeStream(self, requests: AsyncIterator[pb.ProposeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProposeResponse]:
        async for request in self.streams.requests(requests):
            yield pb.ProposeResponse(tokens=[1], token_probs=[1.0], length=request.expected_length + 1)


def test_a_stream_cancelled_between_steps_leaves_no_unretrieved_task_error() -> None:
    """Closing a session cancels its stream while the worker waits for the next step: the read
    abandoned then must not surface as asyncio's ERROR "Task exception was never retrieved"
    (StopAsyncIteration), which an operator reads as a failure."""
    import gc

    async def test() -> None:
        problems: list[str] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: problems.append(f"{context['message']}: {context.get('exception')!r}"))
        server = grpc.aio.server()
        pb_grpc.add_DraftServicer_to_server(AnsweringDraft(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.DraftStub(channel)
            for _ in range(10):
                call = stub.ProposeStream()
                await call.write(pb.ProposeRequest(session_id="s", expected_length=1))
                await call.read()
                call.cancel()  # as GrpcBackend.close does
                await asyncio.sleep(0.01)
        await server.stop(None)
        gc.collect()  # an unretrieved task error is reported when its task is collected
        await asyncio.sleep(0.05)
        assert problems == []

    run(test)
