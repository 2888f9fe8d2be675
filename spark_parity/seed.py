"""The seed profile: the original EMR job's structure, for the comparison.

Row-at-a-time Python UDFs (labels from the path, ORB returning the descriptors
as nested arrays), ``posexplode``, a UDF to ``VectorUDT``, Spark's default file
packing (4 MB open cost: ~32 small images a partition), Spark ML for centring,
fit and transform, fitted on every descriptor. Spark's ``PCAModel`` does not
subtract the mean, so the vectors are centred with
``StandardScaler(withMean=True, withStd=False)`` before the PCA: the features
equal the Dask job's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import features, io, tables
from fruitdask.config import RunConfig
from fruitdask.errors import InputError, TransientError, one_line
from fruitdask.output import OutputDir, RunState
from fruitdask.pca import exact_report
from spark_parity.reading import Source, relative
from spark_parity.stages import (
    WRITTEN_SCHEMA,
    Watch,
    partition_id,
    pca_from_spark,
    record_errors,
    require_descriptors,
    written,
)

__all__ = ["run_seed"]

_ORB_STRUCT = (
    "struct<width:int, height:int, status:string, error:string, descriptors:array<array<int>>>"
)


def _keys(path: str, root_uri: str) -> tuple[str, str, str | None]:
    rel = relative(path, root_uri)
    label, split = io.label_split(rel)
    return rel, label, split


def _fetch(path: str, url: str, so: dict[str, Any], run: RunState):
    got = next(io.iter_objects(url, [path], so))
    if isinstance(got, TransientError):
        with record_errors(run, partition_id()):
            raise got
    if isinstance(got, BaseException):
        return None, f"read failed: {one_line(got)}"
    return got, None


def _orb(content, read_error, params: features.OrbParams):
    """The original job's UDF: bytes -> (size, status, descriptors as nested lists)."""
    if content is None:
        return (0, 0, "error", read_error or "read failed", [])
    f = features.extract(bytes(content), params)
    return (f.width, f.height, f.status, f.error, f.descriptors.tolist())


def _writer(table: str, run: RunState, signs: np.ndarray | None = None):
    """mapInArrow body writing one partition of a seed DataFrame as a fruitdask table."""
    schema = {"images": tables.IMAGES_SCHEMA, "descriptors": tables.DESCRIPTORS_SCHEMA}.get(
        table, tables.FEATURES_SCHEMA
    )

    def fn(batches):
        index = partition_id()
        pieces = [pa.Table.from_batches([b]) for b in batches if b.num_rows]
        if not pieces:
            out = schema.empty_table()
        else:
            t = pa.concat_tables(pieces)
            cols = {c: t.column(c).combine_chunks() for c in t.column_names}
            if table == "descriptors":
                d = cols.pop("d").flatten().to_numpy(zero_copy_only=False).astype(np.uint8)
                cols["descriptor"] = tables.binary_column(d.reshape(-1, features.DESCRIPTOR_BYTES))
            elif table == "features":
                p = cols.pop("p").flatten().to_numpy(zero_copy_only=False)
                p = p.reshape(t.num_rows, -1) * signs
                cols["pca"] = tables.list_column(p.astype(np.float32))
            out = pa.table(cols).select(schema.names).cast(schema)
        with record_errors(run, index):
            run.write_table(run.part(table, index), out)
        yield written(index, out.num_rows)

    return fn


def _bytes_frame(spark, cfg: RunConfig, source: Source, run: RunState):
    from pyspark.sql import functions as F
    from pyspark.sql.functions import udf

    if source.reader == "binaryfile":
        root = str(source.root_uri)
        keys = udf(lambda p: _keys(p, root), "struct<path:string,label:string,split:string>")
        return source.files.select(
            keys("path").alias("k"),
            F.col("length").alias("size"),
            "content",
            F.lit(None).cast("string").alias("read_error"),
        ).select("k.*", "size", "content", "read_error")
    listing = source.listing
    assert listing is not None
    if "shard" in listing.columns:
        raise InputError("--profile seed reads loose image files; use --profile tuned")
    rows = list(
        zip(
            listing["path"].tolist(),
            listing["label"].tolist(),
            [None if pd.isna(s) else s for s in listing["split"].tolist()],
            [int(x) for x in listing["size"]],
            strict=True,
        )
    )
    df = spark.createDataFrame(rows, "path string, label string, split string, size long")
    url, so = cfg.input, cfg.storage_options
    fetch = udf(lambda p: _fetch(p, url, so, run), "struct<content:binary,read_error:string>")
    return df.withColumn("r", fetch("path")).select(
        "path", "label", "split", "size", "r.content", "r.read_error"
    )


