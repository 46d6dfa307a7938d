"""The request checks every worker engine declares (model, n-gram, hybrid), so all refuse the same
requests with the same messages. ``SessionHost`` runs them once, before a request changes a
session; the engines themselves trust their inputs. No MLX: the n-gram engine runs without it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import InvalidArgument
from .steps import Distribution, SamplingParams

if TYPE_CHECKING:
    from .t5 import ModelArgs


class RequestChecks:
    """Mixed into an engine that has ``args`` (vocab_size) and ``max_draft``."""

    args: ModelArgs
    max_draft: int

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def check_tokens(self, tokens: Sequence[int], what: str) -> None:
        for t in tokens:
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(
                    f"{what} contains token id {t}, outside the vocabulary [0, {self.vocab_size})"
                )

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise InvalidArgument("prompt_ids is empty: send at least one token id")
        self.check_tokens(prompt_ids, "prompt_ids")

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_draft:
            raise InvalidArgument(f"num_draft must be in [1, {self.max_draft}] (max_draft), got {k}")

    def check_verify(self, length: int, num_draft: int, params: SamplingParams,
                     draft_distributions: Sequence[Distribution]) -> None:
        """A Verify that leaves its session ``length`` tokens long (its drafts the last ``num_draft``
        of them): its k, and with sampling the draft's q for each draft token, in full (lengths, ids,
        values), so no draw meets a q it cannot use and one bad step never fails a batch."""
        if not 0 <= num_draft < length:
            raise InvalidArgument(f"num_draft must be in [0, {length - 1}] for this session, got {num_draft}")
        if num_draft > self.max_draft:
            raise InvalidArgument(f"num_draft {num_draft} exceeds this service's limit {self.max_draft}")
        if not params.greedy and len(draft_distributions) != num_draft:
            raise InvalidArgument(
                f"sampling needs the draft's distribution for each of the {num_draft} draft "
                f"tokens, got {len(draft_distributions)}"
            )
        for distribution in draft_distributions:  # (greedy ignores them, but never takes a malformed one)
            distribution.check(self.vocab_size)
