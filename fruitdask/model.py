"""The classifier and its one-file format: bag-of-words histograms -> class probabilities.

The whole model (ORB settings, PCA, vocabulary, classifier, class names,
training facts) is ONE file tagged ``fruitdask-model/1``: a zip of a
``model.json``, the PCA as ``pca.json`` and the arrays as ``arrays.npz``. No
pickle, and the file is untrusted input (a model may be fetched from a URL):
:meth:`Model.from_bytes` checks member sizes in the zip directory and the
``.npy`` headers before inflating anything, caps the JSON's size and depth,
checks every array's shape and dtype against the declared dimensions, and
caps the ORB settings at the local ones. The classifier is applied with NumPy,
so ``predict`` needs neither scikit-learn nor Dask.
"""

from __future__ import annotations

import io as _io
import json
import struct
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from fruitdask import features
from fruitdask.bovw import COLOR_BINS, EncodedBatch, Encoder
from fruitdask.errors import ModelError, one_line
from fruitdask.pca import PcaModel

__all__ = [
    "CLASSIFIERS",
    "DEFAULT_CLASSIFIER",
    "FORMAT",
    "NO_KEYPOINTS",
    "LinearClassifier",
    "Model",
    "Prediction",
    "design_matrix",
    "feature_map",
    "fit_classifier",
]

FORMAT = "fruitdask-model/1"

#: Classifier name -> (feature map, default C). Both are multinomial logistic
#: regression; "logreg-hellinger" first takes the square root of the L1
#: histograms (the Hellinger / power-normalisation map, Perronnin et al. 2010),
#: so a linear model compares bags of words the way a Hellinger kernel would.
#: The C values were chosen on a generated set (seed 11) that is not used for
#: the reported accuracy (benchmarks/bovw_accuracy.py).
CLASSIFIERS: dict[str, tuple[str, float]] = {
    "logreg": ("identity", 100.0),
    "logreg-hellinger": ("sqrt", 1.0),
}
DEFAULT_CLASSIFIER = "logreg-hellinger"


# ---------------------------------------------------------------- features -> X
def feature_map(h: np.ndarray, kind: str) -> np.ndarray:
    """Map L1-normalised histograms before the linear model.

    Parameters
    ----------
    h : ndarray of shape (n, m), non-negative
    kind : {"identity", "sqrt"}
        ``sqrt`` turns an L1-normalised row into a unit-L2 row (Hellinger map).
    """
    if kind == "identity":
        return np.asarray(h, dtype=np.float64)
    if kind == "sqrt":
        return np.sqrt(np.asarray(h, dtype=np.float64))
    raise ModelError(f"unknown feature map {kind!r}")


def design_matrix(histograms: np.ndarray, colors: np.ndarray | None, kind: str) -> np.ndarray:
    """The classifier's input: mapped word histograms, then mapped colour histograms.

    Returns
    -------
    ndarray of shape (n, k [+ COLOR_BINS]), float64
    """
    parts = [feature_map(histograms, kind)]
    if colors is not None:
        parts.append(feature_map(colors, kind))
    return np.hstack(parts) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class LinearClassifier:
    """A fitted multinomial (or binary) logistic regression, applied with NumPy.

    Attributes
    ----------
    classes : tuple of str
    coef : ndarray of shape (n_classes, n_features), or (1, n_features) for 2 classes
    intercept : ndarray of shape (n_classes,) or (1,)
    """

    classes: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, as scikit-learn's ``predict_proba``.

        Returns
        -------
        ndarray of shape (n, n_classes), float64
        """
        z = np.asarray(x, dtype=np.float64) @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary: scikit-learn keeps one row, the positive class
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.column_stack([1.0 - p, p])
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def fit_classifier(
    x: np.ndarray, y: Sequence[str] | np.ndarray, c: float, seed: int = 0, max_iter: int = 2000
) -> tuple[LinearClassifier, dict[str, Any]]:
    """Fit scikit-learn's ``LogisticRegression`` (lbfgs, multinomial).

    Returns
    -------
    classifier : LinearClassifier
    info : dict
        ``n_iter`` and whether it converged.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(list(y), dtype=object)
    if len(set(labels)) < 2:
        raise ModelError(
            f"a classifier needs images of at least 2 labels, got {sorted(set(labels))}"
        )
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    model = LinearClassifier(
        classes=tuple(str(c_) for c_ in clf.classes_),
        coef=np.asarray(clf.coef_, dtype=np.float64),
        intercept=np.asarray(clf.intercept_, dtype=np.float64),
    )
    return model, {"n_iter": int(np.max(clf.n_iter_)), "converged": converged}


