"""Model-free drafting ("prompt lookup"): propose the tokens that followed the longest recent
match of the output's last tokens, in the prompt or in the output itself.

T5's encoder and decoder share one vocabulary, so an output that copies spans of its input
(extraction, editing, summaries that quote) can be drafted by looking the output's last n
tokens up in the prompt's ids and in what was already generated. ``NgramIndex`` does that for
one session; ``NgramEngine`` serves it behind the same interface as ``ModelEngine``'s draft
side (start, propose, the checks), so ``SessionHost``, the servicer and the orchestrator need
no special case. Its q is a point mass on each proposed token, which keeps exact speculative
sampling exact (docs/architecture.md, "Drafting without a model").

No MLX here (the unit tests import this module without it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cache_bytes import IndexCost
from .decoder_state import CHUNK, DecoderState
from .errors import InvalidArgument
from .request_checks import RequestChecks
from .steps import Distribution, Proposal, SamplingParams, Verdict
from .worker_engine import DraftJob, VerifyJob

if TYPE_CHECKING:
    from .t5 import ModelArgs

MAX_NGRAM = 64  # the longest n-gram a lookup may use (each size costs a vectorised pass per lookup)


def check_ngram_sizes(ngram_min: int, ngram_max: int) -> None:
    if not 1 <= ngram_min <= ngram_max <= MAX_NGRAM:
        raise InvalidArgument(
            f"n-gram sizes must satisfy 1 <= ngram_min <= ngram_max <= {MAX_NGRAM}, "
            f"got ngram_min={ngram_min}, ngram_max={ngram_max}"
        )


@dataclass(frozen=True)
class Match:
    """The longest match of the output's last ``size`` tokens, at its most recent occurrence."""

    size: int  # n: how many of the output's last tokens matched
    end: int  # index (in prompt + output) of the occurrence's last token
    tokens: list[int]  # what followed it: the proposal (at most the k asked for)


class NgramIndex:
    """A session's prompt ids and output tokens, searched for n-grams of sizes
    ``ngram_min..ngram_max`` that lie within one of the two (none spans the boundary: the
    output is not a continuation of the prompt's text).

    ``lookup(k)`` takes the output's last n tokens for n from ``ngram_max`` down to
    ``ngram_min`` (longest first) and returns what followed their most recent earlier
    occurrence, up to k tokens: in the prompt it stops at the prompt's end; in the output it
    may run into the tokens it proposes (an overlapping copy, as LZ77 does), so a repeating
    output is continued.

    No table: the ids sit in one int32 array (4 bytes a position), and a lookup scans it with
    numpy (one comparison over the positions, then one per matched token among the few
    candidates: tens of microseconds for thousands of positions). A table of every n-gram cost
    about 0.8 KB a position at ``ngram_max`` 4 and 4 KB at 16. Appending is a copy into the
    array; a rollback moves its length back.
    """

    def __init__(self, prompt: Sequence[int], ngram_min: int = 1, ngram_max: int = 4):
        check_ngram_sizes(ngram_min, ngram_max)
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self.prompt_length = len(prompt)
        self._ids = np.zeros(max(64, 2 * len(prompt)), np.int32)  # prompt, then output; grown by doubling
        self._length = 0
        self._put(prompt)

    # -- contents ------------------------------------------------------------------------------
    @property
    def output(self) -> list[int]:
        return self._ids[self.prompt_length : self._length].tolist()

    @property
    def positions(self) -> int:
        """Token positions held: prompt plus output."""
        return self._length

    @property
    def nbytes(self) -> int:
        """Memory the index holds (its array, spare room included)."""
        return self._ids.nbytes

    def _put(self, tokens: Sequence[int]) -> None:
        need = self._length + len(tokens)
        if need > len(self._ids):
            grown = np.zeros(max(need, 2 * len(self._ids)), np.int32)
            grown[: self._length] = self._ids[: self._length]
            self._ids = grown
        self._ids[self._length : need] = tokens
        self._length = need

    def extend(self, tokens: Iterable[int]) -> None:
        """Append output tokens."""
        self._put(list(tokens))

    def truncate(self, output_length: int) -> None:
        """Keep the first ``output_length`` output tokens (a rollback)."""
        if not 0 <= output_length <= self._length - self.prompt_length:
            raise InvalidArgument(
                f"cannot keep {output_length} output tokens: the index holds "
                f"{self._length - self.prompt_length}"
            )
        self._length = self.prompt_length + output_length

    def sync(self, output: Sequence[int]) -> None:
        """Make the indexed output equal ``output``: truncate to the common prefix, append the rest."""
        mine = self._ids[self.prompt_length : self._length].tolist()
        if len(mine) <= len(output) and mine == list(output[: len(mine)]):
            common = len(mine)  # the usual case: the session only grew
        else:
            common = 0
            for a, b in zip(mine, output, strict=False):
                if a != b:
                    break
                common += 1
            self.truncate(common)
        self.extend(output[common:])

    # -- lookup --------------------------------------------------------------------------------
    def lookup(self, k: int) -> Match | None:
        """The longest match of the output's last tokens at its most recent occurrence that has a
        continuation, and up to ``k`` tokens of that continuation; None if nothing matches."""
        top = min(self.ngram_max, self._length - self.prompt_length)
        if k < 1 or top < self.ngram_min:
            return None
        seq, last, prompt_length = self._ids[: self._length], self._length - 1, self.prompt_length
        # Candidate ends: earlier positions holding the last token, none the prompt's last token
        # (nothing follows it); then how many tokens back each agrees with the suffix, within its
        # own segment.
        ends = np.flatnonzero(seq[:last] == seq[last])
        ends = ends[ends != prompt_length - 1]
        starts = np.where(ends < prompt_length, 0, prompt_length)  # each candidate's segment
        matched = np.ones(len(ends), np.int64)
        for back in range(1, top):
            going = (matched == back) & (ends - back >= starts)
            going[going] = seq[ends[going] - back] == seq[last - back]
            if not going.any():
                break
            matched[going] += 1
        for n in range(top, self.ngram_min - 1, -1):
            found = ends[matched >= n]
            if len(found):
                end = int(found[-1])  # (ascending: the last is the most recent)
                return Match(n, end, self._continuation(end, k))
        return None

    def _continuation(self, end: int, k: int) -> list[int]:
        if end < self.prompt_length:
            return self._ids[end + 1 : min(end + 1 + k, self.prompt_length)].tolist()
        after = self._ids[end + 1 : self._length].tolist()
        tokens = after[:k]
        while len(tokens) < k:  # an overlapping copy: past the end, it copies what it proposed
            tokens.append(tokens[len(tokens) - len(after)])
        return tokens

    def propose(self, k: int) -> list[int]:
        match = self.lookup(k)
        return match.tokens if match is not None else []


