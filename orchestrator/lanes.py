"""One role's session for a request (``Lane``): which replica holds it, what it holds of the
committed tokens, and the request each call sends; plus the checks on a replica's reply."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from specdec_core.sampling import token_probability
from specdec_core.steps import Distribution, Proposal, SamplingParams, StepRequest, Verdict

from .backend_protocol import Backend, ReplicaError, ReplicaFailure


@dataclass
class Lane:
    """One role's session for this request: which replica holds it and what it holds.

    After a call the session holds every committed token (``decoded``, shared with the
    generation) plus the call's block (the draft's proposal, or the drafts the target scored).
    ``synced`` is derived from that, so it is never out of step with what was committed.
    """

    role: str  # "draft" or "target"
    decoded: list[int]  # the request's committed decoder tokens (the generation's own list)
    backend: Backend | None = None  # None: no session (a draft lane with no draft left)
    session_id: str = ""
    length: int = 1  # the service session's length
    failed: set[str] = field(default_factory=set)  # replicas this request gave up on
    # The replica chosen for the session being opened, until it is attached (pipelined, draft
    # and target open at once, and the draft's first k needs the target's --max-draft).
    opening: Backend | None = None
    address: str = ""  # the replica of the last session attached (kept after it closes: stats)
    _held: int = 1  # committed tokens the session held after its last call
    _block: list[int] = field(default_factory=list)  # what it holds past them

    @property
    def synced(self) -> int:
        """Leading committed tokens the session holds (those of its block that were kept)."""
        held = self._held
        for mine, committed in zip(self._block, self.decoded[self._held :], strict=False):
            if mine != committed:
                break
            held += 1
        return min(held, self.length)

    @property
    def optional(self) -> bool:
        """Can the request go on without this lane? A draft's, yes: the target finishes alone."""
        return self.role == "draft"

    def attach(self, backend: Backend, session_id: str) -> None:
        """A new session: it holds the decoder start token only."""
        self.backend, self.session_id, self.address = backend, session_id, backend.address
        self.length, self._held, self._block = 1, 1, []

    def record(self, length: int, block: list[int]) -> None:
        """The session's state after a call: all committed tokens, then ``block``."""
        self.length, self._held, self._block = length, len(self.decoded), block

    def holds(self, block: list[int]) -> bool:
        """Does the session hold every committed token followed by ``block``?"""
        if self.synced < len(self.decoded):
            return False
        start = len(self.decoded) - self._held  # where the uncommitted rest begins in its block
        return self._block[start : start + len(block)] == block

    def extend_request(self, block: list[int], num_draft: int, sampling: SamplingParams, seed: int,
                       deadline: float | None) -> StepRequest:
        """Draft on after the committed tokens and ``block`` (which the session holds: ``holds``),
        cutting whatever it holds past them."""
        upto = len(self.decoded) + len(block)
        return StepRequest(
            session_id=self.session_id,
            expected_length=self.length,
            rollback_to=upto if upto < self.length else 0,
            append_tokens=[],
            num_draft=num_draft,
            sampling=sampling,
            seed=seed,
            deadline=deadline,
        )

    @property
    def max_draft(self) -> int:
        """The largest k this lane's replica takes (its --max-draft; 0: unknown, no cap). The
        pool knows it from the replica's Info, so it holds from the moment the replica is chosen,
        while its session is still opening (pipelined, the first k is chosen then)."""
        backend = self.backend or self.opening
        return backend.max_draft if backend is not None else 0

    def request(self, block: list[int], num_draft: int, sampling: SamplingParams, seed: int,
                deadline: float | None, draft_distributions: Sequence[Distribution] = ()) -> StepRequest:
        """The next call: roll back to the synced prefix, append what the session lacks."""
        synced = self.synced
        return StepRequest(
            session_id=self.session_id,
            expected_length=self.length,
            rollback_to=synced if synced < self.length else 0,
            append_tokens=self.decoded[synced:] + block,
            num_draft=num_draft,
            sampling=sampling,
            seed=seed,
            draft_distributions=draft_distributions,
            deadline=deadline,
        )


