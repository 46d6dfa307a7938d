"""The cache budget in bytes: the formula against shapes computed by hand, sizes as flags take
them, the store's admission, refusal and release, the default budget's rule, the replica choice
that prefers room, and the README's sessions table (the formula's, not copied)."""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import AsyncMock, MagicMock

import pytest

from specdec_core.cache_bytes import (
    TYPICAL_PROMPT_TOKENS,
    CacheShape,
    IndexCost,
    capacity_for,
    typical_session_bytes,
)
from specdec_core.decoder_state import CHUNK
from specdec_core.errors import ResourceExhausted
from specdec_core.host_limits import HostLimits
from specdec_core.limits import add_limit_arguments, limits_from_args
from specdec_core.machine_memory import MachineBudget, machine_budget, margin_for
from specdec_core.session_store import Session, SessionStore
from specdec_core.sizes import GIB, KIB, MIB, format_bytes, parse_size

REPO = Path(__file__).resolve().parents[2]

# Decoder layers, heads, d_kv of the table (self and cross attention live in the decoder).
SHAPES = {"t5-small": (6, 8, 64), "t5-large": (24, 16, 64), "t5-3b": (24, 32, 128), "t5-11b": (24, 128, 128)}


@pytest.mark.parametrize("name, bf16", [("t5-small", 12 * KIB), ("t5-large", 96 * KIB), ("t5-3b", 384 * KIB),
                                        ("t5-11b", 1536 * KIB)])
def test_bytes_per_position_of_the_t5_shapes(name: str, bf16: int) -> None:
    layers, heads, d_kv = SHAPES[name]
    assert CacheShape(layers, heads, d_kv, element_bytes=2).bytes_per_position == bf16
    assert CacheShape(layers, heads, d_kv, element_bytes=4).bytes_per_position == 2 * bf16
    # From a model's config and dtype name, as a worker builds it.
    args = SimpleNamespace(num_decoder_layers=layers, num_heads=heads, d_kv=d_kv, num_layers=99)
    assert CacheShape.of_model(args, "bfloat16").bytes_per_position == bf16
    assert CacheShape.of_model(args, "float32").bytes_per_position == 2 * bf16


def test_a_t5_11b_session_with_a_512_token_prompt() -> None:
    shape = CacheShape(24, 128, 128, element_bytes=2)
    assert shape.session_bytes(512, 0) == 768 * MIB  # the cross-attention alone
    assert shape.session_bytes(512, 256) == 1152 * MIB  # and 256 decoder positions: 1.125 GiB
    assert typical_session_bytes(shape) == shape.session_bytes(TYPICAL_PROMPT_TOKENS, CHUNK)  # (512, 256)


def test_quantized_positions_add_a_scale_and_a_bias_per_group() -> None:
    # T5-11B's heads of 128 in groups of 64: 128 values of 1 byte (8-bit) or half a byte (4-bit),
    # plus 2 groups x (scale + bias) x 2 bytes (bfloat16) = 8 bytes per head, keys and values.
    assert CacheShape(24, 128, 128, 2, kv_bits=8, group_size=64).bytes_per_position == 2 * 24 * 128 * (128 + 8)
    assert CacheShape(24, 128, 128, 2, kv_bits=4, group_size=64).bytes_per_position == 2 * 24 * 128 * (64 + 8)
    # A head narrower than its group is padded to it: 16 values stored as 32, one float32 scale and bias.
    assert CacheShape(6, 8, 16, 4, kv_bits=8, group_size=32).bytes_per_position == 2 * 6 * 8 * (32 + 8)


def test_capacity_is_whole_chunks() -> None:
    assert [capacity_for(n) for n in (1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1)] == [CHUNK, CHUNK, 2 * CHUNK,
                                                                                          2 * CHUNK, 3 * CHUNK]


def test_an_ngram_session_costs_its_index_not_k_and_v() -> None:
    cost = IndexCost()
    assert 16 <= cost.bytes_per_position <= 64  # an int32 index and a token list, no K/V
    assert cost.session_bytes(100, 256) == 356 * cost.bytes_per_position


