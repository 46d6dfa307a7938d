"""What ``--dtype`` x ``--quantize`` costs a target: ms per decoder step and peak memory.

For each combination it starts ``specdec-target --model SOURCE --dtype D [--quantize Q]`` (the
worker as users start it, its start-up warning included), opens one session on a prompt of
``--prompt-tokens`` ids and times, through the worker's own Verify RPC, ``--tokens`` steps of
one token (the target alone decoding) and ``--blocks`` steps of a block of ``--block`` positions
(a speculative Verify at k = block - 1), then reads the worker's peak resident memory (VmHWM).
Wall times are what a caller sees; the worker's CPU time per step is what a busy machine
inflates far less, the figure to compare on a shared one. The checkpoint is a float32 one at the
T5 shape (``big_checkpoint generate --shape large``), so every combination is cast and quantized
as it loads. docs/bench/cpu_numerics.md comes from it::

    python -m specdec_tools.bench.big_checkpoint generate --shape large --out /tmp/t5-large-fp32
    python -m specdec_tools.bench.cpu_numerics --source /tmp/t5-large-fp32 --work /tmp/numerics
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1024**3
LOAD_TIMEOUT_S = 1800.0


@dataclass
class Combination:
    dtype: str
    quantize: int | None

    @property
    def flags(self) -> list[str]:
        return ["--dtype", self.dtype] + ([] if self.quantize is None else ["--quantize", str(self.quantize)])

    @property
    def name(self) -> str:
        return f"{self.dtype} + {self.quantize}-bit" if self.quantize else self.dtype


@dataclass
class Figures:
    flags: str
    ms_per_token: float  # median of the one-token steps' wall time
    ms_per_block: float  # median of the block steps'
    model_ms_per_token: float  # the worker's own model time (VerifyResponse.model_ms), median
    cpu_ms_per_token: float  # the worker's CPU time over the one-token steps, per step: what a busy
    cpu_ms_per_block: float  # machine inflates far less than wall time (one thread computes)
    peak_rss_bytes: int  # VmHWM after all the steps
    weight_bytes: int  # the worker's "GB of weights" line
    warned: bool  # whether its start-up log has a WARNING about the combination


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def measure(source: Path, work: Path, combination: Combination, tokens: int, blocks: int, block: int,
            prompt_tokens: int) -> Figures:
    import grpc

    from specdec_pb import specdec_pb2 as pb
    from specdec_pb import specdec_pb2_grpc as pb_grpc
    from specdec_tools.bench.big_checkpoint import _served_bytes
    from specdec_tools.bench.services import process_cpu_s
    from specdec_tools.service_process import ServiceProcess

    log = work / f"target-{combination.dtype}-q{combination.quantize or 0}.log"
    with ServiceProcess("target", ["--model", str(source), "--port", "0", *combination.flags], log) as service:
        service.wait_port(timeout=LOAD_TIMEOUT_S)
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.TargetStub(channel)
            rng = random.Random(0)
            vocab = stub.Info(pb.InfoRequest(), timeout=30).vocab_size
            prompt = [rng.randrange(3, vocab) for _ in range(prompt_tokens - 1)] + [1]
            session = stub.OpenSession(pb.OpenSessionRequest(prompt_ids=prompt))
            length, last = session.length, 0

            def step(append: list[int], k: int) -> tuple[float, pb.VerifyResponse]:
                nonlocal length
                started = time.perf_counter()
                reply = stub.Verify(pb.VerifyRequest(session_id=session.session_id, expected_length=length,
                                                     append_tokens=append, num_draft=k))
                length = reply.length
                return (time.perf_counter() - started) * 1e3, reply

            for _ in range(2):  # warm-up: the first passes allocate
                _, reply = step([rng.randrange(3, vocab)], 0)
            one, model = [], []
            cpu = process_cpu_s(service.pid)
            for _ in range(tokens):
                wall, reply = step([last], 0)
                last = reply.argmax[-1]
                one.append(wall)
                model.append(reply.model_ms)
            cpu_one = (process_cpu_s(service.pid) or 0.0) - (cpu or 0.0)
            rows = []
            cpu = process_cpu_s(service.pid)
            for _ in range(blocks):
                wall, reply = step([rng.randrange(3, vocab) for _ in range(block)], block - 1)
                rows.append(wall)
            cpu_rows = (process_cpu_s(service.pid) or 0.0) - (cpu or 0.0)
            peak = _peak_rss(service.pid)
    text = log.read_text(errors="replace")
    return Figures(" ".join(combination.flags), statistics.median(one), statistics.median(rows),
                   statistics.median(model), 1e3 * cpu_one / tokens, 1e3 * cpu_rows / blocks, peak,
                   _served_bytes(log), "WARNING" in text)


def median_of(runs: list[Figures]) -> Figures:
    """One combination's figures over its rounds: median times, the highest peak."""
    first = runs[0]
    return Figures(first.flags, statistics.median(f.ms_per_token for f in runs),
                   statistics.median(f.ms_per_block for f in runs),
                   statistics.median(f.model_ms_per_token for f in runs),
                   statistics.median(f.cpu_ms_per_token for f in runs),
                   statistics.median(f.cpu_ms_per_block for f in runs), max(f.peak_rss_bytes for f in runs),
                   first.weight_bytes, any(f.warned for f in runs))