# ---------------------------------------------------------------- the model
@dataclass(frozen=True)
class Prediction:
    """The answer for one image.

    Attributes
    ----------
    image : str
    status : {"ok", "no_keypoints", "error"}
    top : list of (label, probability)
        Best first; empty unless ``status == "ok"``.
    n_keypoints : int
    latency_ms : float
        Decode + ORB + PCA + words + classifier, reading the bytes excluded.
    message : str
        ``"no keypoints: cannot classify"`` or the error, else ``""``.
    """

    image: str
    status: str
    top: list[tuple[str, float]]
    n_keypoints: int
    latency_ms: float
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "status": self.status,
            "top": [{"label": lab, "probability": round(p, 6)} for lab, p in self.top],
            "n_keypoints": self.n_keypoints,
            "latency_ms": round(self.latency_ms, 3),
            "message": self.message,
        }


NO_KEYPOINTS = "no keypoints: cannot classify"


@dataclass(frozen=True)
class Model:
    """Everything that takes image bytes to class probabilities.

    Attributes
    ----------
    encoder : fruitdask.bovw.Encoder
        ORB settings, PCA, vocabulary, colour features or not.
    classifier : LinearClassifier
    kind : str
        A key of :data:`CLASSIFIERS`.
    meta : dict
        Training facts (input, counts, class counts, versions ...).
    """

    encoder: Encoder
    classifier: LinearClassifier
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.classifier.classes

    @property
    def feature_map(self) -> str:
        return CLASSIFIERS[self.kind][0]

    def predict_proba_batch(self, batch: EncodedBatch) -> np.ndarray:
        """Probabilities for the rows of ``batch`` (rows without keypoints included:
        the caller decides what to do with them), shape (n, n_classes)."""
        x = design_matrix(batch.histograms, batch.colors, self.feature_map)
        return self.classifier.predict_proba(x)

    def predict_bytes(self, data: bytes, name: str = "", top_k: int = 3, orb=None) -> Prediction:
        """Classify one encoded image, in this process (no Dask)."""
        t = time.perf_counter()
        batch = self.encoder.encode([data], orb)
        status = batch.status[0]
        n_kp = int(batch.n_keypoints[0])
        if status != "ok":
            msg = NO_KEYPOINTS if status == "no_keypoints" else str(batch.error[0])
            return Prediction(name, status, [], n_kp, (time.perf_counter() - t) * 1e3, msg)
        p = self.predict_proba_batch(batch)[0]
        order = np.argsort(-p, kind="stable")[: max(1, top_k)]
        top = [(self.classes[i], float(p[i])) for i in order]
        return Prediction(name, "ok", top, n_kp, (time.perf_counter() - t) * 1e3)

    # -- serialisation
    def to_bytes(self) -> bytes:
        """The ``fruitdask-model/1`` zip."""
        enc = self.encoder
        doc = {
            "format": FORMAT,
            "classifier": {
                "kind": self.kind,
                "feature_map": self.feature_map,
                "classes": list(self.classes),
                "n_features": int(self.classifier.coef.shape[1]),
            },
            "vocabulary": {"k": enc.k, "n_features": int(enc.centers.shape[1])},
            "color": {"enabled": enc.color, "bins": COLOR_BINS if enc.color else 0},
            "orb": asdict(enc.orb),
            "meta": self.meta,
        }
        arrays = _io.BytesIO()
        np.savez(
            arrays,
            centers=np.asarray(enc.centers, np.float32),
            coef=self.classifier.coef,
            intercept=self.classifier.intercept,
        )
        buf = _io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("model.json", json.dumps(doc, indent=1, sort_keys=True))
            z.writestr("pca.json", enc.pca.to_json())
            z.writestr("arrays.npz", arrays.getvalue())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "model", max_pixels: int | None = None) -> Model:
        """Read a ``fruitdask-model/1`` zip, as untrusted input.

        Parameters
        ----------
        max_pixels : int, optional
            The decompression-bomb guard to apply: the model's own setting is
            capped at this (the local one), so a model cannot switch it off.

        Raises
        ------
        ModelError
            One line: not a model, damaged, or outside the bounds checked here.
        """
        with _ModelZip(data, where) as z:
            try:
                doc = _json(z.read("model.json"), "model.json", where)
                pca = _pca(_json(z.read("pca.json"), "pca.json", where), where)
                orb = _orb(doc.get("orb"), where, max_pixels)
                c, color = doc["classifier"], doc["color"]
                kind = str(c["kind"])
                if kind not in CLASSIFIERS:
                    raise ModelError(f"{where}: unknown classifier {kind[:100]!r}")
                classes = tuple(str(x) for x in c["classes"])
                color_on = bool(color["enabled"])
                k = int(doc["vocabulary"]["k"])
                meta = _meta(doc.get("meta"), where)
            except (
                KeyError,
                TypeError,
                ValueError,
                AttributeError,
                OverflowError,
                IndexError,
            ) as exc:
                raise ModelError(f"{where}: damaged model ({one_line(exc)})") from None
            if not 2 <= len(classes) <= _MAX_CLASSES or not 2 <= k <= _MAX_WORDS:
                raise ModelError(f"{where}: damaged model ({len(classes)} classes, {k} words)")
            rows = 1 if len(classes) == 2 else len(classes)
            n_in = k + (COLOR_BINS if color_on else 0)
            expected = {
                "centers": ((k, pca.n_components), np.float32),
                "coef": ((rows, n_in), np.float64),
                "intercept": ((rows,), np.float64),
            }
            need = sum(_npy_bytes(shape, dtype) for shape, dtype in expected.values())
            if need > _MEMBER_CAPS["arrays.npz"]:
                raise ModelError(
                    f"{where}: model too large ({len(classes)} classes x {n_in} features: "
                    f"{need:,} bytes of arrays, at most {_MEMBER_CAPS['arrays.npz']:,})"
                )
            # the arrays are inflated only up to what these dimensions need
            arrays = _arrays(z.read("arrays.npz", need + _NPZ_OVERHEAD), where, expected)
        return cls(
            encoder=Encoder(orb=orb, pca=pca, centers=arrays["centers"], color=color_on),
            classifier=LinearClassifier(classes, arrays["coef"], arrays["intercept"]),
            kind=kind,
            meta=meta,
        )