def draft_token_probs(proposal: Proposal) -> list[float]:
    """q(d) of each draft token for acceptance, computed from the q forwarded to the target (float64,
    normalised as the target normalises it for the residual), not the float32 ``token_probs``:
    acceptance and the residual then use one q. ``token_probs`` only where no q came (greedy)."""
    distributions = list(proposal.distributions)
    if len(distributions) != len(proposal.tokens):
        return list(proposal.token_probs)
    return [token_probability(distribution.token_ids, np.asarray(distribution.probs), token)
            for distribution, token in zip(distributions, proposal.tokens, strict=True)]


def check_reply(role: str, request: StepRequest, result: Proposal | Verdict, address: str) -> None:
    """A reply must have the shape the request implies; a malformed one is the replica's fault
    (ReplicaError: fail over), never something to act on."""
    k = request.num_draft
    sampled = not request.sampling.greedy
    base = request.rollback_to or request.expected_length
    if role == "draft" and isinstance(result, Proposal):
        n = len(result.tokens)
        problems = [
            n > k and f"{n} tokens for k={k}",
            len(result.token_probs) != n and f"{len(result.token_probs)} probabilities for {n} tokens",
            sampled and len(result.distributions) != n and f"{len(result.distributions)} distributions for {n} tokens",
            result.length != base + len(request.append_tokens) + n and f"length {result.length}",
        ]
    elif role == "target" and isinstance(result, Verdict):
        problems = [
            len(result.argmax) != k + 1 and f"{len(result.argmax)} argmax for k={k}",
            sampled and len(result.draft_probs) != k and f"{len(result.draft_probs)} p(d) for k={k}",
            sampled and len(result.resampled) != k + 1 and f"{len(result.resampled)} resampled for k={k}",
            result.length != base + len(request.append_tokens) and f"length {result.length}",
        ]
    else:
        problems = [f"a {type(result).__name__} from a {role}"]
    found = [p for p in problems if p]
    if found:
        raise ReplicaError(address, ReplicaFailure.MALFORMED, "malformed reply: " + "; ".join(found))


# A worker's model time lies within the call that carried it: past the wall time the orchestrator
# measured around the call by more than this (clock granularity), the report is not believed.
MODEL_TIME_SLACK_MS = 1.0


def timing_problem(role: str, request: StepRequest, result: Proposal | Verdict, wall_s: float,
                   max_batch: int = 0, max_draft: int = 0) -> str:
    """What makes a well-formed reply's timing impossible, in words ("" if nothing): a model time
    that is not finite, negative or longer than the call (``wall_s``), a batch outside 1..the
    worker's --max-batch, or a Verify batch's rows outside what its steps can score (each 1..its
    worker's --max-draft + 1, this step's k + 1). ``max_batch``, ``max_draft``: 0 when unknown.

    The policy on such a reply: its tokens are checked apart (``check_reply``) and used; its timing
    is dropped (``drop_timing``), so it never reaches the k policy's shared costs or the stats."""
    model_ms, batch = result.model_ms, result.batch_size
    problems = [
        not (math.isfinite(model_ms) and 0 <= model_ms <= wall_s * 1e3 + MODEL_TIME_SLACK_MS)
        and f"model_ms {model_ms!r} in a call of {wall_s * 1e3:.1f} ms",
        not 1 <= batch <= (max_batch or batch) and f"batch_size {batch} (--max-batch {max_batch})",
    ]
    if isinstance(result, Verdict) and result.batch_rows and not problems[1]:
        own, others = request.num_draft + 1, batch - 1  # rows: this step's, and the others' 1 or more each
        most = own + others * (max_draft + 1) if max_draft or not others else result.batch_rows
        if not own + others <= result.batch_rows <= most:
            problems.append(f"batch_rows {result.batch_rows} for {batch} steps (k={request.num_draft}, "
                            f"--max-draft {max_draft})")
    return "; ".join(p for p in problems if p)


def drop_timing(result: Proposal | Verdict) -> None:
    """Keep a reply's tokens, forget its timing (``timing_problem``): it teaches nothing and adds
    nothing to the stats' model times."""
    result.timed, result.model_ms, result.batch_size = False, 0.0, 1
    if isinstance(result, Verdict):
        result.batch_rows = 0