def _extract(spark, cfg, source, out: OutputDir, run: RunState, progress) -> tuple:
    from pyspark.sql import functions as F
    from pyspark.sql.functions import udf

    params = cfg.orb
    orb = udf(lambda c, e: _orb(c, e, params), _ORB_STRUCT)
    frame = _bytes_frame(spark, cfg, source, run)
    # from the uncached plan, which runs nothing (a cached one's .rdd starts the
    # extraction on Spark 3.5, before the run state plans its files)
    n_parts = frame.rdd.getNumPartitions()
    imgs = (
        frame.select("path", "label", "split", "size", orb("content", "read_error").alias("f"))
        .select("path", "label", "split", "size", "f.*")
        .cache()
    )
    out.expect(run, [run.part(t, i) for t in tables.TABLES for i in range(n_parts)])
    with Watch(spark, "extract", progress):
        agg = imgs.agg(
            F.count("*").alias("images"),
            F.sum((F.col("status") == "ok").cast("long")).alias("ok"),
            F.sum((F.col("status") == "no_keypoints").cast("long")).alias("no_keypoints"),
            F.sum((F.col("status") == "error").cast("long")).alias("error"),
            F.sum(F.size("descriptors")).alias("descriptors"),
            F.collect_set("label").alias("labels"),
        ).first()
        counts: dict[str, Any] = {k: int(agg[k] or 0) for k in agg.asDict() if k != "labels"}
        counts["labels"] = set(agg["labels"])
        imgs.select(
            "path", "label", "split", "size", "width", "height",
            F.size("descriptors").alias("n_keypoints"), "status", "error",
        ).mapInArrow(_writer("images", run), WRITTEN_SCHEMA).collect()  # fmt: skip
        descs = imgs.select(
            "path", "label", "split", F.posexplode("descriptors").alias("keypoint", "d")
        )
        if cfg.write_descriptors:
            descs.mapInArrow(_writer("descriptors", run), WRITTEN_SCHEMA).collect()
    return imgs, descs, counts, n_parts


def run_seed(
    spark, cfg: RunConfig, source: Source, out: OutputDir, run: RunState, timer,
    progress: Callable | None,
) -> dict[str, Any]:  # fmt: skip
    """Extract, fit and write with the seed profile (see the module docstring)."""
    from pyspark.ml.feature import PCA, StandardScaler
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.functions import udf

    with timer("extract"):
        imgs, descs, counts, n_parts = _extract(spark, cfg, source, out, run, progress)
    if progress:
        progress("extract", n_parts, n_parts, counts["images"])
    require_descriptors(cfg, counts)

    # PCA fit on VectorUDT rows: centre (Spark's PCAModel does not), then fit.
    # The vectors are cached, as Spark ML asks of inputs it passes over several
    # times (the scaler's pass, the PCA's two, the transform).
    with timer("pca_fit"):
        to_vec = udf(lambda d: Vectors.dense(d), VectorUDT())
        vec = descs.select("path", "label", "split", "keypoint", to_vec("d").alias("v")).cache()
        with Watch(spark, "pca_fit", None):
            scaler = StandardScaler(withMean=True, withStd=False, inputCol="v", outputCol="c")
            scaler_model = scaler.fit(vec)
            imgs.unpersist()
            centred = scaler_model.transform(vec)
            spark_model = PCA(k=cfg.n_components, inputCol="c", outputCol="p").fit(centred)
        var = scaler_model.std.toArray() ** 2
        model, signs = pca_from_spark(
            spark_model, scaler_model.mean.toArray(), var, counts["descriptors"]
        )

    with timer("transform_write"):
        feats = spark_model.transform(centred).select(
            "path", "label", "split", "keypoint", vector_to_array(F.col("p"), "float32").alias("p")
        )
        with Watch(spark, "features", progress):
            rows = feats.mapInArrow(_writer("features", run, signs), WRITTEN_SCHEMA).collect()
    if progress:
        progress("features", n_parts, n_parts, sum(r["rows"] for r in rows))
    vec.unpersist()
    # Spark's fit is an exact eigendecomposition of the covariance of every
    # descriptor here: it *is* the exact PCA.
    return {"parts": n_parts, "counts": counts, "model": model, "pca": exact_report(model)}
