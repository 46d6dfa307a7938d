"""The request checks every worker engine makes (model, n-gram, hybrid), so all refuse the same
requests with the same messages. No MLX: the n-gram engine runs without it."""

from __future__ import annotations

from typing import Any

from .errors import InvalidArgument


class RequestChecks:
    """Mixed into an engine that has ``args`` (vocab_size) and ``max_draft``."""

    args: Any
    max_draft: int

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def check_tokens(self, tokens: list[int], what: str) -> None:
        for t in tokens:
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(
                    f"{what} contains token id {t}, outside the vocabulary [0, {self.vocab_size})"
                )

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidArgument("prompt_ids is empty: send at least one token id")
        self.check_tokens(prompt_ids, "prompt_ids")

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_draft:
            raise InvalidArgument(f"num_draft must be in [1, {self.max_draft}] (max_draft), got {k}")
