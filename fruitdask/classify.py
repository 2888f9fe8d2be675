"""Which fruit is this? Train and evaluate a bag-of-visual-words classifier; apply it.

The chain the original job planned after PCA::

    images -> ORB -> PCA (the feature pipeline, reused when already done)
           -> visual words (dask-ml KMeans) -> one histogram per image
           -> logistic regression -> class probabilities

Orchestration only: the kernels are :mod:`fruitdask.bovw` and
:mod:`fruitdask.model`, the Dask stages :mod:`fruitdask.encode`, the scores
:mod:`fruitdask.metrics`, and both outputs are committed through
:class:`fruitdask.output.OutputDir`.

Train output layout::

    OUT/pipeline/                        a complete ``fruitdask run`` output (Training split)
    OUT/histograms/part-00000-<run>.parquet   one row per image (see fruitdask.encode)
    OUT/models/fruitdask-model-<run>.zip the model (fruitdask.model)
    OUT/fruitdask-model.zip              a copy of the model in force
    OUT/manifest.json, OUT/_SUCCESS      as every output
"""

from __future__ import annotations

import io as _io
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fruitdask import encode, io, metrics, pipeline
from fruitdask.bovw import Encoder, Vocabulary, fit_vocabulary
from fruitdask.cancel import StopToken
from fruitdask.config import RunConfig, absolute
from fruitdask.errors import FruitdaskError, InputError, ModelError, StorageError
from fruitdask.features import DEFAULT_MAX_PIXELS, max_file_bytes
from fruitdask.model import (
    CLASSIFIERS,
    DEFAULT_CLASSIFIER,
    Model,
    Prediction,
    design_matrix,
    fit_classifier,
)
from fruitdask.output import (
    OutputDir,
    RunState,
    library_versions,
    new_run_id,
    read_committed,
)
from fruitdask.pca import PcaModel

__all__ = [
    "EVAL_FORMAT",
    "MODEL_FILE",
    "TRAIN_FORMAT",
    "EvaluationSummary",
    "TrainOptions",
    "TrainSummary",
    "check_evaluation",
    "check_training",
    "evaluate",
    "evaluation_rows",
    "load_model",
    "model_url",
    "predict_sources",
    "prepare_output",
    "reusable_features",
    "train",
    "training_rows",
]

MODEL_FILE = "fruitdask-model.zip"
TRAIN_FORMAT = "fruitdask-train/1"
EVAL_FORMAT = "fruitdask-evaluation/1"
#: A model file is a few MB; anything this large is not one.
_MAX_MODEL_BYTES = 300 << 20