def markdown(results: list[tuple[Combination, Figures]], block: int) -> str:
    base = next((f for c, f in results if c.dtype == "float32" and c.quantize is None), results[0][1])
    lines = [f"| `--dtype` | `--quantize` | CPU ms/token | vs float32 | CPU ms per block of {block} | vs float32 "
             f"| wall ms/token | wall ms per block of {block} | weights GiB | peak RSS GiB | start-up warning |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for combination, f in results:
        lines.append(f"| {combination.dtype} | {combination.quantize or 'none'} | {f.cpu_ms_per_token:.1f} | "
                     f"{f.cpu_ms_per_token / base.cpu_ms_per_token:.2f}x | {f.cpu_ms_per_block:.1f} | "
                     f"{f.cpu_ms_per_block / base.cpu_ms_per_block:.2f}x | {f.ms_per_token:.1f} | "
                     f"{f.ms_per_block:.1f} | {f.weight_bytes / GIB:.2f} | {f.peak_rss_bytes / GIB:.2f} | "
                     f"{'yes' if f.warned else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec_tools.bench.cpu_numerics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, type=Path, help="a float32 checkpoint directory")
    parser.add_argument("--work", required=True, type=Path, help="where the workers' logs and the results go")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    parser.add_argument("--quantize", default="none,8,4", help="comma-separated: none, 8, 4 (default all three)")
    parser.add_argument("--tokens", type=int, default=64, help="one-token steps timed (default 64)")
    parser.add_argument("--blocks", type=int, default=8, help="block steps timed (default 8)")
    parser.add_argument("--block", type=int, default=6, help="positions in a block step (default 6: k = 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every combination is measured, in turns; medians are reported (default 3)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="the session's prompt length (default 64)")
    args = parser.parse_args(argv)
    combinations = [Combination(dtype.strip(), None if bits.strip() == "none" else int(bits))
                    for dtype in args.dtypes.split(",") for bits in args.quantize.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[Figures]] = {c.name: [] for c in combinations}
    for round_ in range(args.rounds):  # combinations take turns, so a busy spell hits them alike
        shift = round_ % len(combinations)
        for combination in combinations[shift:] + combinations[:shift]:
            figures = measure(args.source, args.work, combination, args.tokens, args.blocks, args.block,
                              args.prompt_tokens)
            runs[combination.name].append(figures)
            print(f"round {round_ + 1}/{args.rounds} {combination.name}: {figures.ms_per_token:.1f} ms/token "
                  f"(CPU {figures.cpu_ms_per_token:.1f}), block of {args.block} {figures.ms_per_block:.1f} ms "
                  f"(CPU {figures.cpu_ms_per_block:.1f}), peak "
                  f"{figures.peak_rss_bytes / GIB:.2f} GiB", flush=True)
    results = [(c, median_of(runs[c.name])) for c in combinations]
    (args.work / "cpu_numerics.json").write_text(json.dumps({name: [asdict(f) for f in figures]
                                                             for name, figures in runs.items()}, indent=2) + "\n")
    table = markdown(results, args.block)
    (args.work / "cpu_numerics.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
