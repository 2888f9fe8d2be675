"""Planning partitions: which rows of a listing each task takes.

Pure (pandas only): shared by the Dask job, ``pack``, ``evaluate`` and the
Spark job, so every engine cuts the same listing into the same partitions.
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["plan", "plan_packed_partitions", "plan_partitions", "plan_shards"]


def plan_partitions(n_images: int, partition_size: int, threads: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges: at most ``partition_size`` images each, and at
    least two partitions per worker thread when the input is small, so every
    core works."""
    if n_images <= 0:
        return []
    threads = max(1, threads)
    n_parts = max(math.ceil(n_images / max(1, partition_size)), 2 * threads)
    # A whole number of waves: 5 partitions on 2 threads would leave one core
    # idle for the last partition's duration.
    n_parts = min(n_images, math.ceil(n_parts / threads) * threads)
    size = math.ceil(n_images / n_parts)
    return [(s, min(s + size, n_images)) for s in range(0, n_images, size)]


def plan_packed_partitions(listing: pd.DataFrame, partition_size: int) -> list[tuple[int, int]]:
    """Partitions of a packed listing along its row groups, so each task reads whole
    row groups: consecutive groups are merged up to ``partition_size`` images."""
    key = listing["shard"].astype(str) + "#" + listing["row_group"].astype(str)
    starts = [0] + [i for i in range(1, len(key)) if key.iat[i] != key.iat[i - 1]]
    bounds = [*starts, len(key)]
    ranges: list[tuple[int, int]] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if ranges and (b - ranges[-1][0]) <= partition_size:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


def plan(listing: pd.DataFrame, partition_size: int, threads: int) -> list[tuple[int, int]]:
    """The partitions of any listing: along row groups for a packed input."""
    if "row_group" in listing.columns:
        return plan_packed_partitions(listing, partition_size)
    return plan_partitions(len(listing), partition_size, threads)


def plan_shards(n_images: int, shard_size: int, threads: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of at most ``shard_size`` images, at least one per thread."""
    if n_images <= 0:
        return []
    n = max(math.ceil(n_images / shard_size), min(threads, n_images))
    size = math.ceil(n_images / n)
    return [(a, min(a + size, n_images)) for a in range(0, n_images, size)]
