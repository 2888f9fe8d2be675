"""PCA fits against sklearn's exact PCA, by principal angles and explained variance."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from sklearn.decomposition import PCA

from fruitdask.pca import (
    PcaModel,
    combine_moments,
    exact_pca,
    fit_incremental,
    moments,
    principal_angles,
)


def _descriptor_like(n: int, seed: int = 0) -> np.ndarray:
    """uint8 rows with a decaying spectrum, like ORB descriptors seen as bytes."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 32)) * (40.0 * 0.8 ** np.arange(32))
    mix, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    x = 128 + latent @ mix
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data():
    return _descriptor_like(60_000)


@pytest.fixture(scope="module")
def reference(data):
    return PCA(n_components=20, svd_solver="full").fit(data.astype(np.float64))


def test_moments_combine_equals_whole(data):
    parts = np.array_split(data, 7)
    total = moments(parts[0])
    for p in parts[1:]:
        total = combine_moments(total, moments(p))
    whole = moments(data)
    assert total.n == whole.n
    np.testing.assert_allclose(total.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(total.scatter, whole.scatter, rtol=1e-9)
    empty = moments(np.zeros((0, 32), np.uint8))
    assert combine_moments(empty, whole).n == whole.n


def test_exact_matches_sklearn(data, reference):
    parts = [moments(p) for p in np.array_split(data, 5)]
    total = parts[0]
    for p in parts[1:]:
        total = combine_moments(total, p)
    model = exact_pca(total, 20)
    assert principal_angles(model.components, reference.components_).max() < 1e-3
    np.testing.assert_allclose(model.explained_variance, reference.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(
        model.explained_variance_ratio, reference.explained_variance_ratio_, rtol=1e-8
    )
    # Same projection up to one sign per component.
    ours = model.transform(data[:500])
    ref = reference.transform(data[:500].astype(np.float64))
    signs = np.sign((ours * ref).sum(axis=0))
    np.testing.assert_allclose(ours, ref * signs, atol=2e-2)


def test_incremental_is_accurate_and_fast(dask_client, data, reference):
    x = da.from_array(data, chunks=(7_000, 32))
    model = fit_incremental(x, 20, batch_size=25_000, svd_solver="full")
    angles = principal_angles(model.components, reference.components_)
    # Leading components (well-separated eigenvalues) agree tightly.
    assert principal_angles(model.components[:10], reference.components_[:10]).max() < 0.5
    assert angles.max() < 5
    ev, ev_ref = model.explained_variance_ratio.sum(), reference.explained_variance_ratio_.sum()
    assert abs(ev - ev_ref) / ev_ref < 1e-3
    assert model.n_samples == len(data)
    np.testing.assert_allclose(model.mean, data.mean(axis=0), rtol=1e-6)


def test_dask_ml_defaults_are_worse(dask_client, data, reference):
    """Why the defaults are overridden: the randomized solver drifts off the subspace."""
    x = da.from_array(data, chunks=(7_000, 32))
    ours = fit_incremental(x, 20, batch_size=25_000, svd_solver="full")
    rand = fit_incremental(x, 20, batch_size=25_000, svd_solver="randomized")
    ours_err = principal_angles(ours.components, reference.components_).max()
    rand_err = principal_angles(rand.components, reference.components_).max()
    assert ours_err <= rand_err


def test_odd_tail_batch(dask_client):
    data = _descriptor_like(1_005, seed=3)
    x = da.from_array(data, chunks=(300, 32))
    model = fit_incremental(x, 20, batch_size=100)  # 1005 % 100 = 5 < 20 rows
    assert model.n_samples == 1_005


def test_model_round_trip(data):
    m = exact_pca(moments(data), 20)
    back = PcaModel.from_json(m.to_json())
    np.testing.assert_array_equal(back.components, m.components)
    np.testing.assert_array_equal(back.mean, m.mean)
    assert back.method == "exact" and back.n_samples == len(data)
    assert m.transform(data[:3]).dtype == np.float32


def test_principal_angles_known():
    a = np.eye(32)[:2]
    b = np.vstack([np.eye(32)[0], np.cos(0.3) * np.eye(32)[1] + np.sin(0.3) * np.eye(32)[2]])
    ang = principal_angles(a, b)
    np.testing.assert_allclose(ang, [0.0, np.degrees(0.3)], atol=1e-9)