# -- the engine ------------------------------------------------------------------------------------


def point_mass(token: int) -> Distribution:
    """q for a token proposed without a model: all of its mass on the token (float16 weight 1,
    exact on the wire; ``sampling.normalised`` gives exactly 1.0)."""
    return Distribution(np.array([token], np.int32), np.ones(1, np.float16))


@dataclass
class ModelConfig:
    """What ``Info`` says about the model family of a worker that loads no weights: the config
    (vocabulary, special ids) and where it came from; no dtype, no parameters."""

    args: ModelArgs
    path: Path
    model_id: str
    dtype: str = ""
    quantization: dict[str, int] | None = None
    num_parameters: int = 0
    weight_bytes: int = 0
    load_seconds: float = 0.0


class IndexPositions:
    """An n-gram session's stand-in for a KV cache. Nothing is cached (``length`` 0, so a
    rollback has no K/V to drop). The positions it indexes, the prompt (``encoder_length``) and
    the decoder tokens in the store's chunks (``capacity``), are counted against the worker's
    budget (``--cache-memory``) exactly as a model session's, at the engine's ``IndexCost`` (~50
    bytes a position: the index and the token lists, no K/V), so the store's reservation and
    growth checks work unchanged."""

    length = 0

    def __init__(self, tokens: list[int], prompt_length: int):
        self._tokens = tokens  # the session's own list (mutated in place, never replaced)
        self.encoder_length = prompt_length

    @property
    def capacity(self) -> int:
        return -(-len(self._tokens) // CHUNK) * CHUNK

    def rollback_to(self, length: int) -> None:
        pass


class NgramState(DecoderState):
    """An n-gram session: its decoder tokens, as any session holds them, and the index of prompt
    and output, brought up to date with ``tokens`` at each proposal (``SessionHost`` rolls back
    and appends ``tokens`` itself)."""

    def __init__(self, tokens: list[int], index: NgramIndex):
        super().__init__(tokens, IndexPositions(tokens, index.prompt_length))
        self.index = index


class NgramEngine(RequestChecks):
    """A draft with no model: ``ModelEngine``'s draft-side interface over an ``NgramIndex`` per
    session. ``loaded`` carries the model family's config for Info (no weights are read)."""

    method = "ngram"
    kv_quantization = None  # no K/V cache to quantize
    tensor_parallel = 1

    def __init__(self, loaded: ModelConfig, max_draft: int = 64, ngram_min: int = 1, ngram_max: int = 4):
        check_ngram_sizes(ngram_min, ngram_max)
        self.loaded = loaded
        self.args = loaded.args
        self.max_draft = max_draft
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self.forward_passes = 0  # no model: never a forward pass
        self.cache_cost = IndexCost()

    def start(self, prompt_ids: list[int]) -> NgramState:
        index = NgramIndex(prompt_ids, self.ngram_min, self.ngram_max)
        return NgramState([self.args.decoder_start_token_id], index)

    def propose(self, state: NgramState, k: int, params: SamplingParams, seed: int) -> Proposal:
        """Up to k tokens from the index (none when nothing matches: the step is the target
        alone), cut after EOS; q is a point mass on each."""
        state.index.sync(state.tokens[1:])
        tokens = state.index.propose(k)
        eos = self.args.eos_token_id
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        state.tokens.extend(tokens)
        state.index.extend(tokens)
        return Proposal(
            tokens=tokens,
            token_probs=[1.0] * len(tokens),
            distributions=[] if params.greedy else [point_mass(t) for t in tokens],
        )

    def start_batch(self, prompts: Sequence[list[int]]) -> list[NgramState]:
        return [self.start(prompt) for prompt in prompts]

    def propose_batch(self, jobs: Sequence[DraftJob]) -> list[Proposal]:
        """No model pass to share: each session's lookup, one after another."""
        return [self.propose(*job) for job in jobs]  # (its own sessions: NgramStates)

    def check_verify(self, length: int, num_draft: int, params: SamplingParams,
                     draft_distributions: Sequence[Distribution]) -> None:
        raise InvalidArgument(DRAFTS_ONLY)

    def verify_batch(self, jobs: Sequence[VerifyJob]) -> list[Verdict]:
        raise InvalidArgument(DRAFTS_ONLY)  # (never reached: ``check_verify`` refuses every Verify)


DRAFTS_ONLY = "an n-gram worker drafts only; verify on a target"
