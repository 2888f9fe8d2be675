"""What both Spark profiles share: executor-side helpers, progress, the PCA model.

Executors write their partition's Parquet files through :class:`RunState`
(local or S3 alike; Spark's own writer would need s3a and would write other
file names and Parquet types). A typed fruitdask error in an executor reaches
the driver as JVM text; :func:`record_errors` also writes it as a small record
in the run's state, from which the driver raises the same type.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import features, tables
from fruitdask.config import RunConfig
from fruitdask.errors import FruitdaskError, InputError, from_record, to_record
from fruitdask.output import RunState
from fruitdask.pca import Moments, PcaModel, combine_moments, moments

__all__ = [
    "WRITTEN_SCHEMA",
    "Watch",
    "combined",
    "empty_rows",
    "partition_id",
    "pca_from_spark",
    "record_errors",
    "recorded_error",
    "require_descriptors",
    "write_extracted",
    "written",
]

WRITTEN_SCHEMA = "part int, rows long"


def partition_id() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return int(ctx.partitionId()) if ctx is not None else 0


def written(part: int, rows: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"part": pa.array([part], pa.int32()), "rows": pa.array([rows], pa.int64())}
    )


def empty_rows() -> pd.DataFrame:
    return pd.DataFrame({c: pd.array([], dtype="string") for c in tables.KEY_COLUMNS})


def _error_file(run: RunState, index: int) -> str:
    return f"{run.folder}/errors/{index:05d}.json"


@contextlib.contextmanager
def record_errors(run: RunState, index: int) -> Iterator[None]:
    """Executor side: keep a typed error of partition ``index`` where the driver finds it."""
    try:
        yield
    except FruitdaskError as exc:
        with contextlib.suppress(FruitdaskError):
            run.write_bytes(_error_file(run, index), json.dumps(to_record(exc)).encode())
        raise


def recorded_error(run: RunState) -> FruitdaskError | None:
    """Driver side: the first typed error an executor recorded, if any."""
    from fruitdask import io

    for name in io.ls(io.join(run.url, run.folder, "errors"), run.storage_options):
        text = io.read_text(run.url_of(f"{run.folder}/errors/{name}"), run.storage_options)
        if text:
            return from_record(json.loads(text))
    return None


def write_extracted(
    index: int,
    parts: list[tuple[pd.DataFrame, pa.Table, np.ndarray, np.ndarray]],
    run: RunState,
    write_descriptors: bool,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Write a partition's images/ and descriptors/ files, and its done marker
    holding its counts, labels and exact moments (mean, scatter), which the
    driver combines for the mean Spark's PCAModel lacks and for the exact
    reference the fit is checked against.

    Returns the partition's listing rows, keypoints per image and descriptors.
    """
    if parts:
        images = pa.concat_tables([p[1] for p in parts])
        desc = np.concatenate([p[2] for p in parts])
        rows = pd.concat([p[0] for p in parts], ignore_index=True)
        counts = np.concatenate([p[3] for p in parts])
    else:
        images = tables.IMAGES_SCHEMA.empty_table()
        desc = np.zeros((0, features.DESCRIPTOR_BYTES), np.uint8)
        rows, counts = empty_rows(), np.zeros(0, np.int32)
    run.write_table(run.part("images", index), images)
    if write_descriptors:
        run.write_table(
            run.part("descriptors", index), tables.descriptors_table(rows, counts, desc)
        )
    m = moments(desc)
    run.mark_done(index, {
        **tables.status_counts(images),
        "descriptors": int(len(desc)),
        "labels": sorted({str(x) for x in images.column("label").to_pylist()}),
        "moments": {"n": m.n, "mean": m.mean.tolist(), "scatter": m.scatter.tolist()},
    })  # fmt: skip
    return rows, counts, desc


def combined(markers: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], Moments, list]:
    """Counts, combined moments and (images, descriptors) per partition, from the
    partitions' done markers (:func:`write_extracted`)."""
    parts = [markers[i] for i in sorted(markers)]
    keys = ("images", "ok", "no_keypoints", "error", "descriptors")
    counts: dict[str, Any] = {k: sum(int(p[k]) for p in parts) for k in keys}
    counts["labels"] = set().union(*(p["labels"] for p in parts))
    total = Moments(0, np.zeros(features.DESCRIPTOR_BYTES), np.zeros((32, 32)))
    for p in parts:
        m = p["moments"]
        total = combine_moments(
            total, Moments(int(m["n"]), np.asarray(m["mean"]), np.asarray(m["scatter"]))
        )
    return counts, total, [(int(p["images"]), int(p["descriptors"])) for p in parts]


def pca_from_spark(spark_model, mean: np.ndarray, var: np.ndarray, n: int):
    """A fruitdask :class:`PcaModel` from a fitted ``pyspark.ml.feature.PCAModel``,
    and the sign flips applied to its components.

    Spark reports ``explainedVariance`` as ratios of the total variance; the
    variances are the ratios times the trace of the covariance (the sum of the
    per-column sample variances). Components get fruitdask's sign convention
    (the largest-magnitude loading positive), so models compare axis by axis.
    """
    comps = np.asarray(spark_model.pc.toArray(), dtype=np.float64).T  # (k, n_features)
    idx = np.argmax(np.abs(comps), axis=1)
    signs = np.sign(comps[np.arange(len(comps)), idx])
    signs[signs == 0] = 1
    ratio = np.asarray(spark_model.explainedVariance.toArray(), dtype=np.float64)
    model = PcaModel(
        mean=np.asarray(mean, dtype=np.float64),
        components=comps * signs[:, None],
        explained_variance=ratio * float(np.sum(var)),
        explained_variance_ratio=ratio,
        n_samples=int(n),
        method="spark",
    )
    return model, signs


class Watch:
    """Report a stage's task progress from Spark's status tracker (a polling thread)."""

    def __init__(self, spark, stage: str, progress: Callable | None, interval: float = 2.0):
        self.sc = spark.sparkContext
        self.stage = stage
        self.progress = progress
        self.interval = interval
        self.group = f"fruitdask-{stage}-{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tasks(self) -> tuple[int, int]:
        tracker = self.sc.statusTracker()
        done = total = 0
        for job in tracker.getJobIdsForGroup(self.group):
            info = tracker.getJobInfo(job)
            for sid in info.stageIds if info else []:
                st = tracker.getStageInfo(sid)
                if st is not None:
                    done += st.numCompletedTasks
                    total += st.numTasks
        return done, total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                done, total = self.tasks()
            except Exception:  # noqa: BLE001 - progress is informational
                continue
            if total and self.progress:
                self.progress(self.stage, done, total, 0)

    def __enter__(self) -> Watch:
        self.sc.setJobGroup(self.group, f"fruitdask {self.stage}")
        if self.progress:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def require_descriptors(cfg: RunConfig, counts: dict[str, Any]) -> None:
    need = max(2, cfg.n_components)
    if counts["descriptors"] < need:
        raise InputError(
            f"{cfg.input}: only {counts['descriptors']} ORB descriptors in "
            f"{counts['images']} images; PCA with {cfg.n_components} components needs at "
            f"least {need}"
        )
