"""The Dask stages of the bag of visual words: tables in, tables out.

:func:`load_training_features` reads a feature pipeline's ``images/`` and
``features/`` parts on the workers (the data never comes to the client),
:func:`histogram_parts` writes one histogram row per image, :func:`color_parts`
computes colour histograms, and :func:`encode_listing` takes new images from
bytes to histograms (``evaluate``). The pure kernels are :mod:`fruitdask.bovw`'s.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitdask import features, io, source
from fruitdask.bovw import (
    COLOR_BINS,
    EncodedBatch,
    Encoder,
    assign_words,
    color_histogram,
    decode_color,
    word_histograms,
)
from fruitdask.cancel import StopToken
from fruitdask.cluster import gather_as_completed, n_threads
from fruitdask.errors import StorageError
from fruitdask.partition import plan
from fruitdask.tables import list_column

__all__ = [
    "FeatureParts",
    "color_parts",
    "encode_listing",
    "histogram_parts",
    "load_training_features",
]


# ---------------------------------------------------------------- training side
def _flat_list(column, d: int | None = None) -> np.ndarray:
    """A pyarrow list<float32> column as an (n, d) float32 array."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if d is None:
        d = len(values) // n if n else 0
    return values.reshape(n, d)


def _load_part(
    images_url: str, features_url: str, so: dict[str, Any], split: str | None
) -> dict[str, Any]:
    """Worker side: one pipeline partition's images and PCA features, ``split`` only."""
    images = io.read_table(
        images_url, so, columns=["path", "label", "split", "n_keypoints", "status"]
    )
    feats = io.read_table(features_url, so, columns=["path", "pca"])
    counts = images.column("n_keypoints").to_numpy().astype(np.int64)
    if feats.num_rows != int(counts.sum()):
        raise StorageError(
            f"{features_url}: {feats.num_rows} rows, but {images_url} counts {int(counts.sum())} "
            "keypoints; the output is inconsistent (run the pipeline again)"
        )
    import pyarrow as pa
    import pyarrow.compute as pc

    owner = np.repeat(np.arange(images.num_rows, dtype=np.int64), counts)
    expected = images.column("path").take(pa.array(owner))
    if feats.num_rows and not pc.all(pc.equal(feats.column("path"), expected)).as_py():
        raise StorageError(f"{features_url}: keypoint rows are not in the order of images/")
    x = _flat_list(feats.column("pca")) if feats.num_rows else np.zeros((0, 0), np.float32)
    split_col = images.column("split").to_pylist()
    keep = np.array([split is None or s is None or s == split for s in split_col], dtype=bool)
    if not keep.all():
        x = x[keep[owner]] if len(x) else x
        counts = counts[keep]
        images = images.filter(pa.array(keep))
    return {
        "x": x,
        "counts": counts.astype(np.int32),
        "path": images.column("path").to_pylist(),
        "label": images.column("label").to_pylist(),
        "split": images.column("split").to_pylist(),
        "status": images.column("status").to_pylist(),
    }


def _part_meta(part: dict[str, Any]) -> dict[str, Any]:
    return {"rows": int(len(part["x"])), "d": int(part["x"].shape[1]), "path": part["path"]}


def _sample(part: dict[str, Any], cap: int, seed: int, index: int) -> np.ndarray:
    x = part["x"]
    if cap >= len(x):
        return x
    rng = np.random.default_rng([seed, index, 7])
    return x[np.sort(rng.choice(len(x), cap, replace=False))]


@dataclass
class FeatureParts:
    """Training features held by the workers, one future per pipeline partition.

    Attributes
    ----------
    parts : list of distributed.Future
        Each a dict with ``x`` (n_keypoints, d) float32, ``counts``, ``path``,
        ``label``, ``split``, ``status``.
    rows : list of int
        Keypoints per part.
    paths : list of list of str
        Image paths per part, in order.
    d : int
        Feature dimension (PCA components).
    names : list of str
        Part file names (``part-00000-<run>.parquet``).
    token : str
        Unique to the load: task keys derived from these parts carry it.
    """

    parts: list
    rows: list[int]
    paths: list[list[str]]
    d: int
    names: list[str]
    token: str = ""

    @property
    def n_keypoints(self) -> int:
        return int(sum(self.rows))

    @property
    def n_images(self) -> int:
        return int(sum(len(p) for p in self.paths))

    def release(self) -> None:
        """Drop the futures: the workers free the features once no future holds
        them. A release, not ``client.cancel``: a cancel walks the parts'
        dependents on the scheduler, and one that no client wants any more (a
        future released while a later one still depends on it) trips
        distributed's ``assert ts.who_wants`` in ``stimulus_cancel``."""
        self.parts = []

    def sample_array(self, client, sample: int, seed: int = 0):
        """A dask array of (a uniform random sample of) the keypoints' features.

        ``sample`` = 0 takes every row; otherwise each part contributes its
        share of ``sample`` rows, drawn without replacement.
        """
        import dask.array as da

        total = max(1, self.n_keypoints)
        blocks = []
        for i, (fut, n) in enumerate(zip(self.parts, self.rows, strict=True)):
            if n == 0:
                continue
            cap = n if sample <= 0 else min(n, math.ceil(sample * n / total))
            f = client.submit(_sample, fut, cap, seed, i, pure=False)
            blocks.append(da.from_delayed(f, shape=(cap, self.d), dtype=np.float32))
        if not blocks:
            raise ValueError("no keypoints in the training images: nothing to cluster")
        return da.concatenate(blocks, axis=0)


