"""The failed closes a pool keeps per replica to ask again (``UnfinishedCloses``): oldest first,
bounded, the oldest given up (and counted) past the bound."""

from __future__ import annotations

from orchestrator.unfinished_closes import UnfinishedCloses


def test_kept_oldest_first_and_bounded_by_giving_up_the_oldest() -> None:
    closes = UnfinishedCloses(capacity=3)
    assert [closes.add(s) for s in ("a", "b", "c")] == [0, 0, 0]
    assert closes.oldest(2) == ["a", "b"] and closes.oldest(10) == ["a", "b", "c"]
    assert closes.add("d") == 1  # "a" given up
    assert closes.oldest(10) == ["b", "c", "d"] and "a" not in closes
    assert closes.add("b") == 0  # asked again and failed: to the back, not kept twice
    assert closes.oldest(10) == ["c", "d", "b"] and len(closes) == 3
    closes.discard("d")
    closes.discard("never kept")
    assert closes.oldest(10) == ["c", "b"]
