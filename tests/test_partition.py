"""Partition planning, shared by every engine."""

from __future__ import annotations

import pandas as pd

from fruitdask.partition import plan, plan_packed_partitions, plan_partitions, plan_shards


def test_plan_partitions():
    assert plan_partitions(0, 10, 2) == []
    parts = plan_partitions(10_000, 1000, 2)
    assert len(parts) == 10 and parts[0] == (0, 1000) and parts[-1] == (9000, 10_000)
    small = plan_partitions(100, 1000, 2)
    assert len(small) == 4  # two per thread, so both cores work
    assert sum(b - a for a, b in small) == 100
    odd = plan_partitions(5000, 1000, 2)
    assert len(odd) % 2 == 0  # whole waves: no core idles through the last partition


def test_packed_partitions_follow_row_groups():
    listing = pd.DataFrame(
        {
            "shard": ["a"] * 6 + ["b"] * 4,
            "row_group": [0, 0, 1, 1, 2, 2, 0, 0, 1, 1],
        }
    )
    ranges = plan_packed_partitions(listing, 4)
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    assert plan(listing, 4, 8) == ranges  # packed: row groups decide, not threads
    for a, b in ranges:  # no row group is split between two partitions
        keys = set(zip(listing["shard"][a:b], listing["row_group"][a:b], strict=True))
        others = set(zip(listing["shard"].drop(range(a, b)), listing["row_group"].drop(range(a, b)),
                         strict=True))  # fmt: skip
        assert not keys & others


def test_plan_shards():
    assert plan_shards(0, 10, 2) == []
    shards = plan_shards(12_000, 5000, 2)
    assert len(shards) == 3 and shards[-1][1] == 12_000
    assert len(plan_shards(10, 5000, 4)) == 4  # at least one per thread
