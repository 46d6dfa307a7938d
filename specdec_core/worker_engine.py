"""What a worker's engine is to the session core (``SessionHost``, ``StepScheduler``) and to the
worker's Info: ``WorkerEngine``, the protocol the model (``engine.ModelEngine``), n-gram
(``ngram.NgramEngine``), hybrid and tensor-parallel (``rank_mirror.MirroredEngine``) engines
satisfy. No MLX here: the n-gram worker runs without it.

The engine trusts what it is given: ``SessionHost`` runs its checks (``check_prompt``,
``check_tokens``, ``check_k``, ``check_verify``) once, before a request changes a session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .cache_bytes import SessionCost
from .decoder_state import DecoderState
from .steps import Distribution, Proposal, SamplingParams, Verdict

if TYPE_CHECKING:
    from .kv_cache import KVQuantization
    from .t5 import ModelArgs

# One session's part of a batch: (state, k, sampling, seed) for Propose; (state, num_draft,
# sampling, seed, the draft's q per draft token) for Verify.
DraftJob = tuple[DecoderState, int, SamplingParams, int]
VerifyJob = tuple[DecoderState, int, SamplingParams, int, Sequence[Distribution]]


class DescribedModel(Protocol):
    """What Info says about the model a worker serves (``checkpoint.LoadedModel``; a worker with no
    weights, ``ngram.ModelConfig``: its config alone)."""

    args: ModelArgs
    path: Path  # the directory its config and tokenizer came from
    model_id: str  # what the user asked for: a hub name or a directory
    dtype: str
    quantization: dict[str, int] | None
    load_seconds: float

    @property
    def num_parameters(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...


@runtime_checkable
class WorkerEngine(Protocol):
    """One model (or none, for the n-gram draft) and the operations a worker runs on its sessions,
    each over a batch of sessions at once, on the model thread."""

    method: str  # how a draft built on it proposes (Info.draft_method): "model", "ngram" or "hybrid"
    loaded: DescribedModel
    max_draft: int
    forward_passes: int  # decoder passes run so far (Info)
    kv_quantization: KVQuantization | None  # how its K/V cache is stored (None: the model's dtype, or no cache)
    tensor_parallel: int  # ranks sharing its passes (1: this process alone)

    @property
    def vocab_size(self) -> int: ...
    @property
    def cache_cost(self) -> SessionCost: ...

    def check_tokens(self, tokens: Sequence[int], what: str) -> None: ...
    def check_prompt(self, prompt_ids: Sequence[int]) -> None: ...
    def check_k(self, k: int) -> None: ...
    def check_verify(self, length: int, num_draft: int, params: SamplingParams,
                     draft_distributions: Sequence[Distribution]) -> None: ...

    def start_batch(self, prompts: Sequence[list[int]]) -> Sequence[DecoderState]: ...
    def propose_batch(self, jobs: Sequence[DraftJob]) -> list[Proposal]: ...
    def verify_batch(self, jobs: Sequence[VerifyJob]) -> list[Verdict]: ...
