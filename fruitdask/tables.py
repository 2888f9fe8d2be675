"""The output tables: their Arrow schemas, and building them from the kernel's results.

Pure (pyarrow and NumPy, no I/O, no engine): every engine (Dask, Spark, and the
peers in ``benchmarks/peers/``) builds its Parquet files with these functions,
which is what keeps their outputs byte-for-byte comparable.

One row per listed file in ``images``; one row per keypoint in ``descriptors``
and ``features``, in the order of the images, keypoints numbered from 0 within
each image.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import features
from fruitdask.errors import TransientError, one_line

__all__ = [
    "DESCRIPTORS_SCHEMA",
    "FEATURES_SCHEMA",
    "IMAGES_SCHEMA",
    "KEY_COLUMNS",
    "TABLES",
    "binary_column",
    "descriptors_table",
    "extract_partition",
    "features_table",
    "keypoint_keys",
    "list_column",
    "status_counts",
]

#: The per-partition tables of a ``fruitdask run`` output, in the order they are written.
TABLES = ("images", "descriptors", "features")
#: Columns that identify an image in every table.
KEY_COLUMNS = ("path", "label", "split")

IMAGES_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("size", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_keypoints", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
DESCRIPTORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("keypoint", pa.int32()),
        ("descriptor", pa.binary()),
    ]
)
FEATURES_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("keypoint", pa.int32()),
        ("pca", pa.list_(pa.float32())),
    ]
)


def binary_column(desc: np.ndarray) -> pa.Array:
    """ORB descriptors as a binary column without a copy per row.

    Parameters
    ----------
    desc : ndarray of shape (n, 32), dtype uint8
    """
    n = len(desc)
    width = features.DESCRIPTOR_BYTES
    offsets = np.arange(0, (n + 1) * width, width)
    return pa.Array.from_buffers(
        pa.binary(),
        n,
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(desc))],
    )


def list_column(values: np.ndarray) -> pa.Array:
    """Rows of a 2-D float array as a ``list<float32>`` column.

    Parameters
    ----------
    values : ndarray of shape (n, k)
    """
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


def keypoint_keys(rows: pd.DataFrame, counts: np.ndarray) -> dict[str, pa.Array]:
    """path/label/split repeated per keypoint, and the keypoint index within its image.

    Parameters
    ----------
    rows : DataFrame with columns path, label, split (one row per image)
    counts : ndarray of shape (n_images,), keypoints per image
    """
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    keypoint = (np.arange(len(owner), dtype=np.int64) - starts).astype(np.int32)
    take = pa.array(owner)
    return {
        **{c: pa.array(rows[c], type=pa.string()).take(take) for c in KEY_COLUMNS},
        "keypoint": pa.array(keypoint, type=pa.int32()),
    }


def descriptors_table(rows: pd.DataFrame, counts: np.ndarray, desc: np.ndarray) -> pa.Table:
    """The ``descriptors`` table of one partition (:data:`DESCRIPTORS_SCHEMA`)."""
    table = pa.table({**keypoint_keys(rows, counts), "descriptor": binary_column(desc)})
    return table.cast(DESCRIPTORS_SCHEMA)


def features_table(rows: pd.DataFrame, counts: np.ndarray, projected: np.ndarray) -> pa.Table:
    """The ``features`` table of one partition (:data:`FEATURES_SCHEMA`).

    Parameters
    ----------
    projected : ndarray of shape (n_keypoints, n_components), float32
    """
    table = pa.table({**keypoint_keys(rows, counts), "pca": list_column(projected)})
    return table.cast(FEATURES_SCHEMA)


def extract_partition(
    rows: pd.DataFrame, data: Iterable[bytes | BaseException], params: features.OrbParams
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Run the kernel over one partition's bytes.

    Parameters
    ----------
    rows : DataFrame
        The partition's listing rows (path, label, split, size).
    data : iterable of bytes or exception
        The bytes of each row's image, in order; an exception in the place of
        a file that could not be read becomes that image's error row.
    params : OrbParams

    Returns
    -------
    images : pyarrow.Table with :data:`IMAGES_SCHEMA`
    descriptors : ndarray of shape (n_keypoints_total, 32), uint8
    counts : ndarray of shape (n_images,), int32 (keypoints per image)

    Raises
    ------
    TransientError
        A read failed because the store as a whole was unavailable: the
        partition must be retried, not its images recorded as bad files.
    """
    orb = params.create()
    n = len(rows)
    width = np.zeros(n, np.int32)
    height = np.zeros(n, np.int32)
    counts = np.zeros(n, np.int32)
    status: list[str] = []
    error: list[str | None] = []
    descs: list[np.ndarray] = []
    for i, blob in enumerate(data):
        if isinstance(blob, TransientError):
            raise blob
        if isinstance(blob, BaseException):
            status.append("error")
            error.append(f"read failed: {one_line(blob)}")
            continue
        f = features.extract(blob, params, orb)
        width[i], height[i], counts[i] = f.width, f.height, len(f.descriptors)
        status.append(f.status)
        error.append(f.error)
        if len(f.descriptors):
            descs.append(f.descriptors)
    desc = (
        np.concatenate(descs) if descs else np.zeros((0, features.DESCRIPTOR_BYTES), dtype=np.uint8)
    )
    images = pa.table(
        {
            "path": pa.array(rows["path"], type=pa.string()),
            "label": pa.array(rows["label"], type=pa.string()),
            "split": pa.array(rows["split"], type=pa.string()),
            "size": pa.array(rows["size"], type=pa.int64()),
            "width": width,
            "height": height,
            "n_keypoints": counts,
            "status": pa.array(status, type=pa.string()),
            "error": pa.array(error, type=pa.string()),
        },
        schema=IMAGES_SCHEMA,
    )
    return images, desc, counts


def status_counts(images: pa.Table) -> dict[str, int]:
    """``images``, ``ok``, ``no_keypoints`` and ``error`` counts of an images table."""
    status = images.column("status").to_pylist()
    return {
        "images": images.num_rows,
        "ok": status.count("ok"),
        "no_keypoints": status.count("no_keypoints"),
        "error": status.count("error"),
    }