# -- sizes as the flag takes them -------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("6GiB", 6 * GIB), ("512MiB", 512 * MIB), ("1.5GB", 1_500_000_000),
                                         ("123456", 123456), ("6g", 6 * GIB), ("64 kib", 64 * KIB), ("2TB", 2 * 10**12),
                                         (".5GiB", GIB // 2), ("100B", 100)])
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "6 GiBs", "-1GiB", "1e3", "GiB", "6GiB!", "nan"])
def test_garbage_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size: give bytes or a number with a unit, e.g. 6GiB"):
        parse_size(text)


def test_the_flag_takes_a_size_and_refuses_garbage_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="specdec-target")
    add_limit_arguments(parser, HostLimits)
    assert limits_from_args(HostLimits, parser.parse_args(["--cache-memory", "6GiB"])).cache_memory_bytes == 6 * GIB
    assert limits_from_args(HostLimits, parser.parse_args([])).cache_memory_bytes == 0  # the machine's
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache-memory", "lots"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--cache-memory" in error and "'lots' is not a size" in error


def test_bytes_read_as_people_write_them() -> None:
    assert [format_bytes(n) for n in (512, 96 * KIB, 768 * MIB, 6 * GIB)] == [
        "512 B", "96.0 KiB", "768.0 MiB", "6.00 GiB"]


# -- the store's budget in bytes ---------------------------------------------------------------------


class Positions:
    """A session's cache as the store sees it: its prompt and its decoder capacity."""

    def __init__(self, prompt: int, capacity: int = 0):
        self.encoder_length, self.capacity, self.length = prompt, capacity, 0


def session(prompt: int, capacity: int = 0) -> SimpleNamespace:
    return SimpleNamespace(cache=Positions(prompt, capacity), cached_tokens=0)


SHAPE = CacheShape(layers=2, heads=4, d_kv=8, element_bytes=2)  # 2 x 2 x 4 x 8 x 2 = 256 bytes a position


def test_a_session_reserves_its_prompt_and_first_chunk_and_is_refused_past_the_budget() -> None:
    assert SHAPE.bytes_per_position == 256
    store = SessionStore(max_sessions=10, cache_memory_bytes=3 * 512 * 256, ttl_s=60, cost=SHAPE)
    assert store.reserve(256) == 512 * 256  # 256 prompt tokens + the first chunk of 256
    store.add(session(256))  # (the state a finished open hands over, then its reservation ends)
    store.release(512 * 256)
    assert store.bytes_used == 512 * 256 and store.bytes_free == 2 * 512 * 256
    store.reserve(256)
    assert store.bytes_used == 2 * 512 * 256  # a session being opened counts
    with pytest.raises(ResourceExhausted) as refused:
        store.reserve(257)
    # One more would need 513 x 256 bytes, with 512 x 256 free: named in human units.
    assert str(refused.value).startswith(
        "cache budget reached: a session of 257 prompt tokens needs 128.2 KiB, 128.0 KiB free of 384.0 KiB "
        "(--cache-memory)")
    assert store.bytes_used == 2 * 512 * 256  # a refusal holds nothing
    store.reserve(256)  # exactly the rest fits
    assert store.bytes_free == 0 and store.typical_sessions_free() == 0


def test_growth_is_checked_per_chunk_and_a_close_gives_the_bytes_back() -> None:
    store = SessionStore(max_sessions=10, cache_memory_bytes=1100 * 256, ttl_s=60, cost=SHAPE)
    first = store.add(session(100, capacity=256))  # 356 positions
    second = store.add(session(100))  # its first chunk counted before its first step allocates it
    assert store.bytes_used == 2 * 356 * 256
    store.check_growth(first, 256)  # within its chunk: nothing more
    with pytest.raises(ResourceExhausted, match=r"growing session .* from 256 to 768 decoder positions needs "
                                                r"128.0 KiB, 97.0 KiB free of 275.0 KiB"):
        store.check_growth(first, 600)  # two more chunks: 128 KiB
    store.check_growth(first, 300)  # one more chunk (64 KiB) fits
    store.pop(second.id)
    assert store.bytes_used == 356 * 256
    store.check_growth(first, 600)  # after the close, two more chunks fit
    assert isinstance(first, Session)