# ---------------------------------------------------------------- applying a model
def model_url(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """The model file for ``path``: itself if it names a ``.zip``, else the model
    of the train output committed in that folder."""
    if path.lower().endswith(".zip"):
        return path
    manifest = read_committed(path, storage_options)
    if manifest is not None and manifest.get("format") == TRAIN_FORMAT:
        return io.join(path, manifest["files"]["model"][0])
    return io.join(path, MODEL_FILE)


def _absolute(src: str) -> str:
    return src if "://" in src else os.path.abspath(src)


def load_model(
    path: str, storage_options: dict[str, Any] | None = None, max_pixels: int | None = None
) -> Model:
    """Load a model from a ``.zip`` file or a train output folder (local or URL).

    ``max_pixels`` caps the model's decompression-bomb guard (the local setting).

    Raises
    ------
    StorageError
        The file cannot be read.
    ModelError
        It is not a ``fruitdask-model/1`` model, or a damaged or hostile one.
    """
    url = model_url(_absolute(path), storage_options)
    data = io.read_bytes(url, storage_options, max_bytes=_MAX_MODEL_BYTES)
    return Model.from_bytes(data, where=url, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)


def predict_sources(
    model: Model,
    sources: list[str],
    storage_options: dict[str, Any] | None = None,
    top_k: int = 3,
) -> list[Prediction | FruitdaskError]:
    """Classify images given as local paths or URLs, one by one, without Dask.

    Returns
    -------
    list of Prediction, or the error of an image that cannot be read.
    """
    orb = model.encoder.orb.create()
    limit = max_file_bytes(model.encoder.orb.max_pixels)
    out: list[Prediction | FruitdaskError] = []
    for src in sources:
        try:
            data = io.read_bytes(_absolute(src), storage_options, max_bytes=limit)
        except FruitdaskError as exc:
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
        A key of :data:`fruitdask.model.CLASSIFIERS`.
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
        if not 2 <= self.words <= 100_000:
            raise ModelError(f"--words must be between 2 and 100000, got {self.words}")
        if self.classifier not in CLASSIFIERS:
            raise ModelError(
                f"unknown classifier {self.classifier!r} (choose from {', '.join(CLASSIFIERS)})"
            )
        if self.c is not None and not (self.c > 0 and np.isfinite(self.c)):
            raise ModelError(f"--C must be a positive number, got {self.c}")
        if self.kmeans_sample < 0:
            raise ModelError(f"--kmeans-sample must be >= 0, got {self.kmeans_sample}")
        if not 1 <= self.kmeans_max_iter <= 10_000:
            raise ModelError(
                f"--kmeans-max-iter must be between 1 and 10000, got {self.kmeans_max_iter}"
            )

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


def check_training(url: str, rows: pd.DataFrame) -> None:
    """Refuse training rows without at least two labels, with one line."""
    if len(rows) == 0:
        raise ModelError(f"{url}: no labelled images (expected Training/<label>/<image>)")
    n = rows["label"].nunique()
    if n < 2:
        raise ModelError(f"{url}: training needs at least 2 labels, found {n}")


def training_rows(listing: pd.DataFrame) -> pd.DataFrame:
    """The Training split (or every image when the input has no split folders),
    labelled images only."""
    rows = listing
    # split is <NA> for images outside Training/ and Test/: a mask must not hold NA
    training = (listing["split"] == "Training").fillna(False).astype(bool)
    if training.any():
        rows = listing[training]
    rows = rows[(rows["label"].fillna("") != "").astype(bool)]
    return rows.reset_index(drop=True)


def evaluation_rows(listing: pd.DataFrame) -> pd.DataFrame:
    """The Test split (or every labelled image when there is none)."""
    test = (listing["split"] == "Test").fillna(False).astype(bool)
    rows = listing[test] if test.any() else listing
    rows = rows[(rows["label"].fillna("") != "").astype(bool)]
    return rows.reset_index(drop=True)


def check_evaluation(url: str, rows: pd.DataFrame) -> None:
    if len(rows) == 0:
        raise InputError(f"{url}: no labelled images to evaluate (expected Test/<label>/...)")


def prepare_output(
    url: str,
    so: dict[str, Any],
    kind: str,
    inputs: dict[str, tuple[str, dict]],
    stop: StopToken | None = None,
) -> OutputDir:
    """Check (a previous output of the same kind is replaced) and lock an output."""
    out = OutputDir(url, so, kind=kind)
    out.check("overwrite", inputs)
    out.lock(new_run_id(), stop=stop)
    return out


def reusable_features(cfg: RunConfig, rows: pd.DataFrame) -> dict[str, Any] | None:
    """The manifest of the pipeline output at ``cfg.output`` if it is committed and
    was made from exactly these images with these ORB/PCA settings, else None."""
    so = cfg.out_storage_options
    manifest = read_committed(cfg.output, so)
    if manifest is None:
        return None
    have, want = manifest.get("config", {}), cfg.public_dict()
    if any(have.get(k) != want[k] for k in ("input", "orb", "n_components", "pca_method")):
        return None
    if manifest.get("counts", {}).get("images") != len(rows):
        return None
    try:
        tables = [
            io.read_table(io.join(cfg.output, f), so, columns=["path", "size"]).to_pandas()
            for f in manifest["files"]["images"]
        ]
    except (FruitdaskError, KeyError):
        return None
    got = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", "size"])
    a = sorted(zip(got["path"].astype(str), got["size"].astype(int), strict=True))
    b = sorted(zip(rows["path"].astype(str), rows["size"].astype(int), strict=True))
    return manifest if a == b else None


def _features(cfg, client, rows, progress, stop, say) -> tuple[dict, bool]:
    """The feature pipeline's committed manifest for ``rows``: reused or computed."""
    pcfg = cfg.with_(output=io.join(cfg.output, "pipeline"), overwrite=True, resume=False)
    manifest = reusable_features(pcfg, rows)
    if manifest is not None:
        say(f"features: reusing {pcfg.output} (run {manifest['run_id']})")
        return manifest, True
    pipeline.run(pcfg, client, progress, stop, listing=rows)
    manifest = read_committed(pcfg.output, pcfg.out_storage_options)
    if manifest is None:  # the pipeline has just committed it
        raise StorageError(f"{pcfg.output}: no committed result after the feature run")
    return manifest, False


def train(
    cfg: RunConfig,
    client,
    opts: TrainOptions,
    rows: pd.DataFrame | None = None,
    out: OutputDir | None = None,
    progress=None,
    log=None,
    stop: StopToken | None = None,
    timer: pipeline.Timer | None = None,
) -> TrainSummary:
    """Train a model on ``rows`` (:func:`training_rows` of ``cfg.input``, listed
    here when not given); commit it in ``out`` (:func:`prepare_output` of
    ``cfg.output`` when not given).

    Raises
    ------
    fruitdask.errors.FruitdaskError
        Typed and one line (bad data or options, storage, a stop request).
    """
    say = log or (lambda _msg: None)
    stop = stop or StopToken()
    timer = timer or pipeline.Timer()
    if rows is None:
        rows = training_rows(pipeline.list_input(cfg))
    check_training(cfg.input, rows)
    if out is None:
        out = prepare_output(cfg.output, cfg.out_storage_options, TRAIN_FORMAT,
                             {"input": (cfg.input, cfg.storage_options)}, stop)  # fmt: skip
    assert out.lease is not None, "prepare_output() locks the output first"
    run_id = out.lease.run_id
    so_out = out.so
    run = out.start(run_id, {"config": cfg.public_dict(), "train": asdict(opts)}, [])
    try:
        with timer("features"):
            manifest, reused = _features(cfg, client, rows, progress, stop, say)
        pca = _pca_model(cfg, manifest, so_out)
        with timer("load_features"):
            parts = encode.load_training_features(
                client, io.join(cfg.output, "pipeline"), manifest, so_out, "Training", run_id
            )
        _check_keypoints(cfg.input, parts, opts)
        color_futures = None
        if opts.color:  # they fill the cores the vocabulary fit's round trips leave idle
            color_futures = encode.color_parts(
                client, parts, cfg.input, rows, cfg.storage_options, cfg.orb.max_pixels
            )
        with timer("vocabulary"):
            vocab = _vocabulary(client, parts, opts, log)
        stop.check()
        say(
            f"vocabulary: {vocab.k} words from {vocab.fitted_on_rows:,} keypoints, "
            f"{vocab.n_iter} iterations on the {vocab.fitted_on}, {vocab.seconds:.1f}s"
        )
        with timer("histograms"):
            hist_files = [
                f"histograms/part-{i:05d}-{run_id}.parquet" for i in range(len(parts.parts))
            ]
            out.expect(run, [*hist_files, _model_file(run_id)])
            results = encode.histogram_parts(
                client, parts, vocab.centers, cfg.output, hist_files, so_out, color_futures, stop
            )
            # the workers drop the features once no future holds them
            parts.release()
            color_futures = None
        with timer("classifier"):
            fitted = _fit(results, opts)
        say(
            f"classifier: {opts.classifier} (C={opts.c_value:g}) on {fitted['used']:,} images, "
            f"training accuracy {fitted['accuracy']:.3f}"
        )
        with timer("publish"):
            return _publish_model(cfg, out, run, opts, rows, manifest, reused, pca, vocab,
                                  fitted, results, hist_files, timer, stop)  # fmt: skip
    finally:
        out.release()


def _pca_model(cfg: RunConfig, manifest: dict[str, Any], so: dict[str, Any]) -> PcaModel:
    """The PCA the feature run committed (``manifest`` is its manifest)."""
    pca_file = io.join(cfg.output, "pipeline", manifest["files"]["model"][0])
    return PcaModel.from_json(io.read_text(pca_file, so) or "")


def _check_keypoints(url: str, parts: encode.FeatureParts, opts: TrainOptions) -> None:
    """Refuse, with one line, training keypoints fewer than the visual words."""
    if parts.n_keypoints < opts.words:
        raise ModelError(
            f"{url}: {parts.n_keypoints} keypoints in {parts.n_images} training "
            f"images; {opts.words} visual words need at least as many (try a smaller --words)"
        )


def _vocabulary(client, parts: encode.FeatureParts, opts: TrainOptions, log) -> Vocabulary:
    """dask-ml KMeans on (a sample of) the training keypoints. The sample array
    lives only in here: its futures are released when the fit returns."""
    x = parts.sample_array(client, opts.kmeans_sample, opts.seed)
    notes = None if log is None else _IterationNotes(log)
    return fit_vocabulary(
        x, opts.words, seed=opts.seed, max_iter=opts.kmeans_max_iter, progress=notes
    )


class _IterationNotes:
    """Vocabulary progress for the person watching: a line at most every 2 s."""

    def __init__(self, log, every: float = 2.0) -> None:
        self.log, self.every = log, every
        self.last = time.perf_counter()

    def __call__(self, iteration: int, max_iter: int, shift: float, tol: float) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.log(
                f"vocabulary: Lloyd iteration {iteration} of at most {max_iter}, "
                f"centre shift {shift:.3g} (converged below {tol:.3g})"
            )


def _model_file(run_id: str) -> str:
    return f"models/fruitdask-model-{run_id}.zip"


def _fit(results: list[dict[str, Any]], opts: TrainOptions) -> dict[str, Any]:
    """The classifier, on the images that have keypoints."""
    hist = np.concatenate([r["histograms"] for r in results])
    counts = np.concatenate([r["n_keypoints"] for r in results])
    labels = np.asarray([lab for r in results for lab in r["label"]], dtype=object)
    col = np.concatenate([r["colors"] for r in results]) if opts.color else None
    use = counts > 0
    kind = CLASSIFIERS[opts.classifier][0]
    xtr = design_matrix(hist[use], col[use] if col is not None else None, kind)
    clf, info = fit_classifier(xtr, labels[use], opts.c_value, opts.seed)
    predicted = np.asarray(clf.classes)[clf.predict_proba(xtr).argmax(1)]
    return {
        "classifier": clf,
        "info": {"kind": opts.classifier, "feature_map": kind, "C": opts.c_value,
                 "color": opts.color, "n_features": int(xtr.shape[1]), **info},
        "accuracy": float(np.mean(predicted == labels[use])),
        "used": int(use.sum()),
        "labels": labels[use],
        "keypoints": int(counts.sum()),
        "sq_dist": float(sum(r["sq_dist_sum"] for r in results)),
    }  # fmt: skip


def _publish_model(cfg, out, run: RunState, opts, rows, manifest, reused, pca, vocab, fitted,
                   results, hist_files, timer, stop) -> TrainSummary:  # fmt: skip
    classes, class_counts = np.unique(fitted["labels"], return_counts=True)
    vocab_info = {
        "k": vocab.k,
        "init": vocab.init,
        "n_iter": vocab.n_iter,
        "fitted_on": vocab.fitted_on,
        "fitted_on_rows": vocab.fitted_on_rows,
        "inertia_per_keypoint": round(fitted["sq_dist"] / max(1, fitted["keypoints"]), 4),
    }
    meta = {
        "run_id": run.run_id,
        "input": absolute(cfg.input),
        "features_run_id": manifest["run_id"],
        "class_counts": {str(k): int(v) for k, v in zip(classes, class_counts, strict=True)},
        "images": int(len(rows)),
        "images_used": fitted["used"],
        "train_accuracy": round(fitted["accuracy"], 6),
        "vocabulary": vocab_info,
        "classifier": fitted["info"],
        "versions": library_versions(),
    }
    encoder = Encoder(orb=cfg.orb, pca=pca, centers=vocab.centers, color=opts.color)
    model = Model(encoder, fitted["classifier"], opts.classifier, meta)
    data = model.to_bytes()
    run.write_bytes(_model_file(run.run_id), data)
    s = TrainSummary(
        output=cfg.output,
        run_id=run.run_id,
        model_url=io.join(cfg.output, MODEL_FILE),
        features_reused=reused,
        images=int(len(rows)),
        images_used=fitted["used"],
        images_no_keypoints=int(len(rows)) - fitted["used"],
        keypoints=fitted["keypoints"],
        classes=len(classes),
        train_accuracy=fitted["accuracy"],
        vocabulary=vocab_info,
        classifier=fitted["info"],
        timings=timer.rounded(),
    )
    doc = {
        "input": absolute(cfg.input),
        "config": cfg.public_dict(),
        "train": asdict(opts),
        "features": {"output": "pipeline", "reused": reused, "run_id": manifest["run_id"],
                     "timings": manifest.get("timings", {}), "pca": manifest.get("pca", {})},
        "counts": {"images": s.images, "images_used": s.images_used,
                   "no_keypoints": s.images_no_keypoints, "keypoints": s.keypoints,
                   "classes": s.classes},
        "vocabulary": vocab_info,
        "classifier": {**fitted["info"], "train_accuracy": round(fitted["accuracy"], 6)},
        "timings": s.timings,
        "files": {"histograms": hist_files, "model": [_model_file(run.run_id)]},
        "versions": meta["versions"],
    }  # fmt: skip
    out.publish(run, doc, aliases={MODEL_FILE: data}, stop=stop)
    return s


# ---------------------------------------------------------------- evaluate
@dataclass
class EvaluationSummary:
    """What ``evaluate`` measured."""

    output: str
    run_id: str
    images: int
    accuracy: float
    baseline_accuracy: float
    baseline_label: str
    metrics: dict[str, Any]
    timings: dict[str, float]
    files: list[str]


#: The evaluation's files: each is written under a name with the run id, and
#: copied to this stable name when the run commits.
EVAL_FILES = ("report.md", "confusion.png", "confusion.csv", "per_class.csv",
              "predictions.parquet")  # fmt: skip


def _run_name(name: str, run_id: str) -> str:
    stem, ext = posixpath.splitext(name)
    return f"{stem}-{run_id}{ext}"


def evaluate(
    model: Model,
    input_url: str,
    output: str,
    client,
    storage_options: dict[str, Any] | None = None,
    rows: pd.DataFrame | None = None,
    out: OutputDir | None = None,
    partition_size: int = 1000,
    progress=None,
    stop: StopToken | None = None,
    timer: pipeline.Timer | None = None,
) -> EvaluationSummary:
    """Evaluate ``model`` on the Test split of ``input_url`` (``rows``, from
    :func:`evaluation_rows`, listed here when not given); commit ``report.md``,
    ``confusion.png`` (with matplotlib), ``confusion.csv``, ``per_class.csv``,
    ``predictions.parquet`` and the manifest in ``output`` (``out``, its
    :func:`prepare_output`, when given)."""
    stop = stop or StopToken()
    timer = timer or pipeline.Timer()
    so = dict(storage_options or {})
    if rows is None:
        listing = pipeline.list_input(RunConfig(input=input_url, storage_options=so))
        rows = evaluation_rows(listing)
    check_evaluation(input_url, rows)
    split = "Test" if (rows["split"] == "Test").fillna(False).astype(bool).any() else "all"
    if out is None:
        out = prepare_output(output, so, EVAL_FORMAT, {"input": (input_url, so)}, stop)
    assert out.lease is not None, "prepare_output() locks the output first"
    run_id = out.lease.run_id
    run = out.start(run_id, {"model": model.meta.get("run_id"), "input": absolute(input_url)}, [],
                    files=[_run_name(n, run_id) for n in EVAL_FILES])  # fmt: skip
    try:
        with timer("encode"):
            batch = encode.encode_listing(client, input_url, rows, model.encoder,
                                          storage_options, partition_size, progress, stop)  # fmt: skip
        with timer("classify"):
            scored = _score(model, rows, batch)
        with timer("write"):
            files = _evaluation_files(model, input_url, split, rows, batch, scored, timer, run_id)
        stop.check()
        m = scored["metrics"]
        manifest = _evaluation_manifest(model, input_url, split, rows, batch, scored, timer)
        manifest["files"] = {"evaluation": [_run_name(n, run_id) for n in files]}
        for name, data in files.items():
            run.write_bytes(_run_name(name, run_id), data)
        out.publish(run, manifest, aliases=files, stop=stop)
        return EvaluationSummary(
            output=out.url,
            run_id=run_id,
            images=len(rows),
            accuracy=float(m["accuracy"]),
            baseline_accuracy=scored["baseline"][1],
            baseline_label=scored["baseline"][0],
            metrics={**m, "top3_accuracy": scored["top3"]},
            timings=timer.rounded(),
            files=sorted(files),
        )
    finally:
        out.release()


def _score(model: Model, rows: pd.DataFrame, batch) -> dict[str, Any]:
    proba = model.predict_proba_batch(batch)
    ok = np.array([s == "ok" for s in batch.status], dtype=bool)
    classes = np.asarray(model.classes, dtype=object)
    best = proba.argmax(1) if len(proba) else np.zeros(0, int)
    y_true = [str(x) for x in rows["label"]]
    y_pred = [str(classes[b]) if k else None for b, k in zip(best, ok, strict=True)]
    labels = sorted(set(model.classes) | set(y_true))
    counts = model.meta.get("class_counts") or {}
    return {
        "proba": proba,
        "ok": ok,
        "best": best,
        "y_true": y_true,
        "y_pred": y_pred,
        "labels": labels,
        "metrics": metrics.compute_metrics(y_true, y_pred, labels),
        "top3": metrics.top_k_accuracy(y_true, proba, model.classes, ok, 3),
        "baseline": metrics.baseline(counts, y_true, model.classes[0]),
    }


def _model_facts(model: Model) -> dict[str, Any]:
    meta = model.meta
    return {"run_id": meta.get("run_id"), "kind": model.kind, "k": model.encoder.k,
            "C": (meta.get("classifier") or {}).get("C"), "color": model.encoder.color,
            "images_used": meta.get("images_used"), "input": meta.get("input"),
            "classes": list(model.classes)}  # fmt: skip


def _evaluation_files(model, input_url, split, rows, batch, scored, timer, run_id) -> dict:
    import pyarrow as pa

    m, labels = scored["metrics"], scored["labels"]
    cm = np.asarray(m["confusion"])
    base = scored["baseline"]
    title = f"accuracy {m['accuracy']:.3f} (baseline {base[1]:.3f}), {len(rows)} images"
    files: dict[str, bytes] = {}
    png = metrics.confusion_png(cm, labels, title)
    if png is not None:
        files["confusion.png"] = png
    cm_df = pd.DataFrame(cm, index=labels, columns=labels)
    files["confusion.csv"] = cm_df.to_csv(index_label="true\\predicted").encode()
    per_class = pd.DataFrame.from_dict(m["per_class"], orient="index")
    files["per_class.csv"] = per_class.to_csv(index_label="label").encode()
    proba, best, ok = scored["proba"], scored["best"], scored["ok"]
    table = pa.table({
        "path": pa.array(rows["path"].astype(str).tolist(), pa.string()),
        "label": pa.array(scored["y_true"], pa.string()),
        "predicted": pa.array(scored["y_pred"], pa.string()),
        "probability": pa.array(np.where(ok, proba[np.arange(len(best)), best], np.nan)
                                if len(best) else [], pa.float64()),
        "n_keypoints": pa.array(batch.n_keypoints, pa.int32()),
        "status": pa.array(batch.status, pa.string()),
    })  # fmt: skip
    buf = _io.BytesIO()
    import pyarrow.parquet as pq

    pq.write_table(table, buf)
    files["predictions.parquet"] = buf.getvalue()
    text = metrics.evaluation_markdown(_model_facts(model), input_url, split, m, base,
                                       timer.rounded(), "confusion.png" if png else None,
                                       scored["top3"])  # fmt: skip
    files["report.md"] = text.encode()
    return files


def _evaluation_manifest(model, input_url, split, rows, batch, scored, timer) -> dict:
    m = scored["metrics"]
    base = scored["baseline"]
    return {
        "model": {"run_id": model.meta.get("run_id"), "kind": model.kind, "k": model.encoder.k},
        "input": absolute(input_url),
        "split": split,
        "counts": {
            "images": len(rows),
            "classified": m["classified"],
            "no_keypoints": int(sum(s == "no_keypoints" for s in batch.status)),
            "error": int(sum(s == "error" for s in batch.status)),
        },
        "accuracy": m["accuracy"],
        "top3_accuracy": scored["top3"],
        "accuracy_classified": m["accuracy_classified"],
        "baseline": {"label": base[0], "accuracy": base[1]},
        "macro": {k: m[f"macro_{k}"] for k in ("precision", "recall", "f1")},
        "per_class": m["per_class"],
        "timings": timer.rounded(),
        "versions": library_versions(),
    }
