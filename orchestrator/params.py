"""A request's parameters as the loop takes them, the stats it reports, and what each step emits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from specdec_core.errors import InvalidArgument
from specdec_core.steps import Proposal, SamplingParams, Verdict

if TYPE_CHECKING:
    from .estimates import StepRecord


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    num_draft: int
    num_draft_auto: bool = False
    max_num_draft: int = 16  # ceiling of the auto schedule
    sampling: SamplingParams = SamplingParams()
    delta: float = 0.0
    seed: int = 0
    speculative: bool = True
    seeded: bool = False  # the caller gave the seed: a random output must be reproducible from it
    pipeline: bool = True  # draft the next block while the target verifies this one

    @property
    def timed_k(self) -> bool:
        """May num_draft=auto choose k from measured times? Not when the output is random and
        the caller gave the seed: k decides which positions are drafts (planner.py)."""
        random_output = not self.sampling.greedy or self.delta > 0
        return not (random_output and self.seeded)

    def validate(self, max_tokens_cap: int, max_draft_cap: int) -> GenerationParams:
        if not 1 <= self.max_tokens <= max_tokens_cap:
            raise InvalidArgument(
                f"max_tokens must be in [1, {max_tokens_cap}] (max_tokens_cap), got {self.max_tokens}"
            )
        if not 1 <= self.num_draft <= max_draft_cap:
            raise InvalidArgument(
                f"num_draft must be in [1, {max_draft_cap}] (max_num_draft), got {self.num_draft}"
            )
        if not (np.isfinite(self.delta) and 0.0 <= self.delta <= 1.0):
            raise InvalidArgument(f"delta must be in [0, 1] (0 = exact), got {self.delta}")
        self.sampling.validate()
        return self


@dataclass
class Stats:
    """A request's figures, as its last event carries them. The loop adds to them in two places:
    each reply as it arrives (``count_reply``) and each step from its record (``count_step``)."""

    proposed: int = 0
    accepted: int = 0
    draft_passes: int = 0
    steps: int = 0  # one target pass each
    target_tokens: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    final_num_draft: int = 0
    seed: int = 0
    wire_bytes: int = 0
    failovers: int = 0
    draft_replica: str = ""
    target_replica: str = ""
    # [i]: draft tokens proposed / accepted at draft position i+1 (vLLM's per-position counters)
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    # [k]: steps that drafted k tokens (0: the target alone), as asked of the draft
    steps_per_num_draft: list[int] = field(default_factory=list)
    predrafts: int = 0  # blocks drafted ahead while the target verified (pipelining)
    predraft_hits: int = 0  # ... used as the next block
    wasted_draft_tokens: int = 0  # tokens drafted ahead and not used
    draft_model_s: float = 0.0  # what the workers reported as model time (the rest is wire)
    target_model_s: float = 0.0
    time_to_first_token_s: float = 0.0  # set by the caller that saw the request arrive
    # By role: step replies whose reported timing was impossible; their tokens were used, their
    # times dropped (``lanes.timing_problem``; the metric specdec_dropped_worker_reports_total).
    dropped_timings: dict[str, int] = field(default_factory=dict)

    def count_reply(self, role: str, reply: Proposal | Verdict, timing_dropped: bool) -> None:
        """One Propose or Verify reply: its bytes on the wire, a draft's passes (one per token it
        drafted, drafted ahead or not), and a timing report dropped as impossible."""
        self.wire_bytes += reply.wire_bytes
        if isinstance(reply, Proposal):
            self.draft_passes += len(reply.tokens)
        if timing_dropped:
            self.dropped_timings[role] = self.dropped_timings.get(role, 0) + 1

    def count_step(self, record: StepRecord, emitted: int, kept: int) -> None:
        """One step: ``emitted`` tokens, ``kept`` of them drafts (an accepted EOS cuts the rest off),
        and the wall and model times of its Propose and Verify (drafting ahead overlaps the Verify,
        so it is not draft time: the times add up to the total)."""
        self.steps += 1
        self.count_num_draft(record.requested)
        self.proposed += record.drafted
        self.accepted += kept
        self.count_block(record.drafted, kept)
        self.target_tokens += int(emitted > kept)
        self.draft_s += record.propose_s
        self.verify_s += record.verify_s
        self.draft_model_s += record.propose_model_s
        self.target_model_s += record.verify_model_s

    @property
    def target_passes(self) -> int:
        return self.steps  # every step is one target pass (its Verify)

    @property
    def tokens(self) -> int:
        return self.accepted + self.target_tokens  # kept drafts plus the target's own token per step

    def count_block(self, proposed: int, accepted: int) -> None:
        """Per-position counts of one step: positions 1..proposed drafted, 1..accepted kept."""
        while len(self.proposed_per_position) < proposed:
            self.proposed_per_position.append(0)
            self.accepted_per_position.append(0)
        for i in range(proposed):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += int(i < accepted)

    def count_num_draft(self, k: int) -> None:
        while len(self.steps_per_num_draft) <= k:
            self.steps_per_num_draft.append(0)
        self.steps_per_num_draft[k] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def orchestration_s(self) -> float:
        return max(0.0, self.total_s - self.draft_s - self.verify_s)


@dataclass
class StepEvent:
    tokens: list[int]  # emitted this step (EOS excluded)
    finish_reason: str | None = None  # "eos" or "length" on the last event
    from_draft: list[bool] = field(default_factory=list)  # per token: an accepted draft token?


def new_request_id() -> str:
    """A short id that every log line about one request carries, in all three processes."""
    return secrets.token_hex(4)
