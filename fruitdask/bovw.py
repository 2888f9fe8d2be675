"""Visual words: a dask-ml ``KMeans`` vocabulary on PCA'd ORB descriptors, and
one bag-of-visual-words histogram per image.

Two halves:

* pure NumPy helpers (:func:`assign_words`, :func:`word_histograms`,
  :func:`inertia`, :func:`color_histogram`, :class:`Encoder`), used the same way
  on the workers, in ``predict``'s single-image fast path and in the tests
  (against scikit-learn);
* Dask drivers: :func:`load_training_features` reads the feature pipeline's
  ``images/`` + ``features/`` Parquet parts on the workers (the data never comes
  to the client), :func:`fit_vocabulary` fits dask-ml ``KMeans`` on them,
  :func:`histogram_parts` writes one histogram row per image, and
  :func:`encode_listing` takes new images from bytes to histograms (evaluate).

Histogram table (one Parquet file per partition)::

    path, label, split : string
    n_keypoints        : int32
    has_keypoints      : bool     False -> all-zero histogram (nothing to count)
    status             : string   the pipeline's: ok | no_keypoints | error
    histogram          : list<float32>, length K, L1-normalised (sums to 1)
    color              : list<float32>, only with colour features
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitdask import features, io
from fruitdask.pca import PcaModel

__all__ = [
    "COLOR_BINS",
    "HISTOGRAM_COLUMNS",
    "EncodedBatch",
    "Encoder",
    "FeatureParts",
    "Vocabulary",
    "assign_words",
    "color_histogram",
    "color_parts",
    "encode_listing",
    "fit_vocabulary",
    "histogram_parts",
    "inertia",
    "load_training_features",
    "word_histograms",
]

HISTOGRAM_COLUMNS = ("path", "label", "split", "n_keypoints", "has_keypoints", "status")

# Rows per block when computing distances: bounds the (rows x K) float64 matrix
# to ~100 MB at K = 400.
_ASSIGN_BLOCK = 32768


# ---------------------------------------------------------------- pure helpers
def assign_words(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre (squared Euclidean) of every row.

    Parameters
    ----------
    x : ndarray of shape (n, d)
        PCA features of keypoints (any float dtype).
    centers : ndarray of shape (k, d)
        The vocabulary.

    Returns
    -------
    words : ndarray of shape (n,), dtype int32
        Index of the nearest centre; the lowest index on exact ties (as
        ``sklearn.metrics.pairwise_distances_argmin``).
    sq_dist : ndarray of shape (n,), dtype float64
        Squared distance to that centre.
    """
    x = np.asarray(x)
    c = np.asarray(centers, dtype=np.float64)
    n = x.shape[0]
    words = np.empty(n, np.int32)
    dist = np.empty(n, np.float64)
    cc = np.einsum("ij,ij->i", c, c)
    # float64 throughout: with float32 the expansion |x|^2 - 2x.c + |c|^2 loses
    # ~3 digits on features of magnitude ~100 and flips near-ties between runs.
    for s in range(0, n, _ASSIGN_BLOCK):
        xb = x[s : s + _ASSIGN_BLOCK].astype(np.float64)
        d = cc[None, :] - 2.0 * (xb @ c.T)
        w = np.argmin(d, axis=1)
        words[s : s + len(xb)] = w
        xx = np.einsum("ij,ij->i", xb, xb)
        dist[s : s + len(xb)] = np.maximum(d[np.arange(len(xb)), w] + xx, 0.0)
    return words, dist


