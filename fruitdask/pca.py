"""Fitting and applying PCA on ORB descriptors held in a Dask cluster.

Two fits:

* ``incremental``: dask-ml ``IncrementalPCA`` with a full SVD and large batches,
  fitted on a uniform random sample of the descriptors (or all of them).
  Its defaults are neither fast nor accurate here (160-row batches; a randomized
  solver measured 22-50 degrees off the exact subspace).
* ``exact``: a one-pass tree reduction of per-partition moments (count, mean,
  centred scatter matrix, combined with Chan et al.'s pairwise update), then an
  eigendecomposition of the 32x32 covariance. Exact and parallel.

The per-partition moments are computed anyway (they are cheap), so every run can
report how far the incremental subspace is from the exact one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Moments",
    "PcaModel",
    "combine_moments",
    "exact_pca",
    "exact_report",
    "fit_incremental",
    "moments",
    "pca_report",
    "principal_angles",
    "variance_captured",
]


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a block of rows.

    Attributes
    ----------
    n : int
    mean : ndarray of shape (n_features,), float64
    scatter : ndarray of shape (n_features, n_features), float64
        Sum of outer products of the centred rows.
    """

    n: int
    mean: np.ndarray
    scatter: np.ndarray


def moments(x: np.ndarray) -> Moments:
    """Moments of ``x`` (n_rows, n_features); any numeric dtype."""
    xf = np.asarray(x, dtype=np.float64)
    n = xf.shape[0]
    d = xf.shape[1] if xf.ndim == 2 else 0
    if n == 0:
        return Moments(0, np.zeros(d), np.zeros((d, d)))
    mean = xf.mean(axis=0)
    c = xf - mean
    return Moments(n, mean, c.T @ c)


