"""What an input is, and reading its images: a tree of image files, or a pack.

A *pack* (``fruitdask pack``) is a committed output whose shards are Parquet
files of image bytes and whose index says where each image is; a run reads it
like the tree it came from (same paths and rows), a few ranged reads per task
instead of one request per image. Every engine lists and reads through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from fruitdask import io
from fruitdask.errors import FruitdaskError, StorageError, translate
from fruitdask.features import max_file_bytes
from fruitdask.output import read_committed

__all__ = [
    "LEGACY_PACK_INDEX",
    "PACK_FORMAT",
    "is_packed",
    "is_packed_url",
    "iter_images",
    "list_input",
]

PACK_FORMAT = "fruitdask-pack/2"
#: Where fruitdask 0.1's first ``pack`` wrote its index (still read).
LEGACY_PACK_INDEX = "_fruitdask_pack/index.parquet"
_PACKED_COLUMNS = ["bytes", "error"]


def _pack_index_url(url: str, so: dict[str, Any]) -> str | None:
    manifest = read_committed(url, so)
    if manifest is not None and str(manifest.get("format", "")).startswith("fruitdask-pack/"):
        return io.join(url, manifest["files"]["index"][0])
    legacy = io.join(url, LEGACY_PACK_INDEX)
    return legacy if io.exists(legacy, so) else None


def list_input(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The listing of an input: a pack's index, or :func:`fruitdask.io.list_files`.

    A packed listing has the columns of a loose one plus ``shard``, ``row_group``
    and ``row``. Raises the typed errors of :func:`fruitdask.io.list_files`.
    """
    so = dict(storage_options or {})
    try:
        index = _pack_index_url(url, so)
    except FruitdaskError:
        index = None  # not a reachable pack: list_files says what is wrong
    if index is None:
        return io.list_files(url, so)
    df = io.read_table(index, so).to_pandas()
    for col in ("path", "label", "split", "shard"):
        df[col] = df[col].astype("string")
    if "mtime" not in df.columns:
        df["mtime"] = pd.array([0] * len(df), dtype="int64")
    return df


def is_packed(listing: pd.DataFrame) -> bool:
    """Whether a listing is a pack's (its rows say where the bytes are)."""
    return "shard" in listing.columns


def is_packed_url(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` holds a committed pack."""
    try:
        return _pack_index_url(url, dict(storage_options or {})) is not None
    except FruitdaskError:
        return False


def iter_images(
    url: str,
    rows: pd.DataFrame,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int | None = None,
) -> Iterator[bytes | FruitdaskError]:
    """Yield the bytes of the images in ``rows`` of a listing, in order, fetching ahead.

    A failure is yielded in the image's place as a typed error (see
    :func:`fruitdask.io.iter_objects`), never raised. With ``max_pixels``, a
    file larger than any image of that many pixels could be is refused without
    reading it (a 2 GB file named .jpg took each worker over its memory limit).
    """
    limit = max_file_bytes(max_pixels) if max_pixels else None
    if is_packed(rows):
        yield from _iter_packed(url, rows, storage_options, limit)
        return
    names = list(rows["source"]) if "source" in rows.columns else list(rows["path"])
    sizes = rows["size"].to_numpy()
    big = sizes > limit if limit is not None else None
    if big is None or not big.any():
        yield from io.iter_objects(url, names, storage_options, limit)
        return
    rest = io.iter_objects(url, [n for n, b in zip(names, big, strict=True) if not b],
                           storage_options, limit)  # fmt: skip
    for too_big, size in zip(big, sizes, strict=True):
        if too_big:
            yield StorageError(f"file too large: {int(size):,} bytes (over {limit:,})")
        else:
            yield next(rest)


def _load_groups(url: str, groups: list[int], so: dict[str, Any] | None):
    table, starts = io.read_row_groups(url, groups, _PACKED_COLUMNS, so)
    return table.column("bytes").to_pylist(), table.column("error").to_pylist(), starts


def _iter_packed(
    url: str, rows: pd.DataFrame, so: dict[str, Any] | None, limit: int | None
) -> Iterator[bytes | FruitdaskError]:
    """The bytes of ``rows`` of a packed listing: only the row groups they fall in,
    only the ``bytes`` column, one ranged read per group instead of one request
    per image: decoding starts with the first group while the others arrive,
    one row group per request, all in flight at once (with the shard's footer
    kept per process, each is one GET: :func:`fruitdask.io.read_row_groups`)."""
    keys = list(zip(rows["shard"], rows["row_group"], strict=True))
    units = [(str(shard), [int(g)]) for shard, g in dict.fromkeys(keys)]
    unit_of = {(shard, gs[0]): k for k, (shard, gs) in enumerate(units)}
    pool = ThreadPoolExecutor(8)
    try:
        futures = [pool.submit(_load_groups, io.join(url, shard), gs, so) for shard, gs in units]
        for (shard, g), r in zip(keys, rows["row"].tolist(), strict=True):
            try:
                blobs, errors, starts = futures[unit_of[(str(shard), int(g))]].result()
            except Exception as exc:  # noqa: BLE001 - a bad shard fails its rows, not the run
                yield translate(exc, io.join(url, str(shard)))
                continue
            i = starts[int(g)] + r
            blob = blobs[i]
            if blob is None:  # unreadable when packed: keeps its reason
                yield StorageError(errors[i] or "no bytes")
            elif limit is not None and len(blob) > limit:
                yield StorageError(f"file too large: {len(blob):,} bytes (over {limit:,})")
            else:
                yield blob
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
