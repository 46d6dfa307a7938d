"""A tensor-parallel worker: rank 0 serves, every other rank mirrors its model work.

Each rank holds its shard of the model (``tensor_parallel.load_sharded``), and a sharded
forward pass needs every rank to run the same pass at the same time (its ``all_sum``s pair
up across ranks). Rank 0 is an ordinary worker (``SessionHost``, gRPC) whose engine is a
``MirroredEngine``: before each operation that touches the model it broadcasts a small
message saying what to run, then runs it. The followers (``follow``) replay the messages in
order on their own sessions, so every rank runs the identical sequence of passes with the
identical shapes.

Only two engine operations touch the model, so only they are mirrored:

- ``start`` (open a session): ``Open(id, prompt ids)``; the follower encodes the same prompt.
- ``forward_batch`` (every Verify or Propose pass, batched or alone, retries included):
  ``Forward`` with, per session, its id, its cache length on rank 0 and the tokens past it.
  The follower rolls its cache back to that length and feeds the same tokens, so both
  caches hold the same positions after the pass. The tokens a pass feeds are all a follower
  needs: rollback, appends, restores after a failed or cancelled step all happen on rank 0
  between passes, and what they leave is exactly (cache length, pending tokens).

Sampling, acceptance inputs and every check run on rank 0 only (they need no model pass).
Closing needs no hook either: when rank 0 drops a session's state (close, expiry, a failed
open) its finalizer queues the id, and the next message tells the followers to drop theirs.

Transport: two ``all_sum``s on the model's own group, on rank 0's model thread (so they are
ordered with the passes): a fixed-size header (the payload's length) and the payload (JSON
as uint8). Rank 0 contributes the data, followers zeros. A collective with a dead peer
raises (the ring backend: "connection to a peer was lost"); rank 0 then marks the mirror
``broken``: every later operation is UNAVAILABLE and the worker reports NOT_SERVING.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from .cache_bytes import CacheShape
from .checkpoint import LoadedModel
from .decoder_state import DecoderState
from .engine import ModelEngine
from .errors import Unavailable

logger = logging.getLogger(__name__)

OPEN, FORWARD, IDLE = "open", "forward", "idle"
Result = TypeVar("Result")


@dataclass
class MirroredState(DecoderState):
    """A session's decoder state on rank 0, with the id the followers know it by."""

    mirror_id: int = 0


class RankLink:
    """Rank 0 -> all followers, as collectives on ``group`` (every rank calls ``exchange``)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()

    def exchange(self, message: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0 sends ``message``; a follower blocks until the next one arrives and returns it."""
        payload = json.dumps(message, separators=(",", ":")).encode() if self.rank == 0 else b""
        header = mx.array([len(payload)], dtype=mx.int32)
        length = int(mx.distributed.all_sum(header if self.rank == 0 else header * 0, group=self.group).item())
        data = mx.array(np.frombuffer(payload, dtype=np.uint8)) if self.rank == 0 else mx.zeros((length,), mx.uint8)
        received = mx.distributed.all_sum(data, group=self.group)
        mx.eval(received)
        return message if message is not None else json.loads(bytes(np.array(received, copy=False)))