def word_histograms(words: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """One L1-normalised bag-of-words histogram per image.

    Parameters
    ----------
    words : ndarray of shape (n_keypoints_total,), int
        Word of every keypoint, images one after the other.
    counts : ndarray of shape (n_images,), int
        Keypoints per image (``sum(counts) == len(words)``).
    k : int
        Vocabulary size.

    Returns
    -------
    ndarray of shape (n_images, k), dtype float32
        Rows sum to 1; all zeros for an image with no keypoints.
    """
    counts = np.asarray(counts, dtype=np.int64)
    words = np.asarray(words, dtype=np.int64)
    if int(counts.sum()) != len(words):
        raise ValueError(f"counts sum to {int(counts.sum())} but there are {len(words)} words")
    n = len(counts)
    owner = np.repeat(np.arange(n, dtype=np.int64), counts)
    flat = np.bincount(owner * k + words, minlength=n * k).astype(np.float32)
    h = flat.reshape(n, k)
    nz = counts > 0
    h[nz] /= counts[nz, None].astype(np.float32)
    return h


def inertia(x: np.ndarray, centers: np.ndarray) -> float:
    """Sum of squared distances of the rows of ``x`` to their nearest centre."""
    return float(assign_words(x, centers)[1].sum())


#: Hue x saturation joint bins, then value bins, of the colour histogram.
COLOR_HS_BINS = (12, 4)
COLOR_V_BINS = 4
COLOR_BINS = COLOR_HS_BINS[0] * COLOR_HS_BINS[1] + COLOR_V_BINS


def color_histogram(bgr: np.ndarray) -> np.ndarray:
    """A cheap colour descriptor of the fruit, the white background left out.

    Fruits-360 photographs one fruit on white, so pixels that are both bright
    and unsaturated are background. What remains is summarised by a 12 x 4
    hue-saturation histogram plus 4 brightness bins (HSV, OpenCV's ranges).

    Parameters
    ----------
    bgr : ndarray of shape (height, width, 3), dtype uint8

    Returns
    -------
    ndarray of shape (COLOR_BINS,) = (52,), dtype float32
        Sums to 1 (both parts count the same pixels: half the mass each); all
        zeros when there is no foreground pixel.
    """
    import cv2

    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    mask = ((hsv[..., 1] > 30) | (hsv[..., 2] < 200)).astype(np.uint8)
    hs = cv2.calcHist([hsv], [0, 1], mask, list(COLOR_HS_BINS), [0, 180, 0, 256]).ravel()
    v = cv2.calcHist([hsv], [2], mask, [COLOR_V_BINS], [0, 256]).ravel()
    h = np.concatenate([hs, v]).astype(np.float32)
    total = float(h.sum())
    return h / total if total > 0 else h


def _decode_color(data: bytes) -> np.ndarray | None:
    import cv2

    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


# ---------------------------------------------------------------- encoder
@dataclass
class EncodedBatch:
    """Images taken from bytes to bag-of-words vectors.

    Attributes
    ----------
    histograms : ndarray of shape (n_images, k), float32
        L1-normalised; zero rows where there were no keypoints.
    colors : ndarray of shape (n_images, COLOR_BINS), float32, or None
    n_keypoints : ndarray of shape (n_images,), int32
    status : list of str
        ``ok``, ``no_keypoints`` or ``error``.
    error : list of str or None
    sq_dist_sum : float
        Sum of squared distances of the keypoints to their words.
    """

    histograms: np.ndarray
    colors: np.ndarray | None
    n_keypoints: np.ndarray
    status: list[str]
    error: list[str | None]
    sq_dist_sum: float = 0.0


@dataclass(frozen=True)
class Encoder:
    """Bytes -> ORB -> PCA -> nearest word -> histogram (+ colour), one image at a time.

    The same code serves the workers (evaluate) and ``predict``'s fast path, so
    both see exactly what training saw: PCA features are
    :meth:`PcaModel.transform` of the descriptors, as the feature pipeline
    writes them.
    """

    orb: features.OrbParams
    pca: PcaModel
    centers: np.ndarray
    color: bool = False

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    def encode(self, blobs: Iterable[bytes | BaseException], orb=None) -> EncodedBatch:
        """Encode a sequence of image bytes (an exception in the place of a
        failed read is reported as that image's error)."""
        orb = orb if orb is not None else self.orb.create()
        status: list[str] = []
        error: list[str | None] = []
        descs: list[np.ndarray] = []
        colors: list[np.ndarray] = []
        for blob in blobs:
            if isinstance(blob, BaseException):
                status.append("error")
                error.append(f"read failed: {io._one_line(blob)}")
                descs.append(np.zeros((0, features.DESCRIPTOR_BYTES), np.uint8))
                colors.append(np.zeros(COLOR_BINS, np.float32))
                continue
            f = features.extract(blob, self.orb, orb)
            status.append(f.status)
            error.append(f.error)
            descs.append(f.descriptors)
            col = np.zeros(COLOR_BINS, np.float32)
            # only images extract() decoded: its size guard has run on them
            if self.color and f.status != "error":
                bgr = _decode_color(blob)
                if bgr is not None:
                    col = color_histogram(bgr)
            colors.append(col)
        counts = np.array([len(d) for d in descs], np.int32)
        hist = np.zeros((len(descs), self.k), np.float32)
        sq = 0.0
        if counts.sum():
            x = self.pca.transform(np.concatenate(descs))
            words, dist = assign_words(x, self.centers)
            hist = word_histograms(words, counts, self.k)
            sq = float(dist.sum())
        return EncodedBatch(
            histograms=hist,
            colors=np.stack(colors) if self.color and colors else None,
            n_keypoints=counts,
            status=status,
            error=error,
            sq_dist_sum=sq,
        )


# ---------------------------------------------------------------- vocabulary fit
@dataclass(frozen=True)
class Vocabulary:
    """A fitted visual vocabulary.

    Attributes
    ----------
    centers : ndarray of shape (k, d), float32
    n_iter : int
        Lloyd iterations dask-ml ran.
    fitted_on_rows : int
    init : str
    seconds : float
    """

    centers: np.ndarray
    n_iter: int
    fitted_on_rows: int
    init: str
    seconds: float

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])


