"""``specdec-bench``: speculative decoding through the services vs the target alone, the same loop
in one process, and Hugging Face assisted generation, on the same checkpoints and prompts.

Systems (all greedy at temperature 0, all sampling at temperature 1 with no top-k/top-p):

- ``services-target`` (a): the target alone through the services (``speculative=false``).
- ``services-spec`` (b): speculative decoding through the services, pipelined drafting on.
- ``services-serial`` (b'): the same with ``pipeline=false`` (drafting only after each verdict).
- ``services-unary`` (b''): (b) through a second orchestrator started with ``--unary-steps``: a
  unary Propose/Verify call per step instead of one step stream per session.
  All use three real processes (plus that second orchestrator), started here as subprocesses (``python -m
  draft_service.server``, ``target_service.server``, ``orchestrator.server`` on loopback
  ports), called with ``SpecdecClient``; (a) and (b) share them.
- ``inproc-target`` and ``inproc-spec`` (c): the orchestrator's own ``Orchestrator.generate``
  (tokenize, ``SpeculativeGeneration``, detokenize) over ``specdec_tools.local_backends`` backends on two
  ``SessionHost``s in this process: the same work with no gRPC and no process hops, serial
  (``pipeline=false``): the single-process loop that the pipelined services must beat.
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
with a message when missing). Their prompts are fixed in ``prompts.json`` (in this package).
``custom`` is the user's own pair and prompts: ``--draft-model`` and ``--target-model`` (a
checkpoint directory in Hugging Face or ``specdec-convert`` format, or a hub name, resolved as
the services resolve ``--model``, once, and checked to share one tokenizer) and
``--prompts-file`` (one prompt per line, or JSON Lines with a ``prompt`` field); it runs alone
when those flags are given without ``--workloads``. Where transformers cannot load a pair (a
quantized specdec checkpoint, no torch), (d) and (e) are skipped with the reason, in
``bench.json`` (``skipped_systems``) and ``bench.md``, and the other systems still run.

Figures per workload, temperature and k:

- ``ms_per_token``: wall time per generated token (EOS counted) seen by the caller, the
  median over repeats of (all prompts' time / all prompts' tokens).
- ``alpha``: accepted / proposed draft tokens (what the services report);
  ``alpha_hat``: Leviathan's per-token acceptance probability, fitted so that
  (1 - a^(k+1)) / (1 - a) equals the measured tokens per target pass.
- ``tokens_per_target_pass``; ``grpc_ms_per_step``: (b') minus (c) in the orchestrator's
  loop time per speculative step (``stats.total_ms / steps``: two RPCs per step; the
  client's one Generate call is outside it; ``grpc_wall_ms_per_step`` includes it;
  ``grpc_propose_ms_per_step`` and ``grpc_verify_ms_per_step`` split it by RPC);
  ``grpc_cpu_ms_per_step``: the same difference in CPU time, summed over this process and the
  three services (``/proc/PID/task/*/schedstat``; Linux only): what the gRPC path costs in
  work, which a busy machine inflates far less than wall time (it includes the services'
  once-a-second health checks). Both are serial at the same fixed k, so the difference is the
  wire's: (b) drafts ahead, which shortens its step by draft time, and under ``auto`` each run
  picks its own k, so neither is compared with (c) (the figures are None there, never negative);
  ``unary_ms_per_step`` of (b''): what a unary call per step adds over (b)'s streams;
  ``wire_bytes_per_step``: ``stats.wire_bytes / steps`` of (b).
- ``bound``: the theoretical speedup (1 - a^(k+1)) / ((1 - a)(k c + 1)) with a = alpha_hat
  (``bound_rate`` uses a = alpha instead, which undercounts for k > 1: drafts after a
  rejection are never accepted) and c = the draft's per-token cost over the target's,
  measured in process (``inproc-spec`` draft time per draft token over ``inproc-target``
  time per target pass). For ``auto`` k is the mean number drafted per step.
- ``speedup``: own target-alone baseline's ms/token over the system's ((b) over (a), (c)
  over in-process target, (d) over (e)); ``speedup_vs_a``: (a) over the system.

Outputs in ``--out``: ``bench.json`` (everything, per cell and per run), ``bench.md`` (the
verdict, the tables and a line describing the machine), ``bench.png`` (speedup vs k per system,
one panel per workload and temperature) and ``logs/`` (every service's log, and this process's
own library lines in ``bench.log``, so they do not drown the progress on the console). The run
ends by printing the verdict: per workload and temperature, speculative's speedup over the target
alone at its best k, both sides' ms/token and tokens/s, the acceptance, and greedy equality.

    specdec-bench --quick --out bench-out     # < 5 minutes: 2 prompts, 2 repeats, k 1/3/auto,
                                              # max_tokens 24
    specdec-bench --out bench-out             # full: 8 prompts, 3 repeats, k 1/2/3/5/8/auto,
                                              # T 0 and 1, both workloads, max_tokens from
                                              # prompts.json (30-60 minutes on 2 busy
                                              # CPU cores; far less on a quiet machine)

Before the timed runs, an empty unary call (health Check) to the target service is timed
200 times (``empty_grpc_call``: p50 wall, CPU per call): the floor under each of the two
calls a speculative step makes, to read ``grpc_ms_per_step`` against on the same machine.

``--threads`` (default 1) caps OpenBLAS and torch threads in this process and the services,
so that four processes do not oversubscribe a small machine; 0 leaves the libraries' own
defaults. MLX checkpoints load as ``--dtype`` (default float32, what PyTorch runs).

``--drafting`` compares draft methods instead (``drafting``): the target alone and drafts
started with ``--method`` from ``--draft-methods`` (default model, ngram, hybrid; extra draft
flags in ``--draft-flags``), each behind its own orchestrator in front of one shared target, in
the same rotating order; it writes ``drafting.json`` and ``drafting.md``. The ``copy`` workload
is made for it: a target that copies its prompt with a few tokens swapped and a cheaper draft
that knows half the swaps, built by hand and cached beside ``--pair-dir``
(``specdec_tools.copy_pair``).

    specdec-bench --drafting --workloads copy,demo --out bench-out

Modules: ``cells`` (systems, cells, settings, one run's record), ``workloads`` (prompts and
model pairs), ``services``, ``in_process`` and ``hugging_face`` (the systems), ``runner`` (every
cell of a workload in rotating order), ``analysis`` (figures and the bound), ``machine``
(thread caps and what the machine is), ``report`` (markdown and plot), ``cli``, ``drafting``
(the draft-method comparison).
"""

from specdec_core import blas

blas.preload()  # OpenBLAS goes global before anything imports MLX (see specdec_core.blas)

from .cli import build_parser, main  # noqa: E402 - after the preload

__all__ = ["build_parser", "main"]