# ---------------------------------------------------------------- reading untrusted files
_MEMBER_CAPS = {"model.json": 4 << 20, "pca.json": 1 << 20, "arrays.npz": 256 << 20}
_MAX_CLASSES = 100_000
_MAX_WORDS = 100_000
#: JSON nesting allowed (a model's documents are 3 deep); nothing walks deeper ones.
_MAX_DEPTH = 32
#: Zip and .npy headers around the arrays' bytes in arrays.npz.
_NPZ_OVERHEAD = 64 << 10
#: The largest weight of a classifier: with inputs in [0, 1] and at most
#: ~10^5 features, the scores stay far from overflowing float64, so the
#: probabilities are always numbers (real models have weights below ~10^3).
_MAX_WEIGHT = 1e100
#: The compression methods read: fruitdask writes deflate, np.savez stores.
#: zipfile inflates bzip2 and LZMA members whole, whatever size they declare.
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
#: What zipfile raises on a damaged stream or header besides BadZipFile.
_STREAM_ERRORS = (OSError, ValueError, zipfile.LargeZipFile, zlib.error, struct.error)


def _checked_info(z: zipfile.ZipFile, name: str, cap: int, where: str) -> zipfile.ZipInfo:
    """A member's directory entry, refused before a byte of it is inflated when it
    is encrypted, compressed with a method not read, or declares more than ``cap``
    (zipfile then stops inflating at the declared size)."""
    info = z.getinfo(name)
    if info.flag_bits & 0x1:
        raise ModelError(f"{where}: {name} is encrypted")
    if info.compress_type not in _METHODS:
        raise ModelError(
            f"{where}: {name} is compressed with method {info.compress_type} "
            f"(only {' or '.join(_METHODS.values())} are read)"
        )
    if info.file_size > cap:
        raise ModelError(f"{where}: {name} declares {info.file_size:,} bytes (at most {cap:,})")
    return info


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's declared bytes (see :func:`_read_bounded`)."""
    with z.open(info) as f:
        return _read_bounded(f, info.file_size)