def fit_vocabulary(
    x,
    k: int,
    seed: int = 0,
    max_iter: int = 30,
    tol: float = 1e-4,
    oversampling: float = 2.0,
    init_rounds: int = 5,
    init: np.ndarray | None = None,
) -> Vocabulary:
    """Fit dask-ml ``KMeans`` with k-means|| initialisation.

    Parameters
    ----------
    x : dask.array or ndarray of shape (n, d), known chunk sizes
        PCA features; computed on the current Dask client if there is one.
    k : int
        Number of visual words.
    seed : int
        Seeds k-means|| sampling (results also depend on the chunking).
    max_iter : int
        Lloyd iterations at most. On PCA'd ORB features Lloyd converges slowly
        (scikit-learn needs ~100-150 iterations at tol 1e-4) but the
        classification accuracy of the resulting words stops improving after
        ~20 (measured on a generated set, seed 11); each dask-ml iteration is a
        round trip to the cluster.
    tol : float
        Relative tolerance, in scikit-learn's sense: the fit stops when the
        total squared shift of the centres falls below ``tol`` times the mean
        per-feature variance of ``x``.
    oversampling : float
        k-means|| draws ``oversampling * k`` candidates per round (the paper's
        l = 2k; Bahmani et al. 2012).
    init_rounds : int
        k-means|| rounds (the paper's 5). Each costs a pass over the data; with
        3, fits on well-separated blobs ended 10-20% above scikit-learn's
        inertia (two blobs merged), with 5 within 3%.
    init : ndarray of shape (k, d), optional
        Start from these centres instead (used by the tests to compare with
        scikit-learn from the same start).
    """
    import dask.array as da
    from dask_ml.cluster import KMeans

    if isinstance(x, np.ndarray):
        x = da.from_array(x, chunks=(max(1, min(len(x), 65536)), -1))
    x = x.astype(np.float32)
    n = int(x.shape[0])
    if n < k:
        raise ValueError(f"{k} visual words need at least {k} keypoints, got {n}")
    t = time.perf_counter()
    # dask-ml compares the summed squared centre shift with ``tol`` as given,
    # an absolute number; scikit-learn scales it by the data's mean variance.
    # PCA'd ORB features have variances in the hundreds, so an unscaled 1e-4
    # would run every fit to max_iter.
    mean_var = float(x.var(axis=0).mean().compute())
    km = KMeans(
        n_clusters=k,
        init=init if init is not None else "k-means||",
        # dask-ml draws ``oversampling_factor`` candidates per round in
        # expectation, not ``oversampling_factor * k``: its default of 2 with
        # ~log(cost) ~ 20 rounds leaves fewer candidates than words, and it
        # then pads with random points (a warning in its log, nothing more).
        oversampling_factor=max(2.0, oversampling * k),
        init_max_iter=init_rounds,
        max_iter=max_iter,
        tol=tol * mean_var,
        random_state=seed,
    )
    km.fit(x)
    centers = np.asarray(km.cluster_centers_, dtype=np.float32)
    return Vocabulary(
        centers=centers,
        n_iter=int(km.n_iter_),
        fitted_on_rows=n,
        init="array" if init is not None else "k-means||",
        seconds=time.perf_counter() - t,
    )


