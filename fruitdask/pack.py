"""Pack a tree of small images into a few Parquet shards of image bytes.

Object stores charge per request: 90,000 loose 5 KB objects cost 90,000 GETs,
each worth more CPU than the ORB work on the image. A packed input turns them
into a few ranged reads per task. Layout::

    DST/shards/part-00000.parquet        path, label, split, size, bytes, error
    DST/_fruitdask_pack/index.parquet    one row per image: where its bytes are
    DST/_fruitdask_pack/pack.json        counts, timings, source (no secrets)

Each shard holds row groups of ``row_group_size`` images; ``fruitdask run``
partitions a packed input along them, so a task reads whole row groups. The
index is written last: until it exists the folder is not a packed input. Shards
are written whole (a rename locally, one PUT on S3) under names fixed by the
source listing, so an interrupted pack resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from fruitdask import io
from fruitdask.config import redact

__all__ = ["PACK_SCHEMA", "PackExistsError", "PackSummary", "pack", "plan_shards"]

PACK_FORMAT = "fruitdask-pack/1"
STATE = "_fruitdask_pack/state.json"
MANIFEST = "_fruitdask_pack/pack.json"

PACK_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("size", pa.int64()),
        ("bytes", pa.binary()),
        ("error", pa.string()),  # why ``bytes`` is null: the source could not be read
    ]
)


class PackExistsError(Exception):
    """The destination holds something else; refused without ``overwrite``."""


@dataclass
class PackSummary:
    output: str
    images: int = 0
    unreadable: int = 0
    shards: int = 0
    shards_resumed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    already_complete: bool = False


def plan_shards(n_images: int, shard_size: int, n_threads: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most ``shard_size`` images, at least one per thread."""
    if n_images <= 0:
        return []
    n = max(math.ceil(n_images / shard_size), min(n_threads, n_images))
    size = math.ceil(n_images / n)
    return [(a, min(a + size, n_images)) for a in range(0, n_images, size)]


def _shard_name(i: int) -> str:
    return f"shards/part-{i:05d}.parquet"


def _pack_task(
    i: int,
    rows: pd.DataFrame,
    src: str,
    dst: str,
    so: dict[str, Any],
    dso: dict[str, Any],
    row_group_size: int,
) -> dict[str, int]:
    """Worker side: read one shard's images and write them as one Parquet file."""
    data = io.read_images(src, rows, so)
    blobs = [b if isinstance(b, bytes) else None for b in data]
    errors = [None if isinstance(b, bytes) else io.translate(b, str(p)).args[0]
              for b, p in zip(data, rows["path"], strict=True)]  # fmt: skip
    table = pa.table(
        {
            "path": pa.array(rows["path"], pa.string()),
            "label": pa.array(rows["label"], pa.string()),
            "split": pa.array(rows["split"], pa.string()),
            "size": pa.array(rows["size"], pa.int64()),
            "bytes": pa.array(blobs, pa.binary()),
            "error": pa.array(errors, pa.string()),
        },
        schema=PACK_SCHEMA,
    )
    # JPEG/PNG bytes do not compress: no codec, just row groups to read by.
    n = io.write_table(
        table, io.join(dst, _shard_name(i)), dso, compression="none", row_group_size=row_group_size
    )
    return {"bytes": n, "unreadable": sum(b is None for b in blobs), "images": len(rows)}


def _fingerprint(listing: pd.DataFrame, shard_size: int, row_group_size: int) -> str:
    h = hashlib.sha256(f"{shard_size}/{row_group_size}".encode())
    h.update(pd.util.hash_pandas_object(listing[["path", "size"]], index=False).values.tobytes())
    return h.hexdigest()[:16]


