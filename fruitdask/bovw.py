"""Visual words: a dask-ml ``KMeans`` vocabulary on PCA'd ORB descriptors, and
one bag-of-visual-words histogram per image.

Two halves:

* pure NumPy helpers (:func:`assign_words`, :func:`word_histograms`,
  :func:`inertia`, :func:`color_histogram`, :class:`Encoder`), used the same way
  on the workers, in ``predict``'s single-image fast path and in the tests
  (against scikit-learn);
* :func:`fit_vocabulary`, dask-ml ``KMeans`` on a (Dask or NumPy) array.

The Dask stages that read and write tables with these are in :mod:`fruitdask.encode`.

Histogram table (one Parquet file per partition)::

    path, label, split : string
    n_keypoints        : int32
    has_keypoints      : bool     False -> all-zero histogram (nothing to count)
    status             : string   the pipeline's: ok | no_keypoints | error
    histogram          : list<float32>, length K, L1-normalised (sums to 1)
    color              : list<float32>, only with colour features
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from fruitdask import features
from fruitdask.errors import one_line
from fruitdask.pca import PcaModel

__all__ = [
    "COLOR_BINS",
    "HISTOGRAM_COLUMNS",
    "LOCAL_FIT_CELLS",
    "EncodedBatch",
    "Encoder",
    "Vocabulary",
    "assign_words",
    "color_histogram",
    "decode_color",
    "fit_vocabulary",
    "inertia",
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


def decode_color(data: bytes) -> np.ndarray | None:
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
                error.append(f"read failed: {one_line(blob)}")
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
                bgr = decode_color(blob)
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
#: Fit on the client (synchronous scheduler) when rows x words is at most this:
#: one Lloyd iteration is then ~0.1 s of one core, less than the ~20 round
#: trips of a fit on the cluster, and the workers never import dask-ml's
#: KMeans or compile its numba kernel (~3 s each, measured).
LOCAL_FIT_CELLS = 2**25


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
    fitted_on : {"client", "cluster"}
        Where dask-ml's KMeans ran (see :func:`fit_vocabulary`'s ``local``).
    """

    centers: np.ndarray
    n_iter: int
    fitted_on_rows: int
    init: str
    seconds: float
    fitted_on: str = "cluster"

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])


class _LloydProgress(logging.Handler):
    """dask-ml's KMeans takes no callback; its logger announces each Lloyd
    iteration's centre shift and end. Reports ``(iteration, shift)``."""

    def __init__(self, callback: Callable[[int, float], None]) -> None:
        super().__init__(logging.INFO)
        self.callback = callback
        self.shift = float("nan")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            args = record.args if isinstance(record.args, tuple) else ()
            if record.msg == "Shift: %0.4f" and args and isinstance(args[0], int | float):
                self.shift = float(args[0])
            elif record.msg == "Finished %s in %s" and str(args[0]).startswith("Lloyd loop"):
                self.callback(int(str(args[0]).split()[2].rstrip(".")) + 1, self.shift)
        except Exception:  # noqa: BLE001 - a progress note must never break the fit
            pass


@contextlib.contextmanager
def _lloyd_progress(callback: Callable[[int, float], None] | None) -> Iterator[None]:
    if callback is None:
        yield
        return
    logger = logging.getLogger("dask_ml.cluster.k_means")
    handler = _LloydProgress(callback)
    level, propagate = logger.level, logger.propagate
    if not logger.isEnabledFor(logging.INFO):  # INFO for this handler only
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _fit_input(x, local: bool):
    """``x`` as the float32 Dask array dask-ml's KMeans fits: a NumPy ``x`` in
    chunks of 65536 rows, a dask ``x`` to fit ``local`` gathered here."""
    import dask.array as da

    if isinstance(x, np.ndarray):
        x = np.asarray(x, dtype=np.float32)
        x = da.from_array(x, chunks=(max(1, min(len(x), 65536)), -1))
    elif local:  # gathered once, in its own chunks (the draws and sums depend on them)
        x = da.from_array(np.asarray(x.compute(), dtype=np.float32), chunks=x.chunks)
    return x.astype(np.float32)


def _fit_kmeans(x, k, seed, max_iter, tol, oversampling, init_rounds, init, progress):
    """dask-ml's ``KMeans`` fitted on ``x`` (the arguments are
    :func:`fit_vocabulary`'s), on whichever scheduler is in force."""
    from dask_ml.cluster import KMeans

    # dask-ml compares the summed squared centre shift with ``tol`` as given,
    # an absolute number; scikit-learn scales it by the data's mean variance.
    # PCA'd ORB features have variances in the hundreds, so an unscaled 1e-4
    # would run every fit to max_iter.
    tol_abs = tol * float(x.var(axis=0).mean().compute())
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
        tol=tol_abs,
        random_state=seed,
    )
    note = None if progress is None else lambda i, shift: progress(i, max_iter, shift, tol_abs)
    with _lloyd_progress(note):
        km.fit(x)
    return km


def fit_vocabulary(
    x,
    k: int,
    seed: int = 0,
    max_iter: int = 30,
    tol: float = 1e-4,
    oversampling: float = 2.0,
    init_rounds: int = 5,
    init: np.ndarray | None = None,
    local: bool | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
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
    local : bool, optional
        Run dask-ml's KMeans here with the synchronous scheduler instead of on
        the cluster. A dask ``x`` is first gathered and keeps its chunks, so
        the vocabulary is the one the cluster would fit (same k-means|| draws,
        same sums), without a round trip per iteration. Default: a NumPy ``x``,
        or ``n * k <= LOCAL_FIT_CELLS``.
    progress : callable, optional
        ``progress(iteration, max_iter, shift, tol)`` after each Lloyd
        iteration: the total squared shift of the centres and the absolute
        tolerance it is compared with (the fit stops when it falls below).
    """
    import dask

    n = int(x.shape[0])
    if n < k:
        raise ValueError(f"{k} visual words need at least {k} keypoints, got {n}")
    t = time.perf_counter()
    if local is None:
        local = isinstance(x, np.ndarray) or n * k <= LOCAL_FIT_CELLS
    x = _fit_input(x, local)
    with dask.config.set(scheduler="synchronous") if local else contextlib.nullcontext():
        km = _fit_kmeans(x, k, seed, max_iter, tol, oversampling, init_rounds, init, progress)
    centers = np.asarray(km.cluster_centers_, dtype=np.float32)
    return Vocabulary(
        centers=centers,
        n_iter=int(km.n_iter_),
        fitted_on_rows=n,
        init="array" if init is not None else "k-means||",
        seconds=time.perf_counter() - t,
        fitted_on="client" if local else "cluster",
    )