# ---------------------------------------------------------------- training side (Dask)
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
        raise io.StorageError(
            f"{features_url}: {feats.num_rows} rows, but {images_url} counts {int(counts.sum())} "
            "keypoints; the output is inconsistent (run the pipeline again)"
        )
    import pyarrow as pa
    import pyarrow.compute as pc

    owner = np.repeat(np.arange(images.num_rows, dtype=np.int64), counts)
    expected = images.column("path").take(pa.array(owner))
    if feats.num_rows and not pc.all(pc.equal(feats.column("path"), expected)).as_py():
        raise io.StorageError(f"{features_url}: keypoint rows are not in the order of images/")
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
        raise io.StorageError(f"{run_output}: images/ and features/ parts do not match")
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


def _list_column(values: np.ndarray):
    import pyarrow as pa

    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


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
        "histogram": _list_column(hist),
    }
    if colors is not None:
        cols["color"] = _list_column(np.asarray(colors, np.float32))
    return pa.table(cols)


def _color_task(
    url: str,
    rows,
    so: dict[str, Any],
    max_pixels: int,
) -> np.ndarray:
    """Worker side: colour histograms of ``rows`` of a listing (zeros for unreadable images)."""
    out = np.zeros((len(rows), COLOR_BINS), np.float32)
    for i, blob in enumerate(io.iter_images(url, rows, so)):
        if isinstance(blob, BaseException):
            continue
        size = features.image_size(blob)
        if size is not None and size[0] * size[1] > max_pixels:
            continue
        bgr = _decode_color(blob)
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
    out_url: str | None,
    run_id: str,
    storage_options: dict[str, Any] | None = None,
    colors: Sequence | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Histograms of every image of ``parts``, written under ``out_url/histograms/``.

    ``colors``, when given, holds per part the colour histograms (arrays or the
    futures of :func:`color_parts`); they are written beside the word histograms.

    Returns
    -------
    results : list of dict
        Per part: ``histograms`` (n, k) float32, ``colors``, ``n_keypoints``,
        ``label``, ``path``, ``status``, ``sq_dist_sum``.
    files : list of str
        The written files, relative to ``out_url``.
    """
    so = dict(storage_options or {})
    centers_f = client.scatter(np.asarray(centers), broadcast=True)
    files, futures = [], []
    for i, (fut, name) in enumerate(zip(parts.parts, parts.names, strict=True)):
        rel = f"histograms/part-{i:05d}-{run_id}.parquet"
        url = io.join(out_url, rel) if out_url is not None else None
        if url is not None:
            files.append(rel)
        col = colors[i] if colors is not None else None
        futures.append(
            client.submit(
                _histogram_task, fut, centers_f, url, so, col, key=f"bovw-hist-{parts.token}-{name}"
            )
        )
    return client.gather(futures), files


# ---------------------------------------------------------------- new images (Dask)
def _encode_task(url: str, rows, so: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    """Worker side: read and encode one partition of a listing."""
    batch = encoder.encode(io.iter_images(url, rows, so))
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
) -> EncodedBatch:
    """Encode every image of ``listing`` (rows under ``url``) on the cluster.

    Returns
    -------
    EncodedBatch
        Rows in the order of ``listing``.
    """
    from distributed import as_completed

    from fruitdask.pipeline import _n_threads, plan_packed_partitions, plan_partitions

    if "row_group" in listing.columns:  # a packed input: whole row groups per task
        ranges = plan_packed_partitions(listing, partition_size)
    else:
        ranges = plan_partitions(len(listing), partition_size, _n_threads(client))
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
    if progress:
        done = 0
        for k, fut in enumerate(as_completed(futures), 1):
            done += len(fut.result()["status"])
            progress("extract", k, len(futures), done)
    res = client.gather(futures)
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