def load_training_features(
    client,
    run_output: str,
    manifest: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
    split: str | None = "Training",
    token: str = "",
) -> FeatureParts:
    """Read a pipeline output's ``images/`` and ``features/`` parts on the workers.

    Parameters
    ----------
    run_output : str
        A ``fruitdask run`` output folder or URL (with ``_SUCCESS``).
    manifest : dict
        Its ``manifest.json``; the part files are taken from it, so a reader
        never mixes two runs.
    split : str or None
        Keep only images of this split (images with no split are kept too).
    token : str
        Makes the task keys unique to this call (e.g. the train run id).
    """
    token = token or uuid.uuid4().hex[:8]
    so = dict(storage_options or {})
    images = sorted(manifest["files"]["images"])
    feats = sorted(manifest["files"]["features"])
    names = [f.rsplit("/", 1)[-1] for f in images]
    if names != [f.rsplit("/", 1)[-1] for f in feats]:
        raise StorageError(f"{run_output}: images/ and features/ parts do not match")
    parts = [
        client.submit(
            _load_part,
            io.join(run_output, im),
            io.join(run_output, fe),
            so,
            split,
            key=f"bovw-load-{token}-{name}",
        )
        for im, fe, name in zip(images, feats, names, strict=True)
    ]
    metas = client.gather([client.submit(_part_meta, p, pure=False) for p in parts])
    d = max((m["d"] for m in metas), default=0)
    return FeatureParts(
        parts=parts,
        rows=[m["rows"] for m in metas],
        paths=[m["path"] for m in metas],
        d=d,
        names=names,
        token=token,
    )


def _histogram_task(
    part: dict[str, Any],
    centers: np.ndarray,
    url: str | None,
    so: dict[str, Any],
    colors: np.ndarray | None,
) -> dict[str, Any]:
    """Worker side: words -> histograms for one part; write its table if ``url``."""
    k = int(centers.shape[0])
    counts = part["counts"]
    if len(part["x"]):
        words, dist = assign_words(part["x"], centers)
    else:
        words, dist = np.zeros(0, np.int32), np.zeros(0)
    hist = word_histograms(words, counts, k)
    if url is not None:
        io.write_table(_histogram_table(part, hist, colors), url, so)
    return {
        "histograms": hist,
        "colors": colors,
        "n_keypoints": counts,
        "label": part["label"],
        "path": part["path"],
        "status": part["status"],
        "sq_dist_sum": float(dist.sum()),
    }


def _histogram_table(part: dict[str, Any], hist: np.ndarray, colors: np.ndarray | None):
    import pyarrow as pa

    counts = np.asarray(part["counts"], np.int32)
    cols = {
        "path": pa.array(part["path"], pa.string()),
        "label": pa.array(part["label"], pa.string()),
        "split": pa.array(part["split"], pa.string()),
        "n_keypoints": pa.array(counts, pa.int32()),
        "has_keypoints": pa.array(counts > 0, pa.bool_()),
        "status": pa.array(part["status"], pa.string()),
        "histogram": list_column(hist),
    }
    if colors is not None:
        cols["color"] = list_column(np.asarray(colors, np.float32))
    return pa.table(cols)


def _color_task(
    url: str,
    rows,
    so: dict[str, Any],
    max_pixels: int,
) -> np.ndarray:
    """Worker side: colour histograms of ``rows`` of a listing (zeros for unreadable images)."""
    out = np.zeros((len(rows), COLOR_BINS), np.float32)
    for i, blob in enumerate(source.iter_images(url, rows, so, max_pixels)):
        if isinstance(blob, BaseException):
            continue
        size = features.image_size(blob)
        if size is not None and size[0] * size[1] > max_pixels:
            continue
        bgr = decode_color(blob)
        if bgr is not None and bgr.size // 3 <= max_pixels:
            out[i] = color_histogram(bgr)
    return out


