"""The tuned profile: the best Spark we know for this job.

Partitions of about ``partition_size`` images in whole waves (file packing set
from the listing), one ``mapInArrow`` task per partition that decodes, runs
ORB, writes its ``images/`` and ``descriptors/`` files and caches its
descriptors in two forms (one opaque value for the write, a random sample as
float rows for the fit, see :func:`cache_batches`), Spark ML's PCA on a sample
of ``pca_sample`` descriptors as the Dask job fits on, and the projection and
write in one more ``mapInArrow``. The CLI also starts its JVM for a short job
(see :class:`spark_parity.session.SparkSpec`).

Spark's ``PCAModel.transform`` does **not** subtract the mean (sklearn and
dask-ml do); this profile subtracts the exact mean in its own projection, so
its features equal the Dask job's ``PcaModel.transform``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import features, source, tables
from fruitdask.config import RunConfig
from fruitdask.errors import retrying
from fruitdask.output import OutputDir, RunState
from fruitdask.pca import pca_report
from spark_parity.reading import Source, binary_pieces, packing_conf, session_conf
from spark_parity.stages import (
    WRITTEN_SCHEMA,
    Watch,
    combined,
    partition_id,
    pca_from_spark,
    record_errors,
    require_descriptors,
    write_extracted,
    written,
)

__all__ = ["CACHE_SCHEMA", "cache_batches", "run_tuned", "sample_cap"]

#: What the tuned profile caches between extraction and the fit / the write.
CACHE_SCHEMA = "part int, rank int, x array<float>, blob binary"
CACHE_COLUMNS = ["part", "rank", "x", "blob"]
# Image rows per Arrow batch into the extraction: bounds memory with large images.
_IMAGE_BATCH = 256


def sample_cap(n_rows: int, n_images: int, cfg: RunConfig) -> int:
    """Descriptors of a partition of ``n_rows`` images kept for the PCA fit.

    As in the Dask job: 4x the partition's share of a ``pca_sample``-row sample
    if descriptors were spread evenly over images (0 = keep every descriptor).
    """
    if cfg.pca_sample <= 0:
        return 2**31 - 1
    return math.ceil(4 * cfg.pca_sample * n_rows / max(n_images, 1)) + cfg.n_components


def cache_batches(
    index: int, rows: pd.DataFrame, counts: np.ndarray, desc: np.ndarray, cap: int
) -> Iterator[pa.RecordBatch]:
    """A partition's rows for Spark's cache (:data:`CACHE_SCHEMA`).

    * one row (rank -1) whose ``blob`` holds the partition's listing rows,
      keypoint counts and descriptors, for the transform + write;
    * up to ``cap`` rows (rank 0, 1, ...) with one descriptor each as ``x``
      floats, a uniform random subset in random order (any prefix of it is a
      uniform sample too), for the PCA fit.

    Holding the partition as one opaque value instead of a row per keypoint
    with its path, label and split spares the JVM converting and caching a
    million rows of strings (~5 s of CPU for 20,000 images).
    """
    keys = {
        c: rows[c].astype(object).where(rows[c].notna(), None).tolist() for c in tables.KEY_COLUMNS
    }
    blob = pickle.dumps((keys, counts, desc), protocol=5)
    yield pa.RecordBatch.from_arrays(
        [
            pa.array([index], pa.int32()),
            pa.array([-1], pa.int32()),
            pa.nulls(1, pa.list_(pa.float32())),
            pa.array([blob], pa.binary()),
        ],
        names=CACHE_COLUMNS,
    )
    rng = np.random.default_rng([index, 20])
    take = rng.permutation(len(desc))[: min(cap, len(desc))]
    n = len(take)
    values = pa.array(desc[take].reshape(-1).astype(np.float32), pa.float32())
    width = features.DESCRIPTOR_BYTES
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    yield pa.RecordBatch.from_arrays(
        [
            pa.array(np.full(n, index, np.int32)),
            pa.array(np.arange(n, dtype=np.int32)),
            pa.ListArray.from_arrays(offsets, values),
            pa.nulls(n, pa.binary()),
        ],
        names=CACHE_COLUMNS,
    )


def _extract_binary(cfg: RunConfig, run: RunState, root_uri: str, n_images: int):
    """mapInArrow body over a binaryFile scan: one partition -> its files + cache rows."""

    def fn(batches):
        index = partition_id()
        with record_errors(run, index):
            parts = []
            for rows, data in binary_pieces(batches, root_uri):
                images, desc, counts = tables.extract_partition(rows, data, cfg.orb)
                parts.append((rows, images, desc, counts))
            rows, counts, desc = write_extracted(index, parts, run, cfg.write_descriptors)
        yield from cache_batches(index, rows, counts, desc, sample_cap(len(rows), n_images, cfg))

    return fn


def _extract_listed(cfg: RunConfig, run: RunState, listing_bc, ranges):
    """mapInArrow body over ``spark.range(n_parts)``: fetch and extract the listed chunk."""

    def fn(batches):
        index = partition_id()
        for b in batches:  # one id per partition (spark.range(0, n, 1, n))
            for part in b.column("id").to_pylist():
                if part != index:
                    raise AssertionError(f"partition {index} got chunk {part}")
        a, z = ranges[index]
        rows = listing_bc.value.iloc[a:z].reset_index(drop=True)

        def body():
            data = source.iter_images(cfg.input, rows, cfg.storage_options, cfg.orb.max_pixels)
            return tables.extract_partition(rows, data, cfg.orb)

        with record_errors(run, index):
            images, desc, counts = retrying(body)()
            parts = [(rows, images, desc, counts)]
            rows, counts, desc = write_extracted(index, parts, run, cfg.write_descriptors)
        n_images = len(listing_bc.value)
        yield from cache_batches(index, rows, counts, desc, sample_cap(len(rows), n_images, cfg))

    return fn


def _features(run: RunState, mean: np.ndarray, components: np.ndarray):
    """mapInArrow body over the cached partition blobs: centre, project, write features/."""
    mean32 = mean.astype(np.float32)
    comps32 = components.astype(np.float32)

    def fn(batches):
        for b in batches:
            parts = b.column("part").to_pylist()
            for index, blob in zip(parts, b.column("blob").to_pylist(), strict=True):
                keys, counts, desc = pickle.loads(blob)
                rows = pd.DataFrame(
                    {c: pd.array(keys[c], dtype="string") for c in tables.KEY_COLUMNS}
                )
                proj = (desc.astype(np.float32) - mean32) @ comps32.T
                with record_errors(run, index):
                    table = tables.features_table(rows, counts, proj)
                    run.write_table(run.part("features", index), table)
                yield written(index, table.num_rows)

    return fn


def _extract(spark, cfg, source: Source, out: OutputDir, run: RunState, cores: int):
    """The cached extraction DataFrame (not yet computed) and its broadcast listing."""
    if source.reader == "binaryfile":
        conf = packing_conf(source.files, source.n_images, cfg.partition_size, cores)
        conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(_IMAGE_BATCH)
        body = _extract_binary(cfg, run, str(source.root_uri), source.n_images)
        with session_conf(spark, conf):
            src = source.files.select("path", "length", "content")
            # The count from the file scan's plan, which runs nothing: on Spark
            # 3.5 the cached DataFrame's .rdd started the extraction, whose
            # files were then written before the run state planned them.
            n_parts = src.rdd.getNumPartitions()
            cached = src.mapInArrow(body, CACHE_SCHEMA).cache()
        return cached, None, n_parts, conf
    n_parts = len(source.ranges or [])
    bc = spark.sparkContext.broadcast(source.listing)
    body = _extract_listed(cfg, run, bc, source.ranges)
    cached = spark.range(0, n_parts, 1, n_parts).mapInArrow(body, CACHE_SCHEMA).cache()
    return cached, bc, n_parts, {}


def run_tuned(
    spark, cfg: RunConfig, source: Source, out: OutputDir, run: RunState, cores: int, timer,
    progress: Callable | None,
) -> dict[str, Any]:  # fmt: skip
    """Extract, fit and write with the tuned profile; returns the partitions'
    count, the counts, the model and the PCA report."""
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    with timer("extract"):
        cached, bc, n_parts, conf = _extract(spark, cfg, source, out, run, cores)
        out.expect(run, [run.part(t, i) for t in tables.TABLES for i in range(n_parts)])
        with session_conf(spark, conf), Watch(spark, "extract", progress):
            cached.count()
        counts, total, per_part = combined(run.done(n_parts))
        if progress:
            progress("extract", n_parts, n_parts, counts["images"])
    require_descriptors(cfg, counts)

    # PCA fit: Spark ML on a uniform sample of about pca_sample descriptors (all
    # of them with 0), as the Dask job does: each partition cached a random
    # subset in random order, and takes its share of the sample from its head,
    # in proportion to its descriptor count. The mean, which Spark's PCAModel
    # neither keeps nor subtracts, is the exact one from the partitions' moments.
    with timer("pca_fit"):
        n_desc = counts["descriptors"]
        want = min(cfg.pca_sample, n_desc) if cfg.pca_sample > 0 else n_desc
        quotas = [
            min(n, sample_cap(images, source.n_images, cfg), round(want * n / n_desc))
            for images, n in per_part
        ]
        rank_ok = (F.col("rank") >= 0) & (
            F.col("rank") < F.element_at(F.array(*[F.lit(q) for q in quotas]), F.col("part") + 1)
        )
        vec = cached.filter(rank_ok).select(array_to_vector(F.col("x")).alias("v"))
        with Watch(spark, "pca_fit", None):
            spark_model = PCA(k=cfg.n_components, inputCol="v").fit(vec.coalesce(cores))
        cov_diag = np.diag(total.scatter) / max(total.n - 1, 1)
        model, _ = pca_from_spark(spark_model, total.mean, cov_diag, sum(quotas))

    with timer("transform_write"):
        body = _features(run, model.mean, model.components)
        with Watch(spark, "features", progress):
            rows = cached.filter(F.col("rank") < 0).mapInArrow(body, WRITTEN_SCHEMA).collect()
        if sorted(r["part"] for r in rows) != list(range(n_parts)):
            from fruitdask.errors import JobError

            raise JobError("the features of some partitions were not written")
        if progress:
            progress("features", n_parts, n_parts, sum(r["rows"] for r in rows))
    cached.unpersist()
    if bc is not None:
        bc.destroy()
    return {"parts": n_parts, "counts": counts, "model": model, "pca": pca_report(model, total)}