def test_typical_sessions_free_counts_bytes_and_the_session_limit() -> None:
    typical = typical_session_bytes(SHAPE)
    assert typical == (TYPICAL_PROMPT_TOKENS + CHUNK) * SHAPE.bytes_per_position  # a typical prompt, one chunk
    store = SessionStore(max_sessions=3, cache_memory_bytes=5 * typical + 100, ttl_s=60, cost=SHAPE)
    assert store.typical_sessions_free() == 3  # the session limit, not the 5 the bytes allow
    store.add(session(512, 256))
    assert store.typical_sessions_free() == 2
    store = SessionStore(max_sessions=64, cache_memory_bytes=5 * typical + 100, ttl_s=60, cost=SHAPE)
    store.add(session(512, 512))  # a longer one: 1024 positions
    assert store.typical_sessions_free() == (5 * typical + 100 - 1024 * 256) // typical == 3


# -- the default budget ---------------------------------------------------------------------------------


def test_the_default_budget_is_physical_less_the_process_less_the_margin() -> None:
    assert margin_for(8 * GIB) == 2 * GIB and margin_for(32 * GIB) == int(0.2 * 32 * GIB)
    assert MachineBudget(32 * GIB, 12 * GIB, margin_for(32 * GIB)).bytes == 32 * GIB - 12 * GIB - int(6.4 * GIB)
    # Ranks sharing the machine split what is left, each as big as this one.
    assert MachineBudget(32 * GIB, 4 * GIB, 2 * GIB, ranks=2).bytes == (32 - 8 - 2) * GIB // 2
    here = machine_budget()
    assert 0 < here.in_use < here.physical and here.margin >= 2 * GIB
    assert machine_budget(weight_bytes=here.physical).in_use == here.physical  # weights not yet resident count


# -- the replica choice -------------------------------------------------------------------------------


def pool_of_targets(free: dict[str, int]):
    from orchestrator.replicas import Load, ReplicaPool

    def channel(address: str) -> MagicMock:
        made = MagicMock()
        made.close = AsyncMock()
        return made

    pool = ReplicaPool([], list(free), channel_factory=channel)
    for replica in pool.replicas:
        replica.healthy = True
        typical = free[replica.address]
        if typical >= 0:  # -1: no Info read yet
            replica.load = Load(live_sessions=0, cache_bytes_used=0, cache_memory_bytes=GIB,
                                typical_sessions_free=typical, steps=0, at=0.0)
    return pool


def test_the_replica_choice_ranks_replicas_without_room_last() -> None:
    pool = pool_of_targets({"full:1": 0, "roomy:1": 3})
    chosen = [pool.acquire("target", set()).address for _ in range(3)]
    assert chosen == ["roomy:1"] * 3  # though it grows busier than the full one
    assert pool.acquire("target", {"roomy:1"}).address == "full:1"  # not skipped: the last resort
    pool = pool_of_targets({"a:1": 2, "b:1": 5, "c:1": -1})
    chosen = [pool.acquire("target", set()).address for _ in range(3)]
    assert sorted(chosen) == ["a:1", "b:1", "c:1"]  # all with room (or unknown): least-loaded, as before
    asyncio.run(pool.close())


def test_the_status_reports_bytes_and_typical_sessions() -> None:
    pool = pool_of_targets({"t:1": 4})
    pool.replicas[0].load.cache_bytes_used = 3 * MIB
    (status,) = pool.status()
    assert (status.cache_bytes_used, status.cache_memory_bytes, status.typical_sessions_free) == (3 * MIB, GIB, 4)
    asyncio.run(pool.close())


# -- the README --------------------------------------------------------------------------------------


def test_the_readme_sessions_table_is_the_formulas() -> None:
    from specdec_tools.sessions_table import sessions_table

    readme = (REPO / "README.md").read_text()
    table = sessions_table()
    assert table in readme
    # Spot check against the arithmetic: an 11B session of 512 + 256 positions in bfloat16 is
    # 1.125 GiB, and a 32 GB Mac holds 32 - 12.2 (8-bit weights) - 6.4 (margin) GiB = 11 of them.
    row = next(line for line in table.splitlines() if line.startswith("| T5-11B"))
    assert re.search(r"\| 1\.12 GiB / [^|]+ \| 0 / [^|]+ \| 11 / ", row)