def color_parts(
    client,
    parts: FeatureParts,
    url: str,
    listing,
    storage_options: dict[str, Any] | None,
    max_pixels: int,
) -> list:
    """Submit colour-histogram tasks aligned with ``parts`` (one future per part).

    They read the images again (the feature pipeline keeps no bytes); submitted
    before the vocabulary fit, they fill the cores the fit's round trips leave idle.
    """
    by_path = listing.set_index("path", drop=False)
    futures = []
    for name, paths in zip(parts.names, parts.paths, strict=True):
        rows = by_path.loc[list(paths)].reset_index(drop=True)
        futures.append(
            client.submit(
                _color_task,
                url,
                rows,
                dict(storage_options or {}),
                max_pixels,
                key=f"bovw-color-{parts.token}-{name}",
            )
        )
    return futures


def histogram_parts(
    client,
    parts: FeatureParts,
    centers: np.ndarray,
    out_url: str,
    files: list[str],
    storage_options: dict[str, Any] | None = None,
    colors: Sequence | None = None,
    stop: StopToken | None = None,
) -> list[dict[str, Any]]:
    """Histograms of every image of ``parts``, part ``i`` written to ``out_url/files[i]``.

    ``colors``, when given, holds per part the colour histograms (arrays or the
    futures of :func:`color_parts`); they are written beside the word histograms.

    Returns
    -------
    list of dict
        Per part: ``histograms`` (n, k) float32, ``colors``, ``n_keypoints``,
        ``label``, ``path``, ``status``, ``sq_dist_sum``.
    """
    so = dict(storage_options or {})
    centers_f = client.scatter(np.asarray(centers), broadcast=True)
    futures = []
    for i, (fut, name) in enumerate(zip(parts.parts, parts.names, strict=True)):
        url = io.join(out_url, files[i])
        col = colors[i] if colors is not None else None
        futures.append(
            client.submit(
                _histogram_task, fut, centers_f, url, so, col, key=f"bovw-hist-{parts.token}-{name}"
            )
        )
    return gather_as_completed(client, futures, stop or StopToken())


# ---------------------------------------------------------------- new images (Dask)
def _encode_task(url: str, rows, so: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    """Worker side: read and encode one partition of a listing."""
    batch = encoder.encode(source.iter_images(url, rows, so, encoder.orb.max_pixels))
    return {
        "histograms": batch.histograms,
        "colors": batch.colors,
        "n_keypoints": batch.n_keypoints,
        "status": batch.status,
        "error": batch.error,
        "sq_dist_sum": batch.sq_dist_sum,
    }


def encode_listing(
    client,
    url: str,
    listing,
    encoder: Encoder,
    storage_options: dict[str, Any] | None = None,
    partition_size: int = 1000,
    progress=None,
    stop: StopToken | None = None,
) -> EncodedBatch:
    """Encode every image of ``listing`` (rows under ``url``) on the cluster.

    Returns
    -------
    EncodedBatch
        Rows in the order of ``listing``.
    """
    stop = stop or StopToken()
    ranges = plan(listing, partition_size, n_threads(client))
    enc_f = client.scatter(encoder, broadcast=True)
    token = uuid.uuid4().hex[:8]  # two evaluations in one session must not share keys
    so = dict(storage_options or {})
    futures = [
        client.submit(
            _encode_task,
            url,
            listing.iloc[a:b].reset_index(drop=True),
            so,
            enc_f,
            key=f"bovw-encode-{token}-{i:05d}",
        )
        for i, (a, b) in enumerate(ranges)
    ]
    seen = {"parts": 0, "images": 0}

    def tick(_: int, r: dict[str, Any]) -> None:
        seen["parts"] += 1
        seen["images"] += len(r["status"])
        if progress:
            progress("encode", seen["parts"], len(futures), seen["images"])

    res = gather_as_completed(client, futures, stop, tick)
    if not res:
        return EncodedBatch(
            np.zeros((0, encoder.k), np.float32), None, np.zeros(0, np.int32), [], []
        )
    return EncodedBatch(
        histograms=np.concatenate([r["histograms"] for r in res]),
        colors=np.concatenate([r["colors"] for r in res]) if encoder.color else None,
        n_keypoints=np.concatenate([r["n_keypoints"] for r in res]),
        status=[s for r in res for s in r["status"]],
        error=[e for r in res for e in r["error"]],
        sq_dist_sum=float(sum(r["sq_dist_sum"] for r in res)),
    )