class RankMirror:
    """Rank 0's side: numbers sessions, queues closes, sends messages, remembers a failure."""

    def __init__(self, link: RankLink):
        self.link = link
        self.size = link.group.size()
        self.broken: str | None = None  # why the group can no longer run a pass (None: healthy)
        self.messages = 0
        self._next_id = 0
        self._closed: list[int] = []  # dropped on rank 0 since the last message
        self._lock = threading.Lock()  # finalizers run on any thread

    def new_id(self, state: DecoderState) -> int:
        with self._lock:
            self._next_id += 1
            mirror_id = self._next_id
        weakref.finalize(state, self._dropped, mirror_id)
        return mirror_id

    def _dropped(self, mirror_id: int) -> None:
        with self._lock:
            self._closed.append(mirror_id)

    def send(self, kind: str, **fields: Any) -> None:
        """Broadcast one operation to the followers (on the model thread, before running it)."""
        self.check()
        with self._lock:
            closed, self._closed = self._closed, []
        try:
            self.link.exchange({"kind": kind, "closed": closed, **fields})
        except Exception as error:  # noqa: BLE001 - a dead peer; the group is unusable from now on
            self.fail(f"broadcasting a {kind} to the other ranks failed: {error}")
            raise self.unavailable() from error
        self.messages += 1

    def fail(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            logger.error("tensor-parallel group of %d ranks is broken: %s; NOT_SERVING from now on", self.size, why)

    def check(self) -> None:
        if self.broken is not None:
            raise self.unavailable()

    def unavailable(self) -> Unavailable:
        return Unavailable(f"this target's tensor-parallel group ({self.size} ranks) is broken ({self.broken}); "
                           "use another replica")


class MirroredEngine(ModelEngine):
    """Rank 0's engine: every model operation is broadcast to the followers, then run."""

    def __init__(self, loaded: LoadedModel, mirror: RankMirror, max_draft: int = 64, kv_bits: int | None = None):
        super().__init__(loaded, max_draft, kv_bits)
        self.mirror = mirror
        self.tensor_parallel = mirror.size

    @property
    def cache_cost(self) -> CacheShape:
        """Rank 0's share of a session's cache: its heads only (every rank holds as much)."""
        shape = super().cache_cost
        return replace(shape, heads=shape.heads // self.tensor_parallel)

    def start(self, prompt_ids: list[int]) -> DecoderState:
        state = MirroredState(tokens=[], cache=None)
        mirror_id = self.mirror.new_id(state)
        self.mirror.send(OPEN, id=mirror_id, prompt=list(prompt_ids))
        started = self._guarded(lambda: super(MirroredEngine, self).start(prompt_ids))
        state.tokens, state.cache = started.tokens, started.cache
        state.mirror_id = mirror_id
        return state

    def start_batch(self, prompts: Sequence[list[int]]) -> list[DecoderState]:
        """One mirrored open at a time (each its own message and encoder pass on every rank)."""
        return [self.start(prompt) for prompt in prompts]

    def forward_batch(self, states: Sequence[DecoderState], num_logits: Sequence[int]) -> list[np.ndarray]:
        steps = []
        for state, wanted in zip(states, num_logits, strict=True):
            if not isinstance(state, MirroredState):
                raise TypeError("a tensor-parallel engine runs only the sessions it started")
            cached = state.cache.length
            steps.append([state.mirror_id, cached, state.tokens[cached:], int(wanted)])
        self.mirror.send(FORWARD, steps=steps)
        return self._guarded(lambda: super(MirroredEngine, self).forward_batch(states, num_logits))

    def _guarded(self, run: Callable[[], Result]) -> Result:
        """Run a pass the followers were told about; a failure here leaves them out of step."""
        try:
            return run()
        except Exception as error:  # noqa: BLE001 - the ranks are out of step: the group is unusable
            self.mirror.fail(f"a pass failed on rank 0: {error}")
            raise self.mirror.unavailable() from error

    def ping(self) -> None:
        """An empty message: delivers queued closes and proves the followers answer."""
        self.mirror.send(IDLE)


def follow(engine: ModelEngine, link: RankLink, on_message: Callable[[dict[str, Any]], None] | None = None) -> str:
    """A follower's life: replay rank 0's operations on this rank's shard until the group breaks.

    Returns why it ended (rank 0 went away: the normal end). ``engine`` is a plain
    ``ModelEngine`` over this rank's shard.
    """
    states: dict[int, DecoderState] = {}
    while True:
        try:
            message = link.exchange()
        except Exception as error:  # noqa: BLE001 - rank 0 (or another rank) is gone
            return f"the group was closed ({error})"
        for mirror_id in message["closed"]:
            states.pop(mirror_id, None)
        kind = message["kind"]
        if kind == OPEN:
            states[message["id"]] = engine.start(message["prompt"])
        elif kind == FORWARD:
            batch = []
            for mirror_id, cached, pending, _ in message["steps"]:
                state = states[mirror_id]
                if state.cache.length < cached:
                    raise RuntimeError(f"session {mirror_id}: rank 0 has {cached} cached positions, "
                                       f"this rank {state.cache.length}: the ranks are out of step")
                if state.cache.length > cached:
                    state.cache.rollback_to(cached)
                state.tokens[cached:] = pending
                batch.append(state)
            engine.forward_batch(batch, [step[3] for step in message["steps"]])
        if on_message is not None:
            on_message(message)


# -- joining the group ---------------------------------------------------------------------------


def launched() -> bool:
    """True in a process ``mlx.launch`` (or ``launch_local_followers``) started as one rank."""
    return "MLX_RANK" in os.environ and bool(os.environ.get("MLX_HOSTFILE"))


def adjacent_free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A port p with p .. p + count - 1 free now (the ring gives rank r port p + r)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind((host, 0))
            port = first.getsockname()[1]
        if port + count > 65535:
            continue
        try:
            for offset in range(count):
                with socket.socket() as other:
                    other.bind((host, port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {count} adjacent free ports on {host}")


def launch_local_followers(size: int, command: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1 .. size-1 of a ring on loopback, each running ``command``; make this
    process rank 0 (``join`` then joins it). What ``mlx.launch --backend ring -n size`` does,
    except that rank 0 is this process, so it can watch its followers' pids.

    The followers share this process's output and process group (``scripts/down`` stops the
    group) and exit by themselves once rank 0 is gone.
    """
    port = adjacent_free_ports(size)
    hostfile = tempfile.NamedTemporaryFile("w", prefix="specdec-ring-", suffix=".json", delete=False)
    with hostfile:
        json.dump([[f"127.0.0.1:{port + rank}"] for rank in range(size)], hostfile)
    followers = [
        subprocess.Popen(list(command), stdin=subprocess.DEVNULL,
                         env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": hostfile.name})
        for rank in range(1, size)
    ]
    os.environ["MLX_RANK"], os.environ["MLX_HOSTFILE"] = "0", hostfile.name
    logger.info("started %d follower rank(s) (pids %s) on a loopback ring at ports %d-%d", size - 1,
                ", ".join(str(p.pid) for p in followers), port, port + size - 1)
    return followers


def join() -> mx.distributed.Group:
    """This process's ring group (strict: an error, not a group of one, if it cannot start)."""
    group = mx.distributed.init(strict=True, backend="ring")
    logger.info("joined the ring as rank %d of %d", group.rank(), group.size())
    return group
