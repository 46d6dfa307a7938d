"""``specdec-bench``: speculative decoding through the services vs the target alone, the same loop
in one process, and Hugging Face assisted generation, on the same checkpoints and prompts.

Systems (all greedy at temperature 0, all sampling at temperature 1 with no top-k/top-p):

- ``services-target`` (a): the target alone through the services (``speculative=false``).
- ``services-spec`` (b): speculative decoding through the services.
  Both use three real processes, started here as subprocesses (``python -m
  draft_service.server``, ``target_service.server``, ``orchestrator.server`` on loopback
  ports), called with ``SpecdecClient``; (a) and (b) share them.
- ``inproc-target`` and ``inproc-spec`` (c): the orchestrator's own ``Orchestrator.generate``
  (tokenize, ``SpeculativeGeneration``, detokenize) over ``specdec_tools.inprocess`` backends on two
  ``SessionHost``s in this process: the same work with no gRPC and no process hops.
- ``hf-target`` (e) and ``hf-assisted`` (d): transformers' PyTorch ``generate`` on CPU, the
  target alone and with ``assistant_model=draft`` (``do_sample=False`` at T=0, ``True`` at
  T=1). A fixed k is ``num_assistant_tokens=k``, schedule ``constant``, confidence threshold 0
  (so it drafts exactly k); ``auto`` is transformers' own adaptive mode (schedule
  ``heuristic`` from 5 tokens, its default confidence threshold).

Every (temperature, system, k) cell runs every prompt once per repeat, and all cells take
turns within each (repeat, prompt) in a rotating order, so machine noise hits all alike.
One warm-up generation per cell comes first and is not counted. Sampled runs of all systems
use the same seed per (repeat, prompt).

Workloads: ``synthetic``, a cost-asymmetric random pair built offline and cached under
``--pair-dir`` (default ``OUT/synthetic-pair``; see ``specdec_tools.synthetic_pair``), and
``demo``, the trained demo pair in ``models/demo-draft`` and ``models/demo-target`` (skipped
with a message when missing). Prompts are fixed in ``bench_prompts.json``.

Figures per workload, temperature and k:

- ``ms_per_token``: wall time per generated token (EOS counted) seen by the caller, the
  median over repeats of (all prompts' time / all prompts' tokens).
- ``alpha``: accepted / proposed draft tokens (what the services report);
  ``alpha_hat``: Leviathan's per-token acceptance probability, fitted so that
  (1 - a^(k+1)) / (1 - a) equals the measured tokens per target pass.
- ``tokens_per_target_pass``; ``grpc_ms_per_step``: (b) minus (c) in the orchestrator's
  loop time per speculative step (``stats.total_ms / steps``: two RPCs per step; the
  client's one Generate call is outside it; ``grpc_wall_ms_per_step`` includes it;
  ``grpc_propose_ms_per_step`` and ``grpc_verify_ms_per_step`` split it by RPC);
  ``grpc_cpu_ms_per_step``: the same difference in CPU time, summed over this process and the
  three services (``/proc/PID/task/*/schedstat``; Linux only): what the gRPC path costs in
  work, which a busy machine inflates far less than wall time (it includes the services'
  once-a-second health checks);
  ``wire_bytes_per_step``: ``stats.wire_bytes / steps`` of (b).
- ``bound``: the theoretical speedup (1 - a^(k+1)) / ((1 - a)(k c + 1)) with a = alpha_hat
  (``bound_rate`` uses a = alpha instead, which undercounts for k > 1: drafts after a
  rejection are never accepted) and c = the draft's per-token cost over the target's,
  measured in process (``inproc-spec`` draft time per draft token over ``inproc-target``
  time per target pass). For ``auto`` k is the mean number drafted per step.
- ``speedup``: own target-alone baseline's ms/token over the system's ((b) over (a), (c)
  over in-process target, (d) over (e)); ``speedup_vs_a``: (a) over the system.

Outputs in ``--out``: ``bench.json`` (everything, per cell and per run), ``bench.md`` (the
tables and a line describing the machine) and ``bench.png`` (speedup vs k per system, one
panel per workload and temperature).

    specdec-bench --quick --out bench-out     # < 5 minutes: 2 prompts, 2 repeats, k 1/3/auto,
                                              # max_tokens 24
    specdec-bench --out bench-out             # full: 8 prompts, 3 repeats, k 1/2/3/5/8/auto,
                                              # T 0 and 1, both workloads, max_tokens from
                                              # bench_prompts.json (30-60 minutes on 2 busy
                                              # CPU cores; far less on a quiet machine)

Before the timed runs, an empty unary call (health Check) to the target service is timed
200 times (``empty_grpc_call``: p50 wall, CPU per call): the floor under each of the two
calls a speculative step makes, to read ``grpc_ms_per_step`` against on the same machine.

``--threads`` (default 1) caps OpenBLAS and torch threads in this process and the services,
so that four processes do not oversubscribe a small machine; 0 leaves the libraries' own
defaults. MLX checkpoints load as ``--dtype`` (default float32, what PyTorch runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from specdec_core import blas

blas.preload()  # OpenBLAS goes global before anything imports MLX (see specdec_core.blas)


REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS_FILE = Path(__file__).with_name("bench_prompts.json")
DEMO_DIR = REPO_ROOT / "models"

FULL_KS = ("1", "2", "3", "5", "8", "auto")
QUICK_KS = ("1", "3", "auto")
FULL = dict(prompts=8, repeats=3)
QUICK = dict(prompts=2, repeats=2, max_tokens=24)
AUTO_START = 5  # the orchestrator's default k, where auto starts (transformers' heuristic too)
START_TIMEOUT_S = 300.0

SYSTEMS = {
    "services-target": "(a) target alone, services",
    "services-spec": "(b) speculative, services",
    "inproc-target": "target alone, in-process",
    "inproc-spec": "(c) speculative, in-process",
    "hf-target": "(e) transformers target alone",
    "hf-assisted": "(d) transformers assisted",
}
BASELINE_OF = {"services-spec": "services-target", "inproc-spec": "inproc-target", "hf-assisted": "hf-target"}

logger = logging.getLogger("specdec.bench")
T = TypeVar("T")


# -- one generation ---------------------------------------------------------------------------


@dataclass
class Run:
    """One generation of one prompt by one system."""

    prompt: int
    wall_s: float
    tokens: int  # generated tokens, EOS counted
    token_ids: list[int]  # EOS excluded
    steps: int = 0  # target passes that produced tokens (one per speculative step)
    target_passes: int = 0
    draft_passes: int = 0
    proposed: int | None = None
    accepted: int | None = None
    draft_s: float = 0.0
    verify_s: float = 0.0
    loop_s: float = 0.0  # the orchestrator's own time for the loop (stats.total)
    wire_bytes: int = 0
    cpu_s: float | None = None  # CPU time of every process involved (this one and the services)


@dataclass(frozen=True)
class Cell:
    temperature: float
    system: str
    k: str | None  # "1".."8" or "auto"; None for the target alone

    @property
    def label(self) -> str:
        return f"T={self.temperature:g} {self.system}" + (f" k={self.k}" if self.k else "")


def _seed(repeat: int, prompt: int) -> int:
    return 1 + 1000 * (repeat + 1) + prompt  # repeat -1 is the warm-up


# -- the systems ------------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread; ``call`` runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="bench-loop")
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class ServiceProcess:
    """``python -m MODULE ARGS --port 0``; ``address`` is what it announces."""

    def __init__(self, name: str, module: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.lines: queue.Queue[str] = queue.Queue()
        self.tail: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--host", "127.0.0.1", "--port", "0",
             "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.address = ""

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.tail = (self.tail + [line.rstrip()])[-20:]
            self.lines.put(line)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while not self.address:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s: "
                                   + " | ".join(self.tail)) from None
            if "listening on " in line:
                self.address = line.split("listening on ", 1)[1].strip()
            elif self.process.poll() is not None and self.lines.empty():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                                   + " | ".join(self.tail))
        return self.address

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Services:
    """Draft, target and orchestrator as three processes; (a) and (b) call the orchestrator."""

    def __init__(self, draft: Path, target: Path, dtype: str | None, env: dict[str, str]):
        """Start draft and target (they load while the caller does other work; see ``connect``)."""
        model_args = ["--dtype", dtype] if dtype else []
        self.env = env
        self.processes: list[ServiceProcess] = []
        self.client: Any = None
        try:
            self._start("specdec-draft", "draft_service.server", ["--model", str(draft), *model_args])
            self._start("specdec-target", "target_service.server", ["--model", str(target), *model_args])
        except BaseException:
            self.close()
            raise

    def connect(self) -> Services:
        """Wait for draft and target, start the orchestrator in front of them, connect to it."""
        from orchestrator.client import SpecdecClient

        try:
            draft_address, target_address = [process.wait_ready() for process in self.processes[:2]]
            orchestrator = self._start("specdec-orchestrator", "orchestrator.server",
                                       ["--draft", draft_address, "--target", target_address])
            self.client = SpecdecClient(orchestrator.wait_ready(), timeout=600)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, name: str, module: str, args: list[str]) -> ServiceProcess:
        process = ServiceProcess(name, module, args, self.env)
        self.processes.append(process)
        return process

    def empty_call_floor(self, calls: int = 200) -> dict[str, float | None]:
        """An empty unary call (health Check) from here to the target, ``calls`` times: its p50
        wall time and CPU time per call (this process and the target's), the floor under
        every Propose and Verify on this machine."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.processes[1].address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest(service="")
            for _ in range(20):
                check(request, timeout=10)
            target_cpu, cpu = process_cpu_s(self.processes[1].process.pid), time.process_time()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                check(request, timeout=10)
                times.append(time.perf_counter() - start)
            cpu = time.process_time() - cpu
            target_after = process_cpu_s(self.processes[1].process.pid)
        return {
            "calls": calls,
            "wall_ms_p50": 1e3 * statistics.median(times),
            "cpu_ms": 1e3 * (cpu + target_after - target_cpu) / calls
            if target_cpu is not None and target_after is not None else None,
        }

    def cpu_s(self) -> float | None:
        """CPU seconds the three service processes have used so far (Linux; None elsewhere)."""
        total = 0.0
        for process in self.processes:
            used = process_cpu_s(process.process.pid)
            if used is None:
                return None
            total += used
        return total

    def generate(self, prompt: str, index: int, max_tokens: int, k: str | None, temperature: float,
                 seed: int) -> Run:
        options = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, speculative=k is not None,
                       num_draft=k if k == "auto" else int(k or 1))
        services_cpu, cpu = self.cpu_s(), time.process_time()
        start = time.perf_counter()
        response = self.client.generate(prompt, **options)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        services_after = self.cpu_s()
        if services_cpu is None or services_after is None:
            total_cpu = None
        else:
            total_cpu = cpu + services_after - services_cpu
        s = response.stats
        return Run(index, wall, s.tokens, list(response.token_ids), s.steps, s.target_passes, s.draft_passes,
                   s.proposed, s.accepted, s.draft_ms / 1e3, s.verify_ms / 1e3, s.total_ms / 1e3,
                   s.wire_bytes, total_cpu)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for process in reversed(self.processes):
            process.stop()


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds all threads of a process have run, from /proc/PID/task/*/schedstat (ns
    precision, unlike the 10 ms ticks of /proc/PID/stat). None where /proc has no schedstat."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return None
    return total / 1e9


class InProcess:
    """The orchestrator's generation over two SessionHosts in this process: no gRPC."""

    def __init__(self, draft: Path, target: Path, dtype: str | None):
        from orchestrator.generation import Orchestrator, OrchestratorLimits
        from specdec_core.tokenizer import load_tokenizer
        from specdec_grpc.worker import WorkerConfig, build_host

        self.loop = LoopThread()

        async def start() -> tuple[Any, Any]:
            hosts = [build_host(WorkerConfig(role=role, model=str(path), dtype=dtype))
                     for role, path in (("draft", draft), ("target", target))]
            for host in hosts:
                host.start()
            return hosts[0], hosts[1]

        self.draft_host, self.target_host = self.loop.call(start())
        args = self.target_host.engine.args
        from specdec_tools.inprocess import LocalSource

        source = LocalSource(self.draft_host, self.target_host)
        self.orchestrator = Orchestrator(source, load_tokenizer(target), args.decoder_start_token_id,
                                         args.eos_token_id, OrchestratorLimits())

    def generate(self, prompt: str, index: int, max_tokens: int, k: str | None, temperature: float,
                 seed: int) -> Run:
        from specdec_core.steps import SamplingParams

        params = self.orchestrator.params(
            max_tokens=max_tokens, num_draft=0 if k in (None, "auto") else int(k), num_draft_auto=k == "auto",
            sampling=SamplingParams(temperature), delta=0.0, seed=seed, speculative=k is not None,
        )

        async def generate() -> tuple[list[int], Any]:
            ids: list[int] = []
            stats = None
            async for event in self.orchestrator.generate(prompt, params, None):
                ids.extend(event.token_ids)
                stats = event.stats or stats
            return ids, stats

        cpu = time.process_time()
        start = time.perf_counter()
        ids, s = self.loop.call(generate())
        wall = time.perf_counter() - start
        return Run(index, wall, s.tokens, ids, s.steps, s.target_passes, s.draft_passes, s.proposed,
                   s.accepted, s.draft_s, s.verify_s, s.total_s, s.wire_bytes, time.process_time() - cpu)

    def close(self) -> None:
        async def stop() -> None:
            await self.draft_host.stop()
            await self.target_host.stop()

        with contextlib.suppress(Exception):
            self.loop.call(stop(), timeout=10)
        self.loop.close()


def load_hf_model(path: Path) -> Any:
    """transformers' T5ForConditionalGeneration in float32 from an HF directory, or from an MLX
    directory written by ``specdec-convert``/``specdec-train-demo`` (our parameter names)."""
    import torch
    from safetensors.torch import load_file
    from transformers import T5Config, T5ForConditionalGeneration

    from specdec_core.t5 import _rename, is_hf_layout

    config = json.loads((path / "config.json").read_text())
    weights_file = path / "model.safetensors"
    names: list[str] = []
    if weights_file.is_file():
        from safetensors import safe_open

        with safe_open(str(weights_file), "np") as handle:
            names = list(handle.keys())
    if not names or is_hf_layout(names):
        return T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if (config.get("specdec") or {}).get("quantization"):
        raise RuntimeError(f"{path} is quantized; the transformers baselines need float weights")
    weights = load_file(str(weights_file))
    scale = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True) is not False)
    # transformers derives its output scaling from tie_word_embeddings (then ties the head).
    settings = {k: v for k, v in config.items() if k not in ("specdec", "scale_decoder_outputs")}
    model = T5ForConditionalGeneration(T5Config.from_dict({**settings, "tie_word_embeddings": scale}))
    if "lm_head.weight" in weights:  # v1.1: its own head, not a view of the embedding
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    state = {}
    for name in model.state_dict():
        tied = name.endswith("embed_tokens.weight") or (name == "lm_head.weight" and name not in weights)
        ours = "shared.weight" if tied else _rename(name)
        if ours not in weights:
            raise RuntimeError(f"{path}: no tensor for {name} (ours: {ours})")
        state[name] = weights[ours].float()
    model.load_state_dict(state, strict=True)
    return model.eval()


class HuggingFace:
    """transformers' generate on PyTorch CPU, target alone and assisted by the draft."""

    def __init__(self, draft: Path, target: Path):
        from specdec_core.tokenizer import load_tokenizer

        self.target = load_hf_model(target)
        self.draft = load_hf_model(draft)
        self.tokenizer = load_tokenizer(target)
        self.eos = self.target.config.eos_token_id
        self.passes = {"target": 0, "draft": 0}
        self.target.get_decoder().register_forward_hook(lambda *_: self._count("target"))
        self.draft.get_decoder().register_forward_hook(lambda *_: self._count("draft"))

    def _count(self, which: str) -> None:
        self.passes[which] += 1

    def generate(self, prompt: str, index: int, max_tokens: int, k: str | None, temperature: float,
                 seed: int) -> Run:
        import torch

        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        options: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=temperature > 0)
        if temperature > 0:
            options.update(temperature=temperature, top_k=0, top_p=1.0)
        if k is not None:
            config = self.draft.generation_config
            if k == "auto":
                config.num_assistant_tokens = AUTO_START
                config.num_assistant_tokens_schedule = "heuristic"
                config.assistant_confidence_threshold = type(config)().assistant_confidence_threshold
            else:
                config.num_assistant_tokens = int(k)
                config.num_assistant_tokens_schedule = "constant"
                config.assistant_confidence_threshold = 0.0
            options["assistant_model"] = self.draft
        import transformers
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        # transformers 5.24 sizes generate()'s own decoder cache by the encoder's depth; a
        # target with more decoder than encoder layers (the demo target) then fails. A cache
        # that grows per layer avoids it.
        cache_arg = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
        options[cache_arg] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        torch.manual_seed(seed)
        self.passes = {"target": 0, "draft": 0}
        cpu = time.process_time()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.target.generate(input_ids, **options)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        generated = out[0].tolist()[1:]  # after the decoder start token
        visible = generated[: generated.index(self.eos)] if self.eos in generated else generated
        return Run(index, wall, len(generated), visible, steps=self.passes["target"],
                   target_passes=self.passes["target"], draft_passes=self.passes["draft"], cpu_s=cpu)

    def close(self) -> None:
        pass


# -- figures ----------------------------------------------------------------------------------


def fit_alpha(tokens_per_pass: float, k: float) -> float:
    """Leviathan's per-token acceptance a with (1 - a^(k+1)) / (1 - a) = tokens per pass."""
    if k <= 0 or tokens_per_pass <= 1.0:
        return 0.0
    if tokens_per_pass >= k + 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_tokens(mid, k) < tokens_per_pass:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def expected_tokens(alpha: float, k: float) -> float:
    """Expected tokens per target pass with k drafts accepted i.i.d. with probability alpha."""
    if alpha >= 1.0:
        return k + 1
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def speedup_bound(alpha: float, k: float, cost_ratio: float) -> float:
    """(1 - a^(k+1)) / ((1 - a)(k c + 1)): Leviathan et al.'s expected walltime improvement."""
    return expected_tokens(alpha, k) / (k * cost_ratio + 1)


def summarize(runs_by_repeat: list[list[Run]]) -> dict[str, Any]:
    """Figures of one cell from its runs (one list of prompts' runs per repeat)."""
    runs = [run for repeat in runs_by_repeat for run in repeat]
    tokens = sum(r.tokens for r in runs)
    steps = sum(r.steps for r in runs)
    target_passes = sum(r.target_passes for r in runs)
    draft_passes = sum(r.draft_passes for r in runs)
    summary: dict[str, Any] = {
        "ms_per_token": 1e3 * statistics.median(
            sum(r.wall_s for r in rep) / max(1, sum(r.tokens for r in rep)) for rep in runs_by_repeat
        ),
        "tokens": tokens,
        "generations": len(runs),
        "steps": steps,
        "target_passes": target_passes,
        "draft_passes": draft_passes,
        "tokens_per_target_pass": tokens / target_passes if target_passes else None,
        "wall_ms_per_step": 1e3 * statistics.median(
            sum(r.wall_s for r in rep) / max(1, sum(r.steps for r in rep)) for rep in runs_by_repeat
        ) if steps else None,
        "loop_ms_per_step": 1e3 * statistics.median(
            sum(r.loop_s for r in rep) / max(1, sum(r.steps for r in rep)) for rep in runs_by_repeat
        ) if steps and any(r.loop_s for r in runs) else None,
        "wire_bytes_per_step": sum(r.wire_bytes for r in runs) / steps if steps else None,
        "draft_ms_per_step": 1e3 * sum(r.draft_s for r in runs) / steps if steps and draft_passes else None,
        "verify_ms_per_step": 1e3 * sum(r.verify_s for r in runs) / steps if steps and any(
            r.verify_s for r in runs) else None,
        "cpu_ms_per_token": 1e3 * sum(r.cpu_s or 0.0 for r in runs) / tokens if all(
            r.cpu_s is not None for r in runs) and tokens else None,
        "cpu_ms_per_step": 1e3 * sum(r.cpu_s or 0.0 for r in runs) / steps if all(
            r.cpu_s is not None for r in runs) and steps else None,
        "draft_ms_per_token": 1e3 * sum(r.draft_s for r in runs) / draft_passes if draft_passes and any(
            r.draft_s for r in runs) else None,
        "target_ms_per_pass": 1e3 * sum(r.verify_s for r in runs) / target_passes if target_passes and any(
            r.verify_s for r in runs) else None,
        "alpha": None,
        "drafted_per_step": None,
    }
    if all(r.proposed is not None for r in runs):
        proposed = sum(r.proposed or 0 for r in runs)
        accepted = sum(r.accepted or 0 for r in runs)
        summary["alpha"] = accepted / proposed if proposed else None
        summary["drafted_per_step"] = proposed / steps if steps else None
    return summary


def derive(cells: dict[Cell, dict[str, Any]], temperatures: list[float], ks: list[str]) -> dict[str, Any]:
    """Cross-cell figures per temperature: cost ratio c, speedups, gRPC overhead, bound."""
    per_temperature: dict[str, Any] = {}
    for temperature in temperatures:
        def get(system: str, k: str | None, t: float = temperature) -> dict[str, Any]:
            return cells[Cell(t, system, k)]

        draft_ms = [get("inproc-spec", k)["draft_ms_per_token"] for k in ks]
        draft_ms = [ms for ms in draft_ms if ms]
        target_ms = get("inproc-target", None)["target_ms_per_pass"]
        ratio = statistics.median(draft_ms) / target_ms if draft_ms and target_ms else None
        per_temperature[f"{temperature:g}"] = {
            "cost_ratio_c": ratio,
            "draft_ms_per_token": statistics.median(draft_ms) if draft_ms else None,
            "target_ms_per_pass": target_ms,
        }
        a_ms = get("services-target", None)["ms_per_token"]
        for system in SYSTEMS:
            for k in ([None] if system not in BASELINE_OF else ks):
                cell = get(system, k)
                cell["speedup_vs_a"] = a_ms / cell["ms_per_token"]
                if system in BASELINE_OF:
                    cell["speedup"] = get(BASELINE_OF[system], None)["ms_per_token"] / cell["ms_per_token"]
        for k in ks:
            b, c, d = get("services-spec", k), get("inproc-spec", k), get("hf-assisted", k)
            for key, name in (("loop_ms_per_step", "grpc_ms_per_step"),
                              ("wall_ms_per_step", "grpc_wall_ms_per_step"),
                              ("cpu_ms_per_step", "grpc_cpu_ms_per_step"),
                              ("draft_ms_per_step", "grpc_propose_ms_per_step"),
                              ("verify_ms_per_step", "grpc_verify_ms_per_step")):
                b[name] = b[key] - c[key] if b[key] is not None and c[key] is not None else None
            b["vs_hf_assisted"] = d["ms_per_token"] / b["ms_per_token"]
            for cell in (b, c):
                drafted, tpp = cell["drafted_per_step"], cell["tokens_per_target_pass"]
                if drafted and tpp and ratio is not None:
                    cell["alpha_hat"] = fit_alpha(tpp, drafted)
                    cell["bound"] = speedup_bound(cell["alpha_hat"], drafted, ratio)
                    cell["bound_rate"] = speedup_bound(cell["alpha"] or 0.0, drafted, ratio)
    return per_temperature


def exactness(runs: dict[Cell, list[list[Run]]], ks: list[str]) -> dict[str, Any]:
    """At T=0: does each system's output equal its family's target alone, prompt by prompt?"""
    out: dict[str, Any] = {}
    greedy = [cell for cell in runs if cell.temperature == 0]
    if not greedy:
        return out

    def ids(cell: Cell) -> list[list[int]]:
        return [run.token_ids for run in runs[cell][0]]

    for cell in greedy:
        if cell.system in BASELINE_OF:
            reference = ids(Cell(0.0, BASELINE_OF[cell.system], None))
            mine = ids(cell)
            out[cell.label] = sum(a == b for a, b in zip(mine, reference, strict=True)) / len(mine)
    mlx, hf = ids(Cell(0.0, "services-target", None)), ids(Cell(0.0, "hf-target", None))
    out["mlx target == transformers target"] = sum(a == b for a, b in zip(mlx, hf, strict=True)) / len(mlx)
    return out


# -- running ----------------------------------------------------------------------------------


@dataclass
class Settings:
    ks: list[str]
    temperatures: list[float]
    prompts: int
    repeats: int
    max_tokens: int | None
    threads: int
    dtype: str | None


@dataclass
class Workload:
    name: str
    draft: Path
    target: Path
    prompts: list[str]
    max_tokens: int
    about: str = ""
    results: dict[str, Any] = field(default_factory=dict)


def cells_for(settings: Settings) -> list[Cell]:
    cells = []
    for temperature in settings.temperatures:
        for system in SYSTEMS:
            for k in (settings.ks if system in BASELINE_OF else [None]):
                cells.append(Cell(temperature, system, k))
    return cells


def run_workload(workload: Workload, settings: Settings, env: dict[str, str]) -> dict[str, Any]:
    log = logger.info
    log("%s: starting the services (3 processes), the in-process hosts and transformers", workload.name)
    started = time.perf_counter()
    systems: dict[str, Any] = {}
    try:
        systems["services"] = Services(workload.draft, workload.target, settings.dtype, env)
        systems["inproc"] = InProcess(workload.draft, workload.target, settings.dtype)
        systems["hf"] = HuggingFace(workload.draft, workload.target)
        systems["services"].connect()
        log("%s: ready in %.1f s", workload.name, time.perf_counter() - started)
        floor = systems["services"].empty_call_floor()
        log("%s: an empty gRPC call to the target: p50 %.2f ms wall, %s ms CPU", workload.name,
            floor["wall_ms_p50"], _fmt(floor["cpu_ms"]))
        cells = cells_for(settings)
        runner = {cell: systems[cell.system.split("-")[0]] for cell in cells}

        def one(cell: Cell, prompt: int, repeat: int, max_tokens: int) -> Run:
            return runner[cell].generate(workload.prompts[prompt], prompt, max_tokens, cell.k,
                                         cell.temperature, _seed(repeat, prompt))

        for cell in cells:  # warm-up: first calls pay for allocation and lazy set-up
            one(cell, 0, -1, min(8, workload.max_tokens))
        runs: dict[Cell, list[list[Run]]] = {cell: [] for cell in cells}
        rounds = settings.repeats * len(workload.prompts)
        timer = time.perf_counter()
        for repeat in range(settings.repeats):
            for cell in cells:
                runs[cell].append([])
            for prompt in range(len(workload.prompts)):
                turn = repeat * len(workload.prompts) + prompt
                order = cells[turn % len(cells):] + cells[: turn % len(cells)]
                for cell in order:
                    runs[cell][repeat].append(one(cell, prompt, repeat, workload.max_tokens))
                done = turn + 1
                eta = (time.perf_counter() - timer) / done * (rounds - done)
                log("%s: round %d/%d done, about %.0f s left", workload.name, done, rounds, eta)
        for cell in cells:
            for repeat in runs[cell]:
                repeat.sort(key=lambda run: run.prompt)
    finally:
        for system in systems.values():
            system.close()
    summaries = {cell: summarize(runs[cell]) for cell in cells}
    derived = derive(summaries, settings.temperatures, settings.ks)
    return {
        "empty_grpc_call": floor,
        "per_temperature": derived,
        "exact_greedy": exactness(runs, settings.ks),
        "cells": [
            {"temperature": cell.temperature, "system": cell.system, "k": cell.k, **summaries[cell],
             "runs": [asdict(run) for repeat in runs[cell] for run in repeat]}
            for cell in cells
        ],
    }


def load_workloads(names: list[str], settings: Settings, pair_dir: Path, tiny: bool,
                   demo_dir: Path) -> tuple[list[Workload], dict[str, str]]:
    from .synthetic_pair import PairRecipe, build_pair

    spec = json.loads(PROMPTS_FILE.read_text())
    workloads, skipped = [], {}
    for name in names:
        entry = spec[name]
        prompts = entry["prompts"][: settings.prompts]
        max_tokens = min(entry["max_tokens"], settings.max_tokens or entry["max_tokens"])
        if name == "synthetic":
            recipe = PairRecipe().scaled_down() if tiny else PairRecipe()
            logger.info("synthetic: building or reusing the pair in %s", pair_dir)
            pair = build_pair(pair_dir, recipe)
            about = (f"random pair: draft 1 decoder layer, target {1 + recipe.extra_decoder_layers} "
                     f"(extra blocks' output projections x{recipe.extra_block_gain}), d_model "
                     f"{recipe.draft['d_model']}")
            workloads.append(Workload(name, pair.draft, pair.target, prompts, max_tokens, about))
        elif name == "demo":
            draft, target = demo_dir / "demo-draft", demo_dir / "demo-target"
            missing = [str(p) for p in (draft, target) if not (p / "config.json").is_file()]
            if missing:
                skipped[name] = (f"skipped: {', '.join(missing)} not found (train it with "
                                 "`specdec-train-demo --out models`)")
                logger.warning("demo: %s", skipped[name])
                continue
            about = "the trained demo pair (spell numbers in words)"
            workloads.append(Workload(name, draft, target, prompts, max_tokens, about))
        else:
            raise SystemExit(f"unknown workload {name!r}; choose from synthetic, demo")
    return workloads, skipped


def limit_threads(threads: int) -> dict[str, str]:
    """Cap OpenBLAS and torch threads here; return the environment for the service processes."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads <= 0:
        return env
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    if blas.active_blas.startswith("openblas ("):
        library = blas.active_blas.removeprefix("openblas (").removesuffix(")")
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(library).openblas_set_num_threads(threads)
    import torch

    torch.set_num_threads(threads)
    return env


def machine(settings: Settings) -> dict[str, Any]:
    import mlx.core as mx
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "blas": blas.active_blas,
        "threads": settings.threads or "library defaults",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("load_average")
    load_text = f"; load average at start {load[0]:.1f}" if load else ""
    return (f"Machine: {info['platform']} ({info['machine']}), {info['cpus']} CPUs, Python {info['python']}, "
            f"MLX {info['mlx']}, BLAS {info['blas']}, threads {info['threads']}, torch {info['torch']}, "
            f"transformers {info['transformers']}{load_text}.")


# -- reports ----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# specdec benchmark", "", machine_line(report["machine"]), ""]
    s = report["settings"]
    lines.append(f"Settings: {s['prompts']} prompts x {s['repeats']} repeats per cell, k in "
                 f"{', '.join(s['ks'])}, temperatures {', '.join(f'{t:g}' for t in s['temperatures'])}, "
                 f"MLX dtype {s['dtype'] or 'as stored'}{', quick' if s['quick'] else ''}; "
                 f"{report['wall_s']:.0f} s in all. Services: three subprocesses on loopback gRPC.")
    lines.append("")
    for name, reason in report.get("skipped", {}).items():
        lines += [f"## {name}", "", reason, ""]
    for workload in report["workloads"]:
        cells = {(c["temperature"], c["system"], c["k"]): c for c in workload["results"]["cells"]}
        floor = workload["results"]["empty_grpc_call"]
        lines += [f"## {workload['name']}: {workload['about']}", "",
                  f"draft `{workload['draft']}`, target `{workload['target']}`, max_tokens "
                  f"{workload['max_tokens']}. An empty gRPC call (health Check) from the bench to the target "
                  f"service: p50 {_fmt(floor['wall_ms_p50'])} ms wall, {_fmt(floor['cpu_ms'])} ms CPU (both "
                  "processes); a speculative step makes two calls (Propose, Verify).", ""]
        for temperature in s["temperatures"]:
            derived = workload["results"]["per_temperature"][f"{temperature:g}"]

            def ms(system: str, t: float = temperature, table: dict = cells) -> str:
                return _fmt(table[(t, system, None)]["ms_per_token"], 1)

            lines += [
                f"### T={temperature:g}", "",
                f"Target alone, ms/token: (a) services {ms('services-target')}, in-process "
                f"{ms('inproc-target')}, (e) transformers {ms('hf-target')}. Cost ratio c = "
                f"{_fmt(derived['cost_ratio_c'], 3)} (draft {_fmt(derived['draft_ms_per_token'])} ms/token, "
                f"target {_fmt(derived['target_ms_per_pass'])} ms/pass, in process).", "",
                "| k | (b) services ms/tok | (c) in-proc ms/tok | (d) HF assisted ms/tok "
                "| (b) speedup vs (a) "
                "| (c) speedup vs in-proc target | (d) speedup vs (e) | (b) vs (d) | alpha | alpha_hat "
                "| tokens/target pass | gRPC ms/step | gRPC CPU ms/step | wire B/step | bound |",
                "|---|" + "---:|" * 14,
            ]
            for k in s["ks"]:
                b = cells[(temperature, "services-spec", k)]
                c = cells[(temperature, "inproc-spec", k)]
                d = cells[(temperature, "hf-assisted", k)]
                lines.append(
                    f"| {k} | {_fmt(b['ms_per_token'], 1)} | {_fmt(c['ms_per_token'], 1)} | "
                    f"{_fmt(d['ms_per_token'], 1)} | {_fmt(b['speedup'], 2, 'x')} | "
                    f"{_fmt(c['speedup'], 2, 'x')} | {_fmt(d['speedup'], 2, 'x')} | "
                    f"{_fmt(b['vs_hf_assisted'], 2, 'x')} | {_fmt(b['alpha'])} | "
                    f"{_fmt(b.get('alpha_hat'))} | {_fmt(b['tokens_per_target_pass'])} | "
                    f"{_fmt(b.get('grpc_ms_per_step'))} | {_fmt(b.get('grpc_cpu_ms_per_step'))} | "
                    f"{_fmt(b['wire_bytes_per_step'], 0)} | "
                    f"{_fmt(b.get('bound'), 2, 'x')} |"
                )
            lines.append("")
        exact = workload["results"]["exact_greedy"]
        if exact:
            wrong = {label: share for label, share in exact.items() if share < 1.0}
            lines.append("Greedy outputs equal to the same family's target alone on every prompt: "
                         + ("all" if not wrong else "all but " + ", ".join(
                             f"{label} ({share:.0%})" for label, share in wrong.items())) + ".")
            lines.append("")
    lines += [
        "Columns: ms/tok = wall time per generated token seen by the caller (median over repeats); "
        "speedup = the system's own target-alone ms/token over its ms/token; (b) vs (d) = HF assisted "
        "ms/token over (b)'s (> 1: the services are faster); alpha = accepted/proposed; alpha_hat = "
        "per-token acceptance fitted to tokens/target pass; gRPC ms/step = (b) minus (c) loop time per "
        "step; gRPC CPU ms/step = the same in CPU time summed over all processes (robust to a busy "
        "machine); bound = (1 - a^(k+1)) / ((1 - a)(k c + 1)) with a = alpha_hat (for auto, k = mean "
        "drafted per step).", "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    panels = [(w, t) for w in report["workloads"] for t in s["temperatures"]]
    columns = max(1, len(s["temperatures"]))
    rows = max(1, (len(panels) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    x = list(range(len(s["ks"])))
    styles = {"services-spec": "o-", "inproc-spec": "s--", "hf-assisted": "^-."}
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (workload, temperature) in zip(axes.flat, panels, strict=False):
        cells = {(c["temperature"], c["system"], c["k"]): c for c in workload["results"]["cells"]}
        for system, style in styles.items():
            speedups = [cells[(temperature, system, k)]["speedup"] for k in s["ks"]]
            ax.plot(x, speedups, style, label=SYSTEMS[system])
        bound = [cells[(temperature, "services-spec", k)].get("bound") for k in s["ks"]]
        if any(b is not None for b in bound):
            ax.plot(x, [b if b is not None else float("nan") for b in bound], ":", color="gray",
                    label="bound (alpha_hat, c)")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(x, s["ks"])
        ax.set_xlabel("k (draft tokens per step)")
        ax.set_ylabel("speedup over its own target alone")
        ax.set_title(f"{workload['name']}, T={temperature:g}")
        ax.grid(alpha=0.3)
    if panels:
        axes.flat[0].legend(fontsize=8)
    figure.suptitle(machine_line(report["machine"]), fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec-bench",
        description="Benchmark speculative decoding through the services against the target alone, the "
                    "same loop in one process, and transformers' assisted generation.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['prompts']} prompts, {QUICK['repeats']} repeats, k "
                             f"{'/'.join(QUICK_KS)}, max_tokens {QUICK['max_tokens']} "
                             "(under 5 minutes on 2 cores)")
    parser.add_argument("--workloads", default="synthetic,demo", help="comma-separated: synthetic, demo")
    parser.add_argument("--ks", help=f"comma-separated k values and/or auto (default {','.join(FULL_KS)})")
    parser.add_argument("--temperatures", default="0,1", help="comma-separated temperatures (default 0,1)")
    parser.add_argument("--prompts", type=int, help="prompts per workload (default 8; quick 2)")
    parser.add_argument("--repeats", type=int, help="timed repeats of every prompt (default 3; quick 2)")
    parser.add_argument("--max-tokens", type=int, help="cap on each workload's max_tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenBLAS/torch threads in every process (0: the libraries' defaults)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "as-stored"],
                        help="dtype MLX loads both models in (transformers always runs float32)")
    parser.add_argument("--pair-dir", type=Path,
                        help="where the synthetic pair is cached (default OUT/synthetic-pair)")
    parser.add_argument("--tiny", action="store_true", help="a tiny synthetic pair (for smoke tests)")
    parser.add_argument("--models-dir", type=Path, default=DEMO_DIR,
                        help="where demo-draft and demo-target live (default: the repository's models/)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.logging.set_verbosity_error()
    preset = QUICK if args.quick else FULL
    settings = Settings(
        ks=[k.strip() for k in (args.ks or ",".join(QUICK_KS if args.quick else FULL_KS)).split(",")],
        temperatures=[float(t) for t in args.temperatures.split(",")],
        prompts=args.prompts or preset["prompts"],
        repeats=args.repeats or preset["repeats"],
        max_tokens=args.max_tokens or preset.get("max_tokens"),
        threads=args.threads,
        dtype=None if args.dtype == "as-stored" else args.dtype,
    )
    for k in settings.ks:
        if k != "auto" and not (k.isdigit() and 1 <= int(k) <= 16):
            raise SystemExit(f"--ks: {k!r} is not a k in 1..16 or 'auto'")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = limit_threads(settings.threads)
    info = machine(settings)
    logger.info("%s", machine_line(info))
    started = time.perf_counter()
    pair_dir = args.pair_dir or out / ("synthetic-pair-tiny" if args.tiny else "synthetic-pair")
    workloads, skipped = load_workloads([w.strip() for w in args.workloads.split(",") if w.strip()], settings,
                                        pair_dir, args.tiny, args.models_dir)
    report: dict[str, Any] = {
        "machine": info,
        "settings": {**asdict(settings), "quick": args.quick, "tiny": args.tiny},
        "systems": SYSTEMS,
        "skipped": skipped,
        "workloads": [],
    }
    for workload in workloads:
        workload.results = run_workload(workload, settings, env)
        report["workloads"].append({
            "name": workload.name, "about": workload.about, "draft": str(workload.draft),
            "target": str(workload.target), "prompts": workload.prompts, "max_tokens": workload.max_tokens,
            "results": workload.results,
        })
    report["wall_s"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(report))
    plot(report, out / "bench.png")
    logger.info("wrote %s, %s and %s (%.0f s)", out / "bench.json", out / "bench.md", out / "bench.png",
                report["wall_s"])
    print((out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
