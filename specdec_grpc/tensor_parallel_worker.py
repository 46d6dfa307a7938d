"""A tensor-parallel target's processes: joining (or starting) the ring, rank 0's mirrored host,
the followers that replay its passes, and rank 0's watch that turns a broken group into
NOT_SERVING (docs/architecture.md, "Tensor-parallel target")."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from specdec_core import blas
from specdec_core.engine import ModelEngine
from specdec_core.errors import Unavailable
from specdec_core.session_host import SessionHost
from specdec_core.tokenizer import load_tokenizer, tokenizer_fingerprint

if TYPE_CHECKING:
    from specdec_grpc.server import RunningServer
    from specdec_grpc.worker import WorkerConfig

logger = logging.getLogger(__name__)

# A tensor-parallel rank 0 with no pass for this long pings its peers (a dead one is noticed
# while idle), and gives them this long to answer.
IDLE_PING_S = 1.0
PING_TIMEOUT_S = 10.0


def follower_argv(argv: list[str]) -> list[str]:
    """Rank 0's flags for the followers it starts, without ``--auth-token``: they serve no RPC,
    and a command line shows in ``ps`` to every user of the host."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--auth-token":
            skip = True  # and its value
        elif not arg.startswith("--auth-token="):
            kept.append(arg)
    return kept


class TensorParallel:
    """A target split over the ranks of a ring (``specdec_core.rank_mirror``): rank 0 serves with
    a ``MirroredEngine``, every other rank follows it and serves nothing."""

    def __init__(self, group: Any, followers: list[subprocess.Popen[bytes]]):
        self.group = group
        self.followers = followers  # the ranks this process started (none under mlx.launch)
        self.mirror: Any = None

    @classmethod
    def join(cls, config: WorkerConfig, argv: list[str]) -> TensorParallel | None:
        """Join (or start, with --tensor-parallel N > 1) the ring; None for one process."""
        from specdec_core import rank_mirror

        wanted = config.tensor_parallel
        if wanted is not None and wanted < 1:
            raise SystemExit(f"--tensor-parallel must be >= 1, got {wanted}")
        if config.role != "target" or not (rank_mirror.launched() or (wanted or 1) > 1):
            return None
        if config.quantize or config.method != "model":
            raise SystemExit("a tensor-parallel target loads the float checkpoint: leave out --quantize")
        followers = []
        if not rank_mirror.launched():
            followers = rank_mirror.launch_local_followers(
                wanted or 1, [sys.executable, "-m", f"{config.role}_service.server", *follower_argv(argv)])
        try:
            group = rank_mirror.join()
        except Exception:
            for follower in followers:
                follower.kill()
            raise
        if wanted is not None and wanted != group.size():
            raise SystemExit(f"--tensor-parallel {wanted} but this process was launched in a group of "
                             f"{group.size()} ranks")
        return cls(group, followers)

    def build_host(self, config: WorkerConfig) -> SessionHost:
        """Rank 0's host: this rank's shard behind a MirroredEngine."""
        from specdec_core.rank_mirror import MirroredEngine, RankLink, RankMirror
        from specdec_core.tensor_parallel import load_sharded, weight_nbytes

        loaded = load_sharded(config.model, self.group, config.dtype)
        self.mirror = RankMirror(RankLink(self.group))
        engine = MirroredEngine(loaded, self.mirror, max_draft=config.limits.max_draft, kv_bits=config.kv_bits)
        logger.info("%s rank 0 of %d loaded its shard of %s (%s, %.1f MB of weights); BLAS: %s", config.role,
                    self.group.size(), config.model, loaded.dtype, weight_nbytes(loaded.model) / 1e6,
                    blas.active_blas)
        # Ranks this process started share its machine (and the default cache budget); under
        # mlx.launch each rank sizes its own machine's.
        return SessionHost(engine, config.limits, config.role, tokenizer_fingerprint(load_tokenizer(loaded.path)),
                           ranks_on_machine=1 + len(self.followers))

    def follow(self, config: WorkerConfig) -> None:
        """A follower rank: load the shard, replay rank 0's passes until the group closes, exit."""
        from specdec_core.rank_mirror import RankLink, follow
        from specdec_core.tensor_parallel import load_sharded

        rank = self.group.rank()
        # Rank 0 drains on SIGTERM/SIGINT and needs its followers until it is done; a follower
        # ends when rank 0 is gone (its ring link closes).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = 0
        try:
            engine = ModelEngine(load_sharded(config.model, self.group, config.dtype),
                                 max_draft=config.limits.max_draft, kv_bits=config.kv_bits)
            logger.info("%s rank %d of %d follows rank 0", config.role, rank, self.group.size())
            logger.info("%s rank %d: %s; exiting", config.role, rank, follow(engine, RankLink(self.group)))
        except Exception:
            logger.exception("%s rank %d failed; exiting (rank 0 will report NOT_SERVING)", config.role, rank)
            code = 1
        logging.shutdown()
        os._exit(code)  # no interpreter teardown: MLX's ring threads may still hold a dead socket

    def watch(self, running: RunningServer, host: SessionHost) -> asyncio.Task[None]:
        """Report NOT_SERVING, for good, once the group breaks (a follower this process started
        exited, or a broadcast or pass failed); the watchdog cannot clear it."""
        mirror = self.mirror

        async def on_wedged(wedged: bool) -> None:
            await running.set_wedged(wedged or mirror.broken is not None)

        host.on_wedged = on_wedged

        async def watch() -> None:
            heard, quiet_since = mirror.messages, time.monotonic()
            while mirror.broken is None:
                for rank, follower in enumerate(self.followers, start=1):
                    if follower.poll() is not None:
                        mirror.fail(f"rank {rank} (pid {follower.pid}) exited with code {follower.returncode}")
                # Ranks mlx.launch started are no children of this process: while no pass tells,
                # an empty broadcast now and then does (a dead peer fails it, or it hangs).
                if mirror.messages != heard:
                    heard, quiet_since = mirror.messages, time.monotonic()
                elif time.monotonic() - quiet_since >= IDLE_PING_S and host.idle and mirror.broken is None:
                    await self._ping(host)
                    heard, quiet_since = mirror.messages, time.monotonic()
                await asyncio.sleep(0.1)
            await running.set_wedged(True)
            # A pass in flight may block in a collective with the dead rank for good: answer its
            # steps now, so the orchestrator fails over at once instead of at its call timeout.
            host.abort_steps(Unavailable(f"the tensor-parallel target broke ({mirror.broken}); use another "
                                         "replica"))

        return asyncio.get_running_loop().create_task(watch())

    async def _ping(self, host: SessionHost) -> None:
        """One empty broadcast on the model thread; a failure or no answer breaks the group."""
        try:
            await asyncio.wait_for(host.run_on_model_thread(host.engine.ping), PING_TIMEOUT_S)
        except TimeoutError:
            self.mirror.fail(f"the other ranks did not answer a ping within {PING_TIMEOUT_S:g} s")
        except Exception:  # noqa: BLE001 - the broadcast failed: the mirror is marked broken already
            pass

    def stop_followers(self) -> None:
        """After rank 0 stopped serving: its followers have nothing left to do."""
        for follower in self.followers:
            if follower.poll() is None:
                follower.kill()
            follower.wait()
