"""Incremental detokenization: turn a growing list of token ids into text deltas."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Decodes all tokens so far and emits the new suffix; holds back an incomplete character
    (U+FFFD at the end) until the next token completes it."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        if text.startswith(self.sent):
            delta = text[len(self.sent) :]
        else:  # a later token changed earlier text (rare with sentencepiece): resend the tail
            common = 0
            for a, b in zip(text, self.sent, strict=False):
                if a != b:
                    break
                common += 1
            delta = text[common:]
        self.sent = text
        return delta