def _index(listing: pd.DataFrame, ranges: list[tuple[int, int]], rg: int) -> pa.Table:
    shard, group, row = [], [], []
    for i, (a, b) in enumerate(ranges):
        for j in range(b - a):
            shard.append(_shard_name(i))
            group.append(j // rg)
            row.append(j % rg)
    return pa.table(
        {
            "path": pa.array(listing["path"], pa.string()),
            "label": pa.array(listing["label"], pa.string()),
            "split": pa.array(listing["split"], pa.string()),
            "size": pa.array(listing["size"], pa.int64()),
            "shard": pa.array(shard, pa.string()),
            "row_group": pa.array(group, pa.int32()),
            "row": pa.array(row, pa.int32()),
        }
    )


def pack(
    src: str,
    dst: str,
    client,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    shard_size: int = 5000,
    row_group_size: int = 250,
    overwrite: bool = False,
    progress: Callable[[str, int, int, int], None] | None = None,
) -> PackSummary:
    """Pack the images under ``src`` into Parquet shards under ``dst``, on a Dask cluster.

    Parameters
    ----------
    src, dst : str
        Folders or URLs (local, ``s3://``); S3 to S3 works, no bytes pass the client.
    shard_size : int
        Images per shard (fewer when needed to give every worker thread a shard).
    row_group_size : int
        Images per Parquet row group: a ``run`` task reads a few of them (up to
        its partition size), fetching the next while it decodes the first.
    overwrite : bool
        Replace whatever ``dst`` holds. Without it an interrupted pack of the same
        source resumes and a finished one is left alone.

    Raises
    ------
    io.StorageError
        ``src`` is missing, empty or unreachable.
    PackExistsError
        ``dst`` holds something else and ``overwrite`` is not set.
    """
    from distributed import as_completed

    if shard_size < 1 or row_group_size < 1:
        raise ValueError("shard size and row group size must be >= 1")
    t0 = time.perf_counter()
    so = dict(storage_options or {})
    dso = so if dst_storage_options is None else dict(dst_storage_options)
    listing = io.list_images(src, so)
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001
        threads = 1
    ranges = plan_shards(len(listing), shard_size, threads)
    fp = _fingerprint(listing, shard_size, row_group_size)
    summary = PackSummary(output=dst, images=len(listing), shards=len(ranges))

    state = json.loads(io.read_text(io.join(dst, STATE), dso) or "null")
    done_index = io.exists(io.join(dst, io.PACK_INDEX), dso)
    if overwrite:
        io.remove([io.join(dst, io.PACK_INDEX)], dso)  # no longer a packed input
        io.remove_tree(dst, dso)
        state = None
    elif state is not None and state.get("fingerprint") == fp:
        if done_index:
            summary.already_complete = True
            return summary
    elif io.exists(dst, dso) and io.ls(dst, dso):
        raise PackExistsError(
            f"{dst}: exists and is not a pack of this source; use --overwrite to replace it"
        )
    io.check_writable(dst, dso)
    io.write_bytes(io.join(dst, STATE), json.dumps({"fingerprint": fp}).encode(), dso)

    present = set(io.ls(io.join(dst, "shards"), dso)) if state else set()
    futures = []
    for i, (a, b) in enumerate(ranges):
        if _shard_name(i).split("/", 1)[1] in present:
            summary.shards_resumed += 1
            continue
        rows = listing.iloc[a:b].reset_index(drop=True)
        futures.append(
            client.submit(
                _pack_task, i, rows, src, dst, so, dso, row_group_size, key=f"pack-{fp}-{i}"
            )
        )
    n_done = 0
    try:
        for k, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            summary.bytes += r["bytes"]
            summary.unreadable += r["unreadable"]
            n_done += r["images"]
            if progress:
                progress("pack", k + summary.shards_resumed, len(ranges), n_done)
    except BaseException:
        client.cancel(futures)
        raise

    io.write_table(_index(listing, ranges, row_group_size), io.join(dst, io.PACK_INDEX), dso)
    summary.seconds = time.perf_counter() - t0
    manifest = {
        "format": PACK_FORMAT,
        "source": src,
        "storage_options": redact(so),
        "images": summary.images,
        "unreadable": summary.unreadable,
        "shards": summary.shards,
        "shard_size": shard_size,
        "row_group_size": row_group_size,
        "seconds": round(summary.seconds, 3),
        "fingerprint": fp,
    }
    io.write_bytes(io.join(dst, MANIFEST), json.dumps(manifest, indent=1).encode(), dso)
    return summary
