"""Incremental detokenization: turn a growing list of token ids into text deltas.

The deltas are append-only and, joined, equal ``decode(all ids, skip_special_tokens=True)``
exactly. A delta is never taken back, so only text that no later token can change is sent;
the rest waits for more tokens or for ``flush``. What later tokens can change, in the decoders
T5 tokenizers use (sentencepiece, and transformers' Metaspace / ByteFallback / Fuse / Strip):

- the text of a trailing run of byte-fallback pieces (``<0xE2><0x82><0xAC>`` is "€"): the run
  is decoded as one byte string, so a later byte piece can complete it, or make an already
  valid run invalid (transformers' ByteFallback then writes one U+FFFD per byte: "ï" followed
  by a lone ``<0xE2>`` becomes three U+FFFD). Special tokens are skipped before decoding, so
  they do not end a run;
- a trailing U+FFFD (an incomplete UTF-8 sequence in byte-level decoders);
- with ``clean_up_tokenization_spaces``, the text from the second-to-last space on: " ." ,
  " n't", " ' " and the like remove a space once the next token arrives (each such pattern
  holds at most two spaces, so text before the second-to-last space is settled).

Leading-space removal (sentencepiece's dummy prefix) only ever drops text at the very start,
so a prefix stays a prefix. As a last guard, text is only sent while it extends what was sent.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TextStream:
    """Feeds tokens in with ``push``; each call returns the newly settled text. ``flush`` at the
    end returns the rest."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""
        self._special = frozenset(getattr(tokenizer, "all_special_ids", None) or ())
        self._byte_piece: dict[int, bool] = {}

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        return self._advance(self._settled())

    def flush(self) -> str:
        text = self._decode(self.tokens)
        if not text.startswith(self.sent):  # a decoder this module does not know: cannot be undone
            logger.warning("the streamed text (%d characters) is not a prefix of the final text (%d characters): "
                           "the stream ends with the differing tail", len(self.sent), len(text))
        return self._advance(text, final=True)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _is_byte_piece(self, token: int) -> bool:
        known = self._byte_piece.get(token)
        if known is None:
            try:
                piece = self.tokenizer.convert_ids_to_tokens(token)
            except Exception:  # noqa: BLE001 - an id the tokenizer does not know decodes to nothing
                piece = None
            known = self._byte_piece[token] = isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None
        return known

    def _settled(self) -> str:
        """The decoded text that no later token can change."""
        end = len(self.tokens)
        for i in range(len(self.tokens) - 1, -1, -1):
            token = self.tokens[i]
            if token in self._special:
                continue
            if not self._is_byte_piece(token):
                break
            end = i
        text = self._decode(self.tokens[:end])
        if end < len(self.tokens):  # guard: keep only what the full decode agrees with
            full = self._decode(self.tokens)
            common = 0
            for a, b in zip(text, full, strict=False):
                if a != b:
                    break
                common += 1
            text = text[:common]
        text = text.rstrip("\ufffd")
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            last = text.rfind(" ")
            second = text.rfind(" ", 0, last) if last > 0 else -1
            text = text[:second] if second >= 0 else ""
        return text

    def _advance(self, text: str, final: bool = False) -> str:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            delta = text[len(self.sent) :]
            self.sent = text
            return delta
        if final and not text.startswith(self.sent):  # cannot match exactly; send the differing tail
            common = 0
            for a, b in zip(text, self.sent, strict=False):
                if a != b:
                    break
                common += 1
            self.sent = text
            return text[common:]
        return ""