def combine_moments(a: Moments, b: Moments) -> Moments:
    """Merge two blocks' moments exactly (Chan, Golub & LeVeque 1979)."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    scatter = a.scatter + b.scatter + np.outer(delta, delta) * (a.n * b.n / n)
    return Moments(n, mean, scatter)


@dataclass(frozen=True)
class PcaModel:
    """A fitted PCA.

    Attributes
    ----------
    mean : ndarray of shape (n_features,), float64
    components : ndarray of shape (n_components, n_features), float64
        Rows are orthonormal principal axes, by decreasing variance.
    explained_variance : ndarray of shape (n_components,)
    explained_variance_ratio : ndarray of shape (n_components,)
    n_samples : int
    method : str
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_samples: int
    method: str

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Centre and project rows of ``x`` (n, n_features) -> float32 (n, n_components).

        The mean is subtracted (as sklearn and dask-ml do; Spark's PCAModel does not).
        """
        xf = np.asarray(x, dtype=np.float32)
        comps = self.components.astype(np.float32)
        return (xf - self.mean.astype(np.float32)) @ comps.T

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "fruitdask-pca/1",
            "method": self.method,
            "n_samples": int(self.n_samples),
            "n_components": self.n_components,
            "n_features": int(self.components.shape[1]),
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "explained_variance": self.explained_variance.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PcaModel:
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float64),
            components=np.asarray(d["components"], dtype=np.float64),
            explained_variance=np.asarray(d["explained_variance"], dtype=np.float64),
            explained_variance_ratio=np.asarray(d["explained_variance_ratio"], dtype=np.float64),
            n_samples=int(d["n_samples"]),
            method=str(d["method"]),
        )

    @classmethod
    def from_json(cls, text: str) -> PcaModel:
        return cls.from_dict(json.loads(text))


def _flip_signs(components: np.ndarray) -> np.ndarray:
    # Deterministic signs: the largest-magnitude loading of each axis is positive,
    # so two fits of the same subspace compare component by component.
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), idx])
    signs[signs == 0] = 1
    return components * signs[:, None]


def exact_pca(m: Moments, n_components: int) -> PcaModel:
    """Exact PCA from combined moments (eigendecomposition of the covariance)."""
    if m.n < 2:
        raise ValueError(f"PCA needs at least 2 descriptors, got {m.n}")
    cov = m.scatter / (m.n - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)
    evecs = evecs[:, order]
    k = n_components
    total = evals.sum()
    return PcaModel(
        mean=m.mean.copy(),
        components=_flip_signs(evecs[:, :k].T.copy()),
        explained_variance=evals[:k].copy(),
        explained_variance_ratio=(evals[:k] / total) if total > 0 else np.zeros(k),
        n_samples=int(m.n),
        method="exact",
    )


def fit_incremental(
    x, n_components: int, batch_size: int = 262144, svd_solver: str = "full"
) -> PcaModel:
    """Fit dask-ml ``IncrementalPCA``.

    Parameters
    ----------
    x : ndarray or dask.array of shape (n_rows, n_features), known chunk sizes
        Cast to float32 here (dask-ml does not cast uint8). A NumPy array (e.g. a
        sample gathered to the client) is fitted in this process with the
        synchronous scheduler: no round trips to a cluster for a few MB of rows.
    batch_size : int
        Rows per ``partial_fit``. Large batches keep the serial walk short; each
        batch's SVD runs as a TSQR over its chunks.
    """
    import dask
    import dask.array as da
    from dask_ml.decomposition import IncrementalPCA

    if x.shape[0] < n_components:
        raise ValueError(
            f"PCA with {n_components} components needs at least {n_components} "
            f"descriptors, got {x.shape[0]}"
        )
    local = isinstance(x, np.ndarray)
    if local:
        x = da.from_array(np.asarray(x, dtype=np.float32), chunks=(min(batch_size, 65536), -1))
    x = x.astype(np.float32)
    batch = max(int(batch_size), n_components)
    ipca = IncrementalPCA(n_components=n_components, svd_solver=svd_solver, batch_size=batch)
    # A final batch smaller than n_components would make partial_fit refuse it;
    # dask-ml's gen_batches would produce one when n_rows % batch < n_components.
    n = x.shape[0]
    if 0 < n % batch < n_components and n > batch:
        batch = batch + n % batch
        ipca.batch_size = batch
    # The first partial_fit divides by a zero previous variance (harmless: dask-ml
    # discards that value), which would print a RuntimeWarning on every run.
    with np.errstate(invalid="ignore", divide="ignore"):
        if local:
            with dask.config.set(scheduler="synchronous"):
                ipca.fit(x)
        else:
            ipca.fit(x)
    comps = np.asarray(ipca.components_, dtype=np.float64)
    flipped = _flip_signs(comps)
    return PcaModel(
        mean=np.asarray(ipca.mean_, dtype=np.float64),
        components=flipped,
        explained_variance=np.asarray(ipca.explained_variance_, dtype=np.float64),
        explained_variance_ratio=np.asarray(ipca.explained_variance_ratio_, dtype=np.float64),
        n_samples=int(ipca.n_samples_seen_),
        method="incremental",
    )


def variance_captured(model: PcaModel, m: Moments) -> float:
    """Fraction of the variance of the data summarised by ``m`` that ``model``'s
    subspace captures; equals the exact PCA's explained variance ratio when the
    subspaces agree. Evaluates a model fitted on a sample against all the data."""
    if m.n < 2:
        return 0.0
    cov = m.scatter / (m.n - 1)
    total = float(np.trace(cov))
    c = model.components
    return float(np.einsum("ij,jk,ik->", c, cov, c) / total) if total > 0 else 0.0


def pca_report(model: PcaModel, total: Moments) -> dict[str, Any]:
    """How good a fitted PCA is, judged on every descriptor (``total``'s moments):
    the variance its subspace captures beside the exact PCA's, and the principal
    angles between the two subspaces."""
    exact = exact_pca(total, model.n_components)
    angles = principal_angles(model.components, exact.components)
    return {
        "method": model.method,
        "n_components": model.n_components,
        "fitted_on_rows": int(model.n_samples),
        "sampled": bool(model.n_samples < total.n),
        "explained_variance_ratio": variance_captured(model, total),
        "exact_explained_variance_ratio": float(exact.explained_variance_ratio.sum()),
        "max_principal_angle_to_exact_deg": float(angles.max()),
        "principal_angles_to_exact_deg": [round(float(a), 4) for a in angles],
    }


def exact_report(model: PcaModel) -> dict[str, Any]:
    """:func:`pca_report` of a model that is itself the exact PCA of every
    descriptor (fitted on all of them): nothing to compare it with."""
    ratio = float(model.explained_variance_ratio.sum())
    return {
        "method": model.method,
        "n_components": model.n_components,
        "fitted_on_rows": int(model.n_samples),
        "sampled": False,
        "explained_variance_ratio": ratio,
        "exact_explained_variance_ratio": ratio,
        "max_principal_angle_to_exact_deg": 0.0,
        "principal_angles_to_exact_deg": [0.0] * model.n_components,
    }


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles in degrees between the row spaces of ``a`` and ``b``.

    Parameters
    ----------
    a, b : ndarray of shape (k, n_features)

    Returns
    -------
    ndarray of shape (k,), ascending.
    """
    qa, _ = np.linalg.qr(np.asarray(a, dtype=np.float64).T)
    qb, _ = np.linalg.qr(np.asarray(b, dtype=np.float64).T)
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return np.degrees(np.arccos(np.clip(s, -1.0, 1.0)))
