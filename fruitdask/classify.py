"""Which fruit is this? Train, evaluate and apply a bag-of-visual-words classifier.

The chain the original job planned after PCA::

    images -> ORB -> PCA (the feature pipeline, reused when already done)
           -> visual words (dask-ml KMeans) -> one histogram per image
           -> logistic regression -> class probabilities

The whole model (ORB settings, PCA, vocabulary, classifier, class names,
library versions) is ONE file, ``fruitdask-model.zip``, tagged
``fruitdask-model/1``: a ``model.json``, the PCA as ``pca.json`` and the arrays
as ``arrays.npz`` (read with ``allow_pickle=False``). No pickle: a model may be
fetched from a URL, and unpickling runs arbitrary code. The classifier is
applied with NumPy, so ``predict`` needs neither scikit-learn nor Dask.

Train output layout::

    OUT/pipeline/                      a complete ``fruitdask run`` output (Training split)
    OUT/histograms/part-00000-<run>.parquet   one row per image (see fruitdask.bovw)
    OUT/fruitdask-model.zip            the model
    OUT/manifest.json                  settings, counts, per-stage timings
    OUT/_SUCCESS                       written last; holds the run id
"""

from __future__ import annotations

import io as _io
import json
import os
import posixpath
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fruitdask import features, io
from fruitdask.bovw import COLOR_BINS, EncodedBatch, Encoder
from fruitdask.pca import PcaModel

__all__ = [
    "CLASSIFIERS",
    "FORMAT",
    "MODEL_FILE",
    "EvaluationSummary",
    "LinearClassifier",
    "Model",
    "ModelError",
    "Prediction",
    "TrainOptions",
    "TrainSummary",
    "check_evaluation_output",
    "check_train_output",
    "compute_metrics",
    "design_matrix",
    "evaluate",
    "feature_map",
    "fit_classifier",
    "load_model",
    "model_url",
    "predict_sources",
    "reusable_features",
    "train",
]

FORMAT = "fruitdask-model/1"
MODEL_FILE = "fruitdask-model.zip"
TRAIN_FORMAT = "fruitdask-train/1"
EVAL_FORMAT = "fruitdask-evaluation/1"

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

# Refuse model members larger than this when unzipping (a zip bomb fetched from a URL).
_MAX_MEMBER_BYTES = 1 << 30

Log = Callable[[str], None]


