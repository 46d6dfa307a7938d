"""What the benchmark measures: the systems, the cells (temperature, system, k) every prompt
runs in, the settings that pick them, and the record of one generation."""

from __future__ import annotations

from dataclasses import dataclass, field

SYSTEMS = {
    "services-target": "(a) target alone, services",
    "services-spec": "(b) speculative, services (pipelined drafting)",
    "services-serial": "(b') speculative, services, drafting only after each verdict",
    "services-unary": "(b'') speculative, services, a unary call per step instead of a stream per session",
    "inproc-target": "target alone, in-process",
    "inproc-spec": "(c) speculative, in-process",
    "hf-target": "(e) transformers target alone",
    "hf-assisted": "(d) transformers assisted",
}
BASELINE_OF = {"services-spec": "services-target", "services-serial": "services-target",
               "services-unary": "services-target", "inproc-spec": "inproc-target", "hf-assisted": "hf-target"}


@dataclass
class Run:
    """One generation of one prompt by one system."""

    prompt: int
    wall_s: float
    tokens: int  # generated tokens, EOS counted
    token_ids: list[int]  # EOS excluded
    steps: int = 0  # target passes that produced tokens (one per speculative step)
    target_passes: int = 0
    draft_passes: int = 0
    proposed: int | None = None
    accepted: int | None = None
    draft_s: float = 0.0
    verify_s: float = 0.0
    loop_s: float = 0.0  # the orchestrator's own time for the loop (stats.total)
    wire_bytes: int = 0
    cpu_s: float | None = None  # CPU time of every process involved (this one and the services)
    predrafts: int = 0  # blocks drafted ahead while the target verified (pipelining)
    predraft_hits: int = 0  # ... used as the next block
    wasted_draft_tokens: int = 0
    steps_per_k: list[int] = field(default_factory=list)  # [k]: steps that drafted k (the k chosen)


@dataclass(frozen=True)
class Cell:
    """One system at one temperature and k: every prompt runs in it once per repeat."""

    temperature: float
    system: str
    k: str | None  # "1".."8" or "auto"; None for the target alone

    @property
    def label(self) -> str:
        return f"T={self.temperature:g} {self.system}" + (f" k={self.k}" if self.k else "")


@dataclass
class Settings:
    """What the command line chose: the grid of cells, how many prompts and repeats, thread caps, dtype."""

    ks: list[str]
    temperatures: list[float]
    prompts: int
    repeats: int
    max_tokens: int | None
    threads: int
    dtype: str | None
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))  # --systems: which to run


def cells_for(settings: Settings, systems: set[str] | None = None) -> list[Cell]:
    """Every cell the settings ask for: the speculative systems at each k, the baselines once
    (only ``systems``, when given: those that could run)."""
    cells = []
    for temperature in settings.temperatures:
        for system in SYSTEMS:
            if system not in settings.systems or (systems is not None and system not in systems):
                continue
            for k in (settings.ks if system in BASELINE_OF else [None]):
                cells.append(Cell(temperature, system, k))
    return cells


def seed(repeat: int, prompt: int) -> int:
    """The sampling seed of one (repeat, prompt), the same for every system."""
    return 1 + 1000 * (repeat + 1) + prompt  # repeat -1 is the warm-up
