"""System (c): the orchestrator's own generation over two SessionHosts in this process, no gRPC."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from specdec_tools.loop_thread import LoopThread

from .cells import Run


class InProcess:
    """The orchestrator's generation over two SessionHosts in this process: no gRPC."""

    def __init__(self, draft: Path, target: Path, dtype: str | None):
        from orchestrator.generation import Orchestrator, OrchestratorLimits
        from specdec_core.tokenizer import load_tokenizer
        from specdec_grpc.worker import WorkerConfig, build_host

        self.loop = LoopThread(name="bench-loop", timeout=600)

        async def start() -> tuple[Any, Any]:
            hosts = [build_host(WorkerConfig(role=role, model=str(path), dtype=dtype))
                     for role, path in (("draft", draft), ("target", target))]
            for host in hosts:
                host.start()
            return hosts[0], hosts[1]

        self.draft_host, self.target_host = self.loop.call(start())
        args = self.target_host.engine.args
        from specdec_tools.local_backends import LocalSource

        source = LocalSource(self.draft_host, self.target_host)
        self.orchestrator = Orchestrator(source, load_tokenizer(target), args.decoder_start_token_id,
                                         args.eos_token_id, OrchestratorLimits())

    def generate(self, prompt: str, index: int, max_tokens: int, k: str | None, temperature: float,
                 seed: int) -> Run:
        from specdec_core.steps import SamplingParams

        params = self.orchestrator.params(
            max_tokens=max_tokens, num_draft=0 if k in (None, "auto") else int(k), num_draft_auto=k == "auto",
            sampling=SamplingParams(temperature), delta=0.0, seed=seed, speculative=k is not None,
            pipeline=False,  # (c) is the serial loop in one process: what pipelining must beat
        )

        async def generate() -> tuple[list[int], Any]:
            ids: list[int] = []
            stats = None
            async with contextlib.aclosing(self.orchestrator.generate(prompt, params, None)) as events:
                async for event in events:
                    ids.extend(event.token_ids)
                    stats = event.stats or stats
            return ids, stats

        cpu = time.process_time()
        start = time.perf_counter()
        ids, s = self.loop.call(generate())
        wall = time.perf_counter() - start
        return Run(index, wall, s.tokens, ids, s.steps, s.target_passes, s.draft_passes, s.proposed,
                   s.accepted, s.draft_s, s.verify_s, s.total_s, s.wire_bytes, time.process_time() - cpu,
                   steps_per_k=list(s.steps_per_num_draft))

    def close(self) -> None:
        async def stop() -> None:
            await self.draft_host.stop()
            await self.target_host.stop()

        with contextlib.suppress(Exception):
            self.loop.call(stop(), timeout=10)
        self.loop.close()