class ModelError(ValueError):
    """Bad training data, options or model file (one-line message)."""


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
    def from_bytes(cls, data: bytes, where: str = "model") -> Model:
        """Read a ``fruitdask-model/1`` zip; :class:`ModelError` when it is not one."""
        try:
            with zipfile.ZipFile(_io.BytesIO(data)) as z:
                members = {}
                for name in ("model.json", "pca.json", "arrays.npz"):
                    info = z.getinfo(name)
                    if info.file_size > _MAX_MEMBER_BYTES:
                        raise ModelError(f"{where}: {name} is too large ({info.file_size} bytes)")
                    members[name] = z.read(name)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelError(
                f"{where}: not a fruitdask model ({type(exc).__name__}: {exc})"
            ) from None
        try:
            doc = json.loads(members["model.json"])
        except json.JSONDecodeError as exc:
            raise ModelError(f"{where}: model.json is not JSON ({exc})") from None
        fmt = doc.get("format")
        if fmt != FORMAT:
            raise ModelError(f"{where}: model format {fmt!r} is not supported (expected {FORMAT})")
        try:
            pca = PcaModel.from_json(members["pca.json"].decode())
            with np.load(_io.BytesIO(members["arrays.npz"]), allow_pickle=False) as npz:
                centers, coef, intercept = npz["centers"], npz["coef"], npz["intercept"]
            c = doc["classifier"]
            kind = str(c["kind"])
            if kind not in CLASSIFIERS:
                raise ModelError(f"{where}: unknown classifier {kind!r}")
            color = bool(doc["color"]["enabled"])
            orb = features.OrbParams(**doc["orb"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"{where}: damaged model ({type(exc).__name__}: {exc})") from None
        classes = tuple(str(x) for x in c["classes"])
        n_in = centers.shape[0] + (COLOR_BINS if color else 0)
        rows = 1 if len(classes) == 2 else len(classes)
        if coef.shape != (rows, n_in) or centers.shape[1] != pca.n_components:
            raise ModelError(f"{where}: damaged model (array shapes do not agree)")
        return cls(
            encoder=Encoder(orb=orb, pca=pca, centers=centers, color=color),
            classifier=LinearClassifier(classes, coef, intercept),
            kind=kind,
            meta=dict(doc.get("meta") or {}),
        )


def model_url(path: str) -> str:
    """The model file for ``path``: itself if it names a ``.zip``, else the
    ``fruitdask-model.zip`` inside the folder (a train output)."""
    if path.lower().endswith(".zip"):
        return path
    return io.join(path, MODEL_FILE)


def _split_url(src: str) -> tuple[str, str]:
    """(folder, name) for io.read_bytes: URLs split on ``/``, local paths made absolute."""
    if "://" in src:
        return posixpath.dirname(src), posixpath.basename(src)
    full = os.path.abspath(src)
    return os.path.dirname(full), os.path.basename(full)


def _read_one(src: str, storage_options: dict[str, Any] | None) -> bytes:
    folder, name = _split_url(src)
    got = io.read_bytes(folder, [name], storage_options)[0]
    if isinstance(got, BaseException):
        raise io.translate(got, src)
    return got


def load_model(path: str, storage_options: dict[str, Any] | None = None) -> Model:
    """Load a model from a ``.zip`` file or a train output folder (local or URL).

    Raises
    ------
    io.StorageError
        The file cannot be read.
    ModelError
        It is not a ``fruitdask-model/1`` model.
    """
    url = model_url(path)
    return Model.from_bytes(_read_one(url, storage_options), where=url)


def predict_sources(
    model: Model,
    sources: Sequence[str],
    storage_options: dict[str, Any] | None = None,
    top_k: int = 3,
) -> list[Prediction | io.StorageError]:
    """Classify images given as local paths or URLs, one by one, without Dask.

    Returns
    -------
    list of Prediction, or of the StorageError for an image that cannot be read.
    """
    orb = model.encoder.orb.create()
    out: list[Prediction | io.StorageError] = []
    for src in sources:
        try:
            data = _read_one(src, storage_options)
        except io.StorageError as exc:
            out.append(exc)
            continue
        out.append(model.predict_bytes(data, src, top_k, orb))
    return out


# ---------------------------------------------------------------- train
@dataclass(frozen=True)
class TrainOptions:
    """Settings of ``fruitdask train`` beyond the feature pipeline's.

    Attributes
    ----------
    words : int
        Visual words (K).
    classifier : str
        A key of :data:`CLASSIFIERS`.
    c : float or None
        Inverse regularisation strength; the classifier's default when None.
    color : bool
        Append colour histograms to the word histograms.
    seed : int
    kmeans_sample : int
        Keypoints the vocabulary is fitted on, a uniform sample (0 = all).
    kmeans_max_iter : int
    """

    words: int = 200
    classifier: str = DEFAULT_CLASSIFIER
    c: float | None = None
    color: bool = False
    seed: int = 0
    kmeans_sample: int = 0
    kmeans_max_iter: int = 30

    def __post_init__(self) -> None:
        if self.words < 2:
            raise ModelError(f"--words must be >= 2, got {self.words}")
        if self.classifier not in CLASSIFIERS:
            raise ModelError(
                f"unknown classifier {self.classifier!r} (choose from {', '.join(CLASSIFIERS)})"
            )
        if self.c is not None and not self.c > 0:
            raise ModelError(f"C must be > 0, got {self.c}")
        if self.kmeans_sample < 0:
            raise ModelError(f"kmeans sample must be >= 0, got {self.kmeans_sample}")
        if self.kmeans_max_iter < 1:
            raise ModelError(f"kmeans max iterations must be >= 1, got {self.kmeans_max_iter}")

    @property
    def c_value(self) -> float:
        return float(self.c) if self.c is not None else CLASSIFIERS[self.classifier][1]


@dataclass
class TrainSummary:
    """What ``train`` did (the body of its manifest)."""

    output: str
    run_id: str
    model_url: str
    features_reused: bool
    images: int = 0
    images_used: int = 0
    images_no_keypoints: int = 0
    keypoints: int = 0
    classes: int = 0
    train_accuracy: float = 0.0
    vocabulary: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


_TRAIN_ENTRIES = {"pipeline", "histograms", MODEL_FILE, "manifest.json", "_SUCCESS"}
_EVAL_FILES = {
    "report.md",
    "confusion.png",
    "confusion.csv",
    "per_class.csv",
    "predictions.parquet",
    "manifest.json",
}


def _training_rows(listing):
    """The Training split (or every image when the input has no split folders),
    labelled images only."""
    rows = listing
    # split is <NA> for images outside Training/ and Test/: a mask must not hold NA
    training = (listing["split"] == "Training").fillna(False).astype(bool)
    if training.any():
        rows = listing[training]
    rows = rows[(rows["label"].fillna("") != "").astype(bool)]
    return rows.reset_index(drop=True)


def _read_manifest(url: str, so: dict[str, Any]) -> dict[str, Any] | None:
    text = io.read_text(io.join(url, "manifest.json"), so)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def reusable_features(cfg, listing, so: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of the pipeline output at ``cfg.output`` if it is complete and
    was made from exactly these images with these ORB/PCA settings, else None."""
    so = dict(so if so is not None else cfg.out_storage_options)
    success = io.read_text(io.join(cfg.output, "_SUCCESS"), so)
    if success is None:
        return None
    manifest = _read_manifest(cfg.output, so)
    if not manifest or manifest.get("run_id") != success.strip():
        return None
    have, want = manifest.get("config", {}), cfg.public_dict()
    if any(have.get(k) != want[k] for k in ("input", "orb", "n_components", "pca_method")):
        return None
    if manifest.get("counts", {}).get("images") != len(listing):
        return None
    import pandas as pd

    try:
        tables = [
            io.read_table(io.join(cfg.output, f), so, columns=["path", "size"]).to_pandas()
            for f in manifest["files"]["images"]
        ]
    except (io.StorageError, KeyError):
        return None
    got = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", "size"])
    a = sorted(zip(got["path"].astype(str), got["size"].astype(int), strict=True))
    b = sorted(zip(listing["path"].astype(str), listing["size"].astype(int), strict=True))
    return manifest if a == b else None


def check_train_output(out: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail early (before a cluster starts) when ``out`` cannot take a train output."""
    _check_output(out, _TRAIN_ENTRIES, "train output", dict(storage_options or {}))


def check_evaluation_output(out: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail early when ``out`` cannot take an evaluation report."""
    _check_output(out, _EVAL_FILES, "evaluation output", dict(storage_options or {}))


def _check_output(out: str, allowed: set[str], what: str, so: dict[str, Any]) -> set[str]:
    io.check_writable(out, so)
    entries = set(io.ls(out, so))
    foreign = entries - allowed
    if foreign:
        shown = ", ".join(sorted(foreign)[:3])
        raise ModelError(
            f"{out}: holds other files ({shown}); give an empty folder or a previous {what}"
        )
    return entries


def train(
    cfg,
    client,
    opts: TrainOptions,
    listing=None,
    progress=None,
    log: Log | None = None,
    startup_seconds: float = 0.0,
    listing_seconds: float = 0.0,
) -> TrainSummary:
    """Train a model on the Training split of ``cfg.input``; write it under ``cfg.output``.

    Parameters
    ----------
    cfg : fruitdask.config.RunConfig
        Input, output and feature settings; the pipeline writes into
        ``cfg.output/pipeline`` (reused when it already holds these features).
    client : distributed.Client
    opts : TrainOptions
    listing : DataFrame, optional
        ``io.list_images(cfg.input)`` when already done.
    progress : callable, optional
        Passed to :func:`fruitdask.pipeline.run`.
    log : callable, optional
        Receives one line per finished stage.

    Raises
    ------
    io.StorageError, ModelError, fruitdask.pipeline.OutputExistsError
    """
    from fruitdask import bovw, pipeline

    say = log or (lambda _msg: None)
    timings: dict[str, float] = {"startup": round(startup_seconds, 3)}
    so_out = cfg.out_storage_options
    t = time.perf_counter()
    if listing is None:
        listing = io.list_images(cfg.input, cfg.storage_options)
    rows = _training_rows(listing)
    timings["listing"] = time.perf_counter() - t + listing_seconds
    if len(rows) == 0:
        raise ModelError(f"{cfg.input}: no labelled images (expected Training/<label>/<image>)")
    n_labels = rows["label"].nunique()
    if n_labels < 2:
        raise ModelError(f"{cfg.input}: training needs at least 2 labels, found {n_labels}")

    out = cfg.output
    entries = _check_output(out, _TRAIN_ENTRIES, "train output", so_out)
    if "_SUCCESS" in entries:  # the old model stops being "complete" before anything changes
        io.remove([io.join(out, "_SUCCESS")], so_out)
    run_id = uuid.uuid4().hex[:8]

    # 1. features: the pipeline on the Training split, or what it left last time.
    t = time.perf_counter()
    pcfg = cfg.with_(output=io.join(out, "pipeline"), overwrite=True, resume=False)
    manifest = reusable_features(pcfg, rows, so_out)
    reused = manifest is not None
    if manifest is not None:
        say(f"features: reusing {pcfg.output} (run {manifest['run_id']})")
    else:
        pipeline.run(pcfg, client, progress=progress, listing=rows)
        manifest = _read_manifest(pcfg.output, so_out)
    if manifest is None:  # the pipeline has just written it
        raise io.StorageError(f"{pcfg.output}: manifest.json missing after the feature run")
    timings["features"] = time.perf_counter() - t
    pca = PcaModel.from_json(
        io.read_text(io.join(pcfg.output, manifest["files"]["model"][0]), so_out) or ""
    )

    # 2. load the PCA features on the workers; colour histograms run beside the fit.
    t = time.perf_counter()
    parts = bovw.load_training_features(
        client, pcfg.output, manifest, so_out, split="Training", token=run_id
    )
    timings["load_features"] = time.perf_counter() - t
    if parts.n_keypoints < opts.words:
        raise ModelError(
            f"{cfg.input}: {parts.n_keypoints} keypoints in {parts.n_images} training images; "
            f"{opts.words} visual words need at least as many (try a smaller --words)"
        )
    color_futures = None
    if opts.color:
        color_futures = bovw.color_parts(
            client, parts, cfg.input, rows, cfg.storage_options, cfg.orb.max_pixels
        )

    # 3. the vocabulary.
    t = time.perf_counter()
    x = parts.sample_array(client, opts.kmeans_sample, opts.seed)
    vocab = bovw.fit_vocabulary(x, opts.words, seed=opts.seed, max_iter=opts.kmeans_max_iter)
    timings["vocabulary"] = time.perf_counter() - t
    say(
        f"vocabulary: {vocab.k} words from {vocab.fitted_on_rows:,} keypoints, "
        f"{vocab.n_iter} iterations, {timings['vocabulary']:.1f}s"
    )

    # 4. histograms, written by the workers. The colour futures go to the
    # histogram tasks as they are (no trip through the client); this stage
    # includes any wait for them, though they mostly ran during the fit.
    t = time.perf_counter()
    results, hist_files = bovw.histogram_parts(
        client, parts, vocab.centers, out, run_id, so_out, color_futures
    )
    client.cancel(parts.parts)
    timings["histograms"] = time.perf_counter() - t

    # 5. the classifier, on the images that have keypoints.
    t = time.perf_counter()
    hist = np.concatenate([r["histograms"] for r in results])
    counts = np.concatenate([r["n_keypoints"] for r in results])
    labels = np.asarray([lab for r in results for lab in r["label"]], dtype=object)
    col = np.concatenate([r["colors"] for r in results]) if opts.color else None
    use = counts > 0
    kind = CLASSIFIERS[opts.classifier][0]
    xtr = design_matrix(hist[use], col[use] if col is not None else None, kind)
    clf, info = fit_classifier(xtr, labels[use], opts.c_value, opts.seed)
    train_acc = float(
        np.mean(np.asarray(clf.classes)[clf.predict_proba(xtr).argmax(1)] == labels[use])
    )
    timings["classifier"] = time.perf_counter() - t
    sq = float(sum(r["sq_dist_sum"] for r in results))
    say(
        f"classifier: {opts.classifier} (C={opts.c_value:g}) on {int(use.sum()):,} images, "
        f"training accuracy {train_acc:.3f}, {timings['classifier']:.1f}s"
    )

    # 6. publish: model, manifest, _SUCCESS last; then drop the old histograms.
    t = time.perf_counter()
    classes, class_counts = np.unique(labels[use], return_counts=True)
    versions = pipeline._library_versions()
    vocab_info = {
        "k": vocab.k,
        "init": vocab.init,
        "n_iter": vocab.n_iter,
        "fitted_on_rows": vocab.fitted_on_rows,
        "inertia_per_keypoint": round(sq / max(1, int(counts.sum())), 4),
    }
    clf_info = {
        "kind": opts.classifier,
        "feature_map": kind,
        "C": opts.c_value,
        "color": opts.color,
        "n_features": int(xtr.shape[1]),
        **info,
    }
    meta = {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": cfg.input,
        "features_run_id": manifest["run_id"],
        "class_counts": {str(k): int(v) for k, v in zip(classes, class_counts, strict=True)},
        "images": int(len(rows)),
        "images_used": int(use.sum()),
        "train_accuracy": round(train_acc, 6),
        "vocabulary": vocab_info,
        "classifier": clf_info,
        "versions": versions,
    }
    model = Model(
        Encoder(orb=cfg.orb, pca=pca, centers=vocab.centers, color=opts.color),
        clf,
        opts.classifier,
        meta,
    )
    murl = io.join(out, MODEL_FILE)
    io.write_bytes(murl, model.to_bytes(), so_out)
    timings["publish"] = time.perf_counter() - t
    summary = TrainSummary(
        output=out,
        run_id=run_id,
        model_url=murl,
        features_reused=reused,
        images=int(len(rows)),
        images_used=int(use.sum()),
        images_no_keypoints=int((~use).sum()),
        keypoints=int(counts.sum()),
        classes=len(classes),
        train_accuracy=train_acc,
        vocabulary=vocab_info,
        classifier=clf_info,
        timings={k: round(v, 3) for k, v in timings.items()},
    )
    doc = {
        "format": TRAIN_FORMAT,
        "run_id": run_id,
        "created": meta["created"],
        "input": cfg.input,
        "config": cfg.public_dict(),
        "train": asdict(opts),
        "features": {
            "output": "pipeline",
            "reused": reused,
            "run_id": manifest["run_id"],
            "timings": manifest.get("timings", {}),
            "pca": manifest.get("pca", {}),
        },
        "counts": {
            "images": summary.images,
            "images_used": summary.images_used,
            "no_keypoints": summary.images_no_keypoints,
            "keypoints": summary.keypoints,
            "classes": summary.classes,
        },
        "vocabulary": vocab_info,
        "classifier": {**clf_info, "train_accuracy": round(train_acc, 6)},
        "timings": summary.timings,
        "files": {"histograms": hist_files, "model": [MODEL_FILE]},
        "versions": versions,
    }
    io.write_bytes(io.join(out, "manifest.json"), json.dumps(doc, indent=1).encode(), so_out)
    io.write_bytes(io.join(out, "_SUCCESS"), f"{run_id}\n".encode(), so_out)
    keep = set(hist_files)
    stale = [
        io.join(out, "histograms", n)
        for n in io.ls(io.join(out, "histograms"), so_out)
        if f"histograms/{n}" not in keep
    ]
    io.remove(stale, so_out)
    return summary


# ---------------------------------------------------------------- evaluate
def compute_metrics(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix.

    Parameters
    ----------
    y_true : sequence of str
    y_pred : sequence of str or None
        None = not classified (no keypoints): counted as wrong.
    labels : sequence of str
        Row/column order of the confusion matrix (every true and predicted label).

    Returns
    -------
    dict
        ``accuracy``, ``classified``, ``accuracy_classified``, ``macro_precision``,
        ``macro_recall``, ``macro_f1``, ``per_class`` (label -> precision, recall,
        f1, support), ``confusion`` (list of lists, rows = true labels) and
        ``not_classified`` (per true label).
    """
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    n = len(labels)
    cm = np.zeros((n, n), np.int64)
    missing = np.zeros(n, np.int64)
    correct = 0
    classified = 0
    for t, p in zip(y_true, y_pred, strict=True):
        if p is None:
            missing[index[t]] += 1
            continue
        classified += 1
        cm[index[t], index[p]] += 1
        correct += int(t == p)
    support = cm.sum(1) + missing
    predicted = cm.sum(0)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    total = len(y_true)
    return {
        "images": total,
        "accuracy": correct / total if total else 0.0,
        "classified": classified,
        "accuracy_classified": correct / classified if classified else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            lab: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, lab in enumerate(labels)
        },
        "confusion": cm.tolist(),
        "not_classified": {lab: int(missing[i]) for i, lab in enumerate(labels) if missing[i]},
    }


def _confusion_png(cm: np.ndarray, labels: Sequence[str], title: str) -> bytes | None:
    """A row-normalised confusion matrix as PNG bytes; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    n = len(labels)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, np.maximum(rows, 1), dtype=np.float64)
    size = min(40.0, max(6.0, 0.28 * n + 3))
    # Figure + Agg canvas, not pyplot: no global state, no GUI backend in a library.
    fig = Figure(figsize=(size, size * 0.9), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fs = max(4.0, min(9.0, 300.0 / max(n, 1)))
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=fs)
    ax.set_yticklabels(labels, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=fs,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@dataclass
class EvaluationSummary:
    """What ``evaluate`` measured."""

    output: str
    images: int
    accuracy: float
    baseline_accuracy: float
    baseline_label: str
    metrics: dict[str, Any]
    timings: dict[str, float]
    files: list[str]


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _report_md(
    model: Model,
    input_url: str,
    split: str,
    m: dict[str, Any],
    baseline: tuple[str, float],
    timings: dict[str, float],
    png: bool,
    top3: float,
) -> str:
    meta = model.meta
    lines = [
        "# fruitdask evaluation",
        "",
        f"- model: {meta.get('run_id', '?')} ({model.kind}, C={meta.get('classifier', {}).get('C')}, "
        f"{model.encoder.k} visual words, colour features {'on' if model.encoder.color else 'off'}), "
        f"trained on {meta.get('images_used', '?')} images of {meta.get('input', '?')}",
        f"- evaluated on: {input_url} ({split}), {m['images']} images, "
        f"{m['images'] - m['classified']} without keypoints (counted as wrong)",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| this model | **{_fmt(m['accuracy'])}** |",
        f'| majority-class baseline (always "{baseline[0]}") | {_fmt(baseline[1])} |',
        f"| this model, top-3 | {_fmt(top3)} |",
        f"| this model, images with keypoints only | {_fmt(m['accuracy_classified'])} |",
        "",
        f"Macro precision {_fmt(m['macro_precision'])}, macro recall {_fmt(m['macro_recall'])}, "
        f"macro F1 {_fmt(m['macro_f1'])}.",
        "",
    ]
    if png:
        lines += ["![confusion matrix](confusion.png)", ""]
    else:
        lines += ["(confusion.png needs matplotlib: `pip install fruitdask[plot]`)", ""]
    lines += [
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for lab, r in m["per_class"].items():
        if r["support"] == 0 and lab not in model.classes:
            continue
        lines.append(
            f"| {lab} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} "
            f"| {r['support']} |"
        )
    unknown = [
        lab for lab, r in m["per_class"].items() if r["support"] and lab not in model.classes
    ]
    if unknown:
        lines += ["", f"Labels the model was not trained on (always wrong): {', '.join(unknown)}."]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def evaluate(
    model: Model,
    input_url: str,
    output: str,
    client,
    storage_options: dict[str, Any] | None = None,
    output_storage_options: dict[str, Any] | None = None,
    listing=None,
    partition_size: int = 1000,
    progress=None,
    startup_seconds: float = 0.0,
    listing_seconds: float = 0.0,
) -> EvaluationSummary:
    """Evaluate ``model`` on the Test split of ``input_url`` (every labelled image
    when there is no split); write a report under ``output``.

    Writes ``report.md``, ``confusion.png`` (with matplotlib), ``confusion.csv``,
    ``per_class.csv``, ``predictions.parquet`` and ``manifest.json``.
    """
    import pandas as pd
    import pyarrow as pa

    from fruitdask import bovw, pipeline

    so = dict(storage_options or {})
    so_out = dict(output_storage_options if output_storage_options is not None else so)
    timings: dict[str, float] = {"startup": round(startup_seconds, 3)}
    t = time.perf_counter()
    if listing is None:
        listing = io.list_images(input_url, so)
    test = (listing["split"] == "Test").fillna(False).astype(bool)
    split = "Test" if test.any() else "all"
    rows = listing[test] if split == "Test" else listing
    rows = rows[(rows["label"].fillna("") != "").astype(bool)].reset_index(drop=True)
    timings["listing"] = time.perf_counter() - t + listing_seconds
    if len(rows) == 0:
        raise ModelError(f"{input_url}: no labelled images to evaluate (expected Test/<label>/...)")
    _check_output(output, _EVAL_FILES, "evaluation output", so_out)

    t = time.perf_counter()
    batch = bovw.encode_listing(
        client, input_url, rows, model.encoder, so, partition_size, progress
    )
    timings["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    proba = model.predict_proba_batch(batch)
    ok = np.array([s == "ok" for s in batch.status])
    classes = np.asarray(model.classes, dtype=object)
    best = proba.argmax(1)
    y_true = [str(x) for x in rows["label"]]
    y_pred = [str(classes[b]) if k else None for b, k in zip(best, ok, strict=True)]
    top3_idx = np.argsort(-proba, axis=1)[:, :3]
    top3 = float(
        np.mean(
            [
                bool(k) and t_ in set(classes[i])
                for t_, i, k in zip(y_true, top3_idx, ok, strict=True)
            ]
        )
    )
    labels = sorted(set(model.classes) | set(y_true))
    m = compute_metrics(y_true, y_pred, labels)
    counts = model.meta.get("class_counts") or {}
    majority = max(sorted(counts), key=lambda k: counts[k]) if counts else model.classes[0]
    base_acc = float(np.mean([t_ == majority for t_ in y_true]))
    timings["classify"] = time.perf_counter() - t

    t = time.perf_counter()
    cm = np.asarray(m["confusion"])
    title = f"accuracy {m['accuracy']:.3f} (baseline {base_acc:.3f}), {len(rows)} images"
    png = _confusion_png(cm, labels, title)
    timings["plot"] = time.perf_counter() - t
    t = time.perf_counter()
    files = []

    def put(name: str, data: bytes) -> None:
        io.write_bytes(io.join(output, name), data, so_out)
        files.append(name)

    if png is not None:
        put("confusion.png", png)
    cm_df = pd.DataFrame(cm, index=labels, columns=labels)
    put("confusion.csv", cm_df.to_csv(index_label="true\\predicted").encode())
    per_class = pd.DataFrame.from_dict(m["per_class"], orient="index")
    put("per_class.csv", per_class.to_csv(index_label="label").encode())
    pred_table = pa.table(
        {
            "path": pa.array(rows["path"].astype(str).tolist(), pa.string()),
            "label": pa.array(y_true, pa.string()),
            "predicted": pa.array(y_pred, pa.string()),
            "probability": pa.array(
                np.where(ok, proba[np.arange(len(best)), best], np.nan), pa.float64()
            ),
            "n_keypoints": pa.array(batch.n_keypoints, pa.int32()),
            "status": pa.array(batch.status, pa.string()),
        }
    )
    io.write_table(pred_table, io.join(output, "predictions.parquet"), so_out)
    files.append("predictions.parquet")
    timings["write"] = time.perf_counter() - t
    timings = {k: round(v, 3) for k, v in timings.items()}
    put(
        "report.md",
        _report_md(
            model, input_url, split, m, (majority, base_acc), timings, png is not None, top3
        ).encode(),
    )
    manifest = {
        "format": EVAL_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"run_id": model.meta.get("run_id"), "kind": model.kind, "k": model.encoder.k},
        "input": input_url,
        "split": split,
        "counts": {
            "images": len(rows),
            "classified": m["classified"],
            "no_keypoints": int(sum(s == "no_keypoints" for s in batch.status)),
            "error": int(sum(s == "error" for s in batch.status)),
        },
        "accuracy": m["accuracy"],
        "top3_accuracy": top3,
        "accuracy_classified": m["accuracy_classified"],
        "baseline": {"label": majority, "accuracy": base_acc},
        "macro": {k: m[f"macro_{k}"] for k in ("precision", "recall", "f1")},
        "per_class": m["per_class"],
        "timings": timings,
        "files": [*files, "manifest.json"],
        "versions": pipeline._library_versions(),
    }
    put("manifest.json", json.dumps(manifest, indent=1).encode())
    return EvaluationSummary(
        output=output,
        images=len(rows),
        accuracy=float(m["accuracy"]),
        baseline_accuracy=base_acc,
        baseline_label=majority,
        metrics={**m, "top3_accuracy": top3},
        timings=timings,
        files=files,
    )
