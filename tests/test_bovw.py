"""fruitdask.bovw: the visual-word kernels and the dask-ml KMeans vocabulary against
scikit-learn (the Dask stages that use them are tested in test_encode.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fruitdask import bovw


def _blobs(n_per: int, centres: np.ndarray, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [c + scale * rng.standard_normal((n_per, centres.shape[1])) for c in centres]
    )
    return x[rng.permutation(len(x))].astype(np.float32)


# ---------------------------------------------------------------- pure helpers
def test_assign_words_matches_sklearn():
    from sklearn.metrics import pairwise_distances_argmin_min

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5000, 20)) * 80).astype(np.float32)
    centers = (rng.standard_normal((64, 20)) * 80).astype(np.float32)
    words, sq = bovw.assign_words(x, centers)
    ref_words, ref_dist = pairwise_distances_argmin_min(
        x.astype(np.float64), centers.astype(np.float64)
    )
    np.testing.assert_array_equal(words, ref_words)
    np.testing.assert_allclose(sq, ref_dist**2, rtol=1e-9, atol=1e-6)
    assert words.dtype == np.int32
    assert bovw.inertia(x, centers) == pytest.approx(float((ref_dist**2).sum()), rel=1e-12)


def test_assign_words_blocks_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1000, 5))
    c = rng.standard_normal((7, 5))
    whole = bovw.assign_words(x, c)
    monkeypatch.setattr(bovw, "_ASSIGN_BLOCK", 97)
    blocked = bovw.assign_words(x, c)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_allclose(whole[1], blocked[1])


def test_word_histograms_match_a_loop():
    rng = np.random.default_rng(5)
    k = 11
    counts = np.array([3, 0, 7, 1, 0, 25])
    words = rng.integers(0, k, counts.sum())
    h = bovw.word_histograms(words, counts, k)
    assert h.shape == (6, k) and h.dtype == np.float32
    start = 0
    for i, n in enumerate(counts):
        ref = np.bincount(words[start : start + n], minlength=k).astype(np.float64)
        if n:
            ref /= n
        np.testing.assert_allclose(h[i], ref, rtol=1e-6)
        start += n
    np.testing.assert_allclose(h.sum(1), (counts > 0).astype(float), rtol=1e-6)
    with pytest.raises(ValueError, match="counts sum"):
        bovw.word_histograms(words[:-1], counts, k)


def test_color_histogram():
    white = np.full((100, 100, 3), 255, np.uint8)
    assert not bovw.color_histogram(white).any()
    red = white.copy()
    cv2.circle(red, (50, 50), 30, (0, 0, 220), -1)  # BGR: red disc on white
    h = bovw.color_histogram(red)
    assert h.shape == (bovw.COLOR_BINS,) and h.sum() == pytest.approx(1.0)
    hs = h[: 12 * 4].reshape(12, 4)
    # hue bin 0 (red) only: the white is left out; hue-saturation and value
    # bins count the same pixels, so each part holds half of the mass
    assert hs.sum() == pytest.approx(0.5) and hs[0].sum() == pytest.approx(0.5)


# ---------------------------------------------------------------- dask-ml KMeans vs sklearn
def test_kmeans_from_the_same_start_matches_sklearn(dask_client):
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(11)
    centres = rng.uniform(-100, 100, (8, 6))
    x = _blobs(400, centres, 15.0, 12)
    init = x[:8].copy()
    voc = bovw.fit_vocabulary(x, 8, init=init, max_iter=100, tol=1e-9)
    ref = KMeans(8, init=init, n_init=1, max_iter=100, tol=1e-9, algorithm="lloyd").fit(x)
    np.testing.assert_allclose(voc.centers, ref.cluster_centers_, rtol=1e-4, atol=1e-3)
    words, _ = bovw.assign_words(x, voc.centers)
    np.testing.assert_array_equal(words, ref.predict(x))
    assert voc.init == "array" and voc.k == 8


def test_kmeans_parallel_init_inertia_close_to_sklearn(dask_client):
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(21)
    centres = rng.uniform(-200, 200, (30, 10))
    x = _blobs(200, centres, 30.0, 22)
    voc = bovw.fit_vocabulary(x, 30, seed=1)
    ours = bovw.inertia(x, voc.centers)
    ref = KMeans(30, n_init=3, random_state=0).fit(x)
    # k-means|| is a different (scalable) initialisation: close, not equal
    assert ours <= 1.05 * ref.inertia_, (ours, ref.inertia_)
    assert voc.fitted_on_rows == len(x)


def test_kmeans_refuses_fewer_points_than_words():
    with pytest.raises(ValueError, match="at least 50 keypoints"):
        bovw.fit_vocabulary(np.zeros((10, 3), np.float32), 50)


def _scattered(client, x: np.ndarray, sizes: list[int]):
    """``x`` as a dask array of futures on the cluster, in chunks of ``sizes`` rows."""
    import dask.array as da

    cuts = np.cumsum([0, *sizes])
    futures = client.scatter([x[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    blocks = [
        da.from_delayed(f, shape=(n, x.shape[1]), dtype=x.dtype)
        for f, n in zip(futures, sizes, strict=True)
    ]
    return da.concatenate(blocks, axis=0)


def test_a_fit_on_the_client_is_the_fit_on_the_cluster(dask_client):
    """The small-sample route (gathered, synchronous scheduler, same chunks) gives
    the vocabulary the cluster gives: the same k-means|| draws and Lloyd sums."""
    rng = np.random.default_rng(31)
    x = _blobs(150, rng.uniform(-100, 100, (20, 8)), 25.0, 32)
    arr = _scattered(dask_client, x, [1000, 700, 1300])
    on_cluster = bovw.fit_vocabulary(arr, 20, seed=3, local=False)
    on_client = bovw.fit_vocabulary(arr, 20, seed=3, local=True)
    assert (on_cluster.fitted_on, on_client.fitted_on) == ("cluster", "client")
    np.testing.assert_array_equal(on_client.centers, on_cluster.centers)
    assert on_client.n_iter == on_cluster.n_iter
    # the default picks the client for a sample this small
    assert bovw.fit_vocabulary(arr, 20, seed=3).fitted_on == "client"
    assert 3000 * 20 <= bovw.LOCAL_FIT_CELLS


def test_progress_reports_every_lloyd_iteration():
    rng = np.random.default_rng(41)
    x = _blobs(300, rng.uniform(-100, 100, (10, 5)), 20.0, 42)
    seen = []
    voc = bovw.fit_vocabulary(x, 10, seed=0, max_iter=50, progress=lambda *a: seen.append(a))
    assert [s[0] for s in seen] == list(range(1, voc.n_iter + 1))
    assert all(s[1] == 50 for s in seen)
    shifts, tol = [s[2] for s in seen], seen[-1][3]
    assert tol > 0 and all(np.isfinite(shifts))
    if voc.n_iter < 50:  # stopped because the last shift fell below the tolerance
        assert shifts[-1] < tol and all(s >= tol for s in shifts[:-1])
    # the logger is left as it was
    import logging

    logger = logging.getLogger("dask_ml.cluster.k_means")
    assert not logger.handlers and logger.propagate