def _read_bounded(f, n: int) -> bytes:
    """``n`` bytes of an open member at most, inflated 1 MiB at a time.
    ``ZipFile.read`` (and ``read()`` of an open member) inflates all of the
    compressed bytes in one call and cuts to the declared size afterwards: 3 MB
    of deflate declaring 1 KB took 3.27 GB."""
    out = bytearray()
    while len(out) < n:
        chunk = f.read(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class _ModelZip:
    """The model's zip, its members read one at a time, each checked first."""

    def __init__(self, data: bytes, where: str) -> None:
        self.where = where
        try:
            self.z = zipfile.ZipFile(_io.BytesIO(data))
        except (zipfile.BadZipFile, EOFError, NotImplementedError) as exc:
            raise ModelError(f"{where}: not a fruitdask model ({one_line(exc)})") from None
        except _STREAM_ERRORS as exc:
            raise ModelError(f"{where}: damaged model ({one_line(exc)})") from None

    def __enter__(self) -> _ModelZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.z.close()

    def read(self, name: str, cap: int | None = None) -> bytes:
        cap = min(cap, _MEMBER_CAPS[name]) if cap is not None else _MEMBER_CAPS[name]
        try:
            return _read_member(self.z, _checked_info(self.z, name, cap, self.where))
        except KeyError:
            raise ModelError(f"{self.where}: not a fruitdask model (no {name})") from None
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
            raise ModelError(f"{self.where}: not a fruitdask model ({one_line(exc)})") from None
        except _STREAM_ERRORS as exc:  # a bad stream, CRC ...
            raise ModelError(f"{self.where}: damaged model ({one_line(exc)})") from None


def _depth(doc: Any) -> int:
    """How deeply a parsed JSON document nests (iteratively: no recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, d)
            if d <= _MAX_DEPTH:
                stack.extend(
                    (x, d + 1) for x in (node.values() if isinstance(node, dict) else node)
                )
    return deepest


def _json(raw: bytes, name: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{where}: {name} is not JSON ({one_line(exc)})") from None
    except RecursionError:
        raise ModelError(f"{where}: {name} is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{where}: {name} is not a JSON object")
    if _depth(doc) > _MAX_DEPTH:
        raise ModelError(f"{where}: {name} is nested too deeply (more than {_MAX_DEPTH} levels)")
    if name == "model.json" and doc.get("format") != FORMAT:
        got = doc.get("format")
        got = got[:100] if isinstance(got, str) else type(got).__name__
        raise ModelError(f"{where}: model format {got!r} is not supported (expected {FORMAT})")
    return doc


def _meta(meta: Any, where: str) -> dict[str, Any]:
    """The training facts; ``class_counts`` (the evaluation's baseline) checked."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ModelError(f"{where}: damaged model (meta is a {type(meta).__name__}, not an object)")
    counts = meta.get("class_counts")
    if counts is not None and not (
        isinstance(counts, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values())
    ):
        raise ModelError(f"{where}: damaged model (meta.class_counts is not label -> count)")
    return dict(meta)


def _pca(doc: dict[str, Any], where: str) -> PcaModel:
    pca = PcaModel.from_dict(doc)
    k = pca.n_components
    width = features.DESCRIPTOR_BYTES
    shapes = (pca.mean.shape, pca.components.shape, pca.explained_variance.shape)
    if shapes != ((width,), (k, width), (k,)) or not 1 <= k <= width:
        raise ModelError(f"{where}: damaged model (a PCA of shapes {shapes} for {width}-byte ORB)")
    if not all(np.isfinite(a).all() for a in (pca.mean, pca.components)):
        raise ModelError(f"{where}: damaged model (the PCA holds NaN or infinity)")
    return pca


def _orb(doc: Any, where: str, max_pixels: int | None) -> features.OrbParams:
    if not isinstance(doc, dict):
        raise ModelError(f"{where}: damaged model (no ORB settings)")
    names = {f.name for f in fields(features.OrbParams)}
    params = {k: v for k, v in doc.items() if k in names}
    try:
        orb = features.OrbParams(**params)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: ORB settings out of bounds ({one_line(exc)})") from None
    cap = max_pixels or features.DEFAULT_MAX_PIXELS
    if orb.max_pixels > cap:
        from dataclasses import replace

        orb = replace(orb, max_pixels=cap)
    return orb


def _npy_bytes(shape: tuple, dtype: Any) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    return read(f, max_header_size=10_000)


def _arrays(raw: bytes, where: str, expected: dict[str, tuple[tuple, Any]]) -> dict:
    """The npz's arrays, each checked against its expected shape and dtype from
    the ``.npy`` header, before its data is read."""
    out = {}
    try:
        with zipfile.ZipFile(_io.BytesIO(raw)) as z:
            for name, (shape, dtype) in expected.items():
                need = _npy_bytes(shape, dtype)
                info = _checked_info(z, f"{name}.npy", need + 4096, where)
                with z.open(info) as f:
                    got_shape, fortran, got_dtype = _npy_header(f)
                    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype):
                        raise ModelError(
                            f"{where}: damaged model ({name} is {got_dtype}{list(got_shape)}, "
                            f"expected {np.dtype(dtype)}{list(shape)})"
                        )
                    body = _read_bounded(f, need)
                arr = np.frombuffer(body, dtype=got_dtype).copy()
                out[name] = arr.reshape(shape, order="F" if fortran else "C")
                if not np.isfinite(out[name]).all():
                    raise ModelError(f"{where}: damaged model ({name} holds NaN or infinity)")
                if name != "centers" and out[name].size and np.abs(out[name]).max() > _MAX_WEIGHT:
                    raise ModelError(
                        f"{where}: damaged model ({name} holds weights beyond {_MAX_WEIGHT:g})"
                    )
    except ModelError:
        raise
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError, NotImplementedError,
            *_STREAM_ERRORS) as exc:  # fmt: skip
        raise ModelError(f"{where}: damaged model ({one_line(exc)})") from None
    return out
