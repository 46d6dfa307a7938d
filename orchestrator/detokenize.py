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
from collections.abc import Sequence
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


class TextAttribution:
    """Which characters of a generation's text came from accepted draft tokens, exactly.

    The wire carries one ``from_draft`` flag per token id, but not where one token's text ends
    inside a message's text: a step's tokens are accepted drafts followed by one token of the
    target's, and the server holds text back while a later token could still change it, so a
    message's text need not even be its own tokens' text. With the tokenizer (the same files
    the orchestrator uses) the text is attributed character by character: after each token the
    token ids so far are decoded as the server decodes them (``skip_special_tokens``), and the
    characters that token added, or changed, belong to it. A character built from several
    tokens (byte pieces of one UTF-8 character) belongs to the token that completed it.

    Feed every message of a stream (or one whole ``GenerateResponse``) to ``push``, in order.
    The server's text is what is returned, split into runs ``(text, from_draft)``; the decoding
    is checked against it, and from the first disagreement on (another tokenizer) the text comes
    back unattributed, as ``(text, None)``: never a guessed colour.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.from_draft: list[bool] = []
        self.decoded = ""  # the token ids so far, decoded
        self.owner: list[int] = []  # per character of ``decoded``: the index of the token that wrote it
        self.text = ""  # the server's text so far
        self.agrees = True

    def push(self, token_ids: Sequence[int], from_draft: Sequence[bool], text: str) -> list[tuple[str, bool | None]]:
        """One message's token ids, flags and text; returns the text as runs of one source."""
        if len(from_draft) != len(token_ids):
            self.agrees = False  # a server without the flags: nothing to attribute
        for token, flag in zip(token_ids, from_draft, strict=False):
            self.token_ids.append(int(token))
            self.from_draft.append(bool(flag))
            decoded = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            common = 0
            for a, b in zip(self.decoded, decoded, strict=False):
                if a != b:
                    break
                common += 1
            self.owner[common:] = [len(self.token_ids) - 1] * (len(decoded) - common)
            self.decoded = decoded
        start = len(self.text)
        self.text += text
        if not text:
            return []
        if not (self.agrees and self.decoded.startswith(self.text)):
            self.agrees = False
            return [(text, None)]
        runs: list[tuple[str, bool | None]] = []
        for offset, char in enumerate(text):
            flag = self.from_draft[self.owner[start + offset]]
            if runs and runs[-1][1] == flag:
                runs[-1] = (runs[-1][0] + char, flag)
            else:
                runs.append((char, flag))
        return runs
