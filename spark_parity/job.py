"""The fruitdask job in PySpark: listing -> decode + ORB -> PCA -> Parquet.

It writes what ``fruitdask run`` writes (the layout of :mod:`fruitdask.pipeline`:
``images/``, ``descriptors/``, ``features/``, ``model/pca-<run>.json``,
``manifest.json``, ``_SUCCESS`` last), with the same schemas, the same file names
and the same PCA model format, so only the manifest's ``"engine": "spark"`` tells
which engine wrote a result. The per-image work is the same code as Dask's:
:func:`fruitdask.pipeline.extract_partition` over :mod:`fruitdask.features`.

Reading (``reader``)
    ``binaryfile``, the default for a local folder: ``spark.read.format("binaryFile")``,
    recursive, with a glob of the image extensions in any case; labels and splits
    come from the paths. Hadoop skips empty files and names starting with ``_``
    or ``.``, which the fruitdask listing keeps: the job notices the difference
    and extracts those files on the driver, so every listed file gets its row.
    ``fsspec``, the default for anything else (S3 without a Hadoop S3 connector,
    packed inputs, other fsspec URLs): the driver lists with
    :func:`fruitdask.io.list_images`, partitions as the Dask job does, and the
    executors fetch the bytes with :func:`fruitdask.io.iter_images`.
    ``native_s3=True`` reads ``s3://`` with binaryFile, for EMR, where EMRFS is
    Hadoop's ``s3://`` file system (there is no Hadoop S3 connector here).

Writing
    Executors write their partition's Parquet files through :func:`fruitdask.io.write_table`
    (local or S3 alike; Spark's own writer would need s3a and would write other
    file names and Parquet types); the driver writes the model, the manifest and
    ``_SUCCESS`` and then deletes what an overwritten run left.

PCA
    ``pyspark.ml.feature.PCA`` on ``array_to_vector`` of the descriptors as
    floats. Spark's fit is exact (an eigendecomposition of the covariance, like
    ``fruitdask.pca.exact_pca``), but ``PCAModel.transform`` does **not** subtract
    the mean (sklearn and dask-ml do): its outputs differ from Dask's by a
    constant per component (the projected mean, ~100s here). Both profiles
    therefore write *centred* features, ``(x - mean) @ components.T``, which is
    what ``PcaModel.transform`` computes on the saved model: ``tuned`` subtracts
    the mean in its projection, ``seed`` centres the vectors with
    ``StandardScaler(withMean=True, withStd=False)`` before the PCA. Components
    get fruitdask's sign convention, so models compare axis by axis.

Profiles
    ``seed`` is the original EMR job's structure: row-at-a-time Python UDFs
    (labels from the path, ORB returning the descriptors as nested arrays),
    ``posexplode``, a UDF to ``VectorUDT``, Spark's default file packing (4 MB
    open cost: ~32 small images a partition), Spark ML for centring, fit and
    transform, fitted on every descriptor.
    ``tuned`` is the best Spark we know: partitions of about ``partition_size``
    images in whole waves (file packing set from the listing), one
    ``mapInArrow`` task per partition that decodes, runs ORB, writes its
    ``images/`` and ``descriptors/`` files and caches its descriptors in two
    forms (one opaque value for the write, a random sample as float rows for
    the fit, see :func:`_cache_batches`), Spark ML's PCA on a sample of
    ``pca_sample`` descriptors as the Dask job fits on, and the projection and
    write in one more ``mapInArrow``. The CLI also starts its JVM for a short
    job (see :class:`spark_parity.session.SparkSpec`).
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import platform
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import features, io
from fruitdask.config import RunConfig
from fruitdask.pca import (
    Moments,
    PcaModel,
    combine_moments,
    exact_pca,
    moments,
    principal_angles,
    variance_captured,
)
from fruitdask.pipeline import (
    DESCRIPTORS_SCHEMA,
    FEATURES_SCHEMA,
    IMAGES_SCHEMA,
    TABLES,
    OutputExistsError,
    RunSummary,
    # The Dask job's own table builders and file naming, shared rather than
    # copied: that is what keeps the two engines' files identical.
    _binary_column,
    _keys,
    _list_column,
    _part_name,
    extract_partition,
    plan_packed_partitions,
    plan_partitions,
)
from spark_parity.session import quiet_pandas_warning

__all__ = ["PROFILES", "READERS", "SparkJobError", "preflight", "run"]

PROFILES = ("tuned", "seed")
#: How the input is read: Spark's binaryFile source (local folders; s3:// on EMR),
#: or the driver's fruitdask listing with the bytes fetched in the executors.
READERS = ("binaryfile", "fsspec")
#: The Dask job's in-flight state folder; a Spark run deletes it when it publishes.
STATE_DIR = "_fruitdask"
#: Retries of a partition whose store failed as a whole (cf. fruitdask.pipeline.RETRY_WAITS);
#: Spark's local mode does not retry failed tasks.
RETRY_WAITS = (1.0, 2.0, 4.0, 8.0)
#: Spark's default ``spark.sql.files.openCostInBytes``: the tuned packing keeps it
#: and sets the partition size in these units, so bigger images weigh more.
OPEN_COST = 4 * 1024 * 1024
#: What the tuned profile caches between extraction and the fit / the write (see _cache_batches).
CACHE_SCHEMA = "part int, rank int, x array<float>, blob binary"
CACHE_COLUMNS = ["part", "rank", "x", "blob"]
KEY_COLUMNS = ("path", "label", "split")
_WRITTEN_SCHEMA = "part int, rows long"
# Image rows per Arrow batch into the extraction: bounds memory with large images.
_IMAGE_BATCH = 256


class SparkJobError(Exception):
    """A Spark job failed for a reason other than storage (one-line message)."""


@dataclass
class _Source:
    reader: str  # see READERS
    n_images: int  # what Spark lists (binaryFile) or the driver's listing
    files: Any = None  # binaryFile DataFrame
    root_uri: str | None = None
    listing: pd.DataFrame | None = None  # the driver's listing, when there is one
    ranges: list[tuple[int, int]] | None = None


# ---------------------------------------------------------------- small helpers
def _glob(extensions: tuple[str, ...]) -> str:
    """A Hadoop glob matching the extensions in any case: ``*.{[jJ][pP][gG],...}``."""
    alts = [
        "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in e[1:])
        for e in extensions
    ]
    return "*.{" + ",".join(alts) + "}"


def _relative(uri: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    if uri.startswith(prefix):
        return uri[len(prefix) :]
    # Hadoop spells a local root file:/x; tolerate file:///x in either string.
    norm = re.sub(r"^file:/+", "file:/", uri)
    nprefix = re.sub(r"^file:/+", "file:/", prefix)
    if norm.startswith(nprefix):
        return norm[len(nprefix) :]
    raise ValueError(f"{uri} is not under the input root {root}")


def _label_split(rel: str) -> tuple[str, str | None]:
    # The Dask listing's rule (parent folder = label, Training/Test ancestor = split).
    return io.label_split(rel)


def _empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def _written(part: int, rows: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"part": pa.array([part], pa.int32()), "rows": pa.array([rows], pa.int64())}
    )


def _partition_id() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return int(ctx.partitionId()) if ctx is not None else 0


def _retry(fn: Callable[[], Any]) -> Any:
    """Run an idempotent partition body again when the store (not a file) failed."""
    for wait in (*RETRY_WAITS, None):
        try:
            return fn()
        except Exception as exc:
            if wait is None or not io.is_transient(exc):
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _translate(exc: BaseException, cfg: RunConfig) -> BaseException:
    """One line for a failed Spark action: the StorageError raised in a Python
    worker when there is one (it travels as text inside the Py4J error)."""
    if isinstance(exc, (io.StorageError, OutputExistsError, SparkJobError)):
        return exc
    text = str(exc)
    m = re.search(r"fruitdask\.io\.(?:Transient)?StorageError: ([^\n]+)", text)
    if m:
        return io.StorageError(m.group(1).strip())
    if "PATH_NOT_FOUND" in text:
        return io.StorageError(f"{cfg.input}: not found (no such file, folder, bucket or prefix)")
    if "No FileSystem for scheme" in text:
        scheme = re.search(r'No FileSystem for scheme "?([\w-]+)', text)
        name = scheme.group(1) if scheme else "?"
        return io.StorageError(
            f"{cfg.input}: Spark has no Hadoop file system for {name}:// here (--native-s3 "
            "needs EMRFS on EMR or the hadoop-aws jar); without --native-s3 the executors "
            "read it through fsspec"
        )
    m = re.search(r"(\w+(?:Error|Exception)): ([^\n]+)\n?\s*$", text.strip())
    detail = f"{m.group(1)}: {m.group(2)}" if m else _first_line(text)
    return SparkJobError(f"Spark job failed: {detail}")


# ---------------------------------------------------------------- progress
class _Watch:
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

    def __enter__(self) -> _Watch:
        self.sc.setJobGroup(self.group, f"fruitdask {self.stage}")
        if self.progress:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ---------------------------------------------------------------- executor side: tuned
def _binary_pieces(batches, root_uri: str) -> Iterator[tuple[pd.DataFrame, list]]:
    """(listing rows, bytes) per Arrow batch of a binaryFile scan."""
    for b in batches:
        if b.num_rows == 0:
            continue
        rel = [_relative(p, root_uri) for p in b.column("path").to_pylist()]
        ls = [_label_split(r) for r in rel]
        rows = pd.DataFrame(
            {
                "path": pd.array(rel, dtype="string"),
                "label": pd.array([x[0] for x in ls], dtype="string"),
                "split": pd.array([x[1] for x in ls], dtype="string"),
                "size": b.column("length").to_numpy(zero_copy_only=False).astype(np.int64),
            }
        )
        yield rows, b.column("content").to_pylist()


def _write_extracted(
    index: int,
    parts: list[tuple[pd.DataFrame, pa.Table, np.ndarray, np.ndarray]],
    cfg: RunConfig,
    run_id: str,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Write a partition's images/ and descriptors/ files and its summary.

    Returns the partition's listing rows, keypoints per image and descriptors.
    """
    so = cfg.out_storage_options
    name = _part_name(index, run_id)
    if parts:
        images = pa.concat_tables([p[1] for p in parts])
        desc = np.concatenate([p[2] for p in parts])
        rows = pd.concat([p[0] for p in parts], ignore_index=True)
        counts = np.concatenate([p[3] for p in parts])
    else:
        images = _empty(IMAGES_SCHEMA)
        desc = np.zeros((0, features.DESCRIPTOR_BYTES), np.uint8)
        rows = pd.DataFrame({c: pd.array([], dtype="string") for c in ("path", "label", "split")})
        counts = np.zeros(0, np.int32)
    keys = _keys(rows, counts)
    io.write_table(images, io.join(cfg.output, "images", name), so)
    if cfg.write_descriptors:
        dtable = pa.table({**keys, "descriptor": _binary_column(desc)}).cast(DESCRIPTORS_SCHEMA)
        io.write_table(dtable, io.join(cfg.output, "descriptors", name), so)
    # Written last, like the Dask job's done-markers: counts for the manifest and
    # the exact moments (mean, scatter) the driver combines for the mean Spark's
    # PCAModel lacks and for the exact reference the fit is checked against.
    status = images.column("status").to_pylist()
    m = moments(desc)
    summary = {
        "index": index,
        "images": images.num_rows,
        "ok": status.count("ok"),
        "no_keypoints": status.count("no_keypoints"),
        "error": status.count("error"),
        "descriptors": int(len(desc)),
        "labels": sorted({str(x) for x in images.column("label").to_pylist()}),
        "moments": {"n": m.n, "mean": m.mean.tolist(), "scatter": m.scatter.tolist()},
    }
    io.write_bytes(_summary_url(cfg, index, run_id), json.dumps(summary).encode(), so)
    return rows, counts, desc


def _summary_url(cfg: RunConfig, index: int, run_id: str) -> str:
    return io.join(cfg.output, STATE_DIR, "spark", f"{index:05d}-{run_id}.json")


def _sample_cap(n_rows: int, n_images: int, cfg: RunConfig) -> int:
    """Descriptors of a partition of ``n_rows`` images kept for the PCA fit.

    As in the Dask job: 4x the partition's share of a ``pca_sample``-row sample
    if descriptors were spread evenly over images (0 = keep every descriptor).
    """
    if cfg.pca_sample <= 0:
        return 2**31 - 1
    return math.ceil(4 * cfg.pca_sample * n_rows / max(n_images, 1)) + cfg.n_components


def _cache_batches(
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
    keys = {c: rows[c].astype(object).where(rows[c].notna(), None).tolist() for c in KEY_COLUMNS}
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
    offsets = pa.array(np.arange(0, (n + 1) * features.DESCRIPTOR_BYTES, 32, dtype=np.int32))
    yield pa.RecordBatch.from_arrays(
        [
            pa.array(np.full(n, index, np.int32)),
            pa.array(np.arange(n, dtype=np.int32)),
            pa.ListArray.from_arrays(offsets, values),
            pa.nulls(n, pa.binary()),
        ],
        names=CACHE_COLUMNS,
    )


def _tuned_extract_binary(cfg: RunConfig, run_id: str, root_uri: str, n_images: int):
    """mapInArrow body over a binaryFile scan: one partition -> its files + cache rows."""

    def fn(batches):
        index = _partition_id()
        parts = []
        for rows, data in _binary_pieces(batches, root_uri):
            images, desc, counts = extract_partition(rows, data, cfg.orb)
            parts.append((rows, images, desc, counts))
        rows, counts, desc = _write_extracted(index, parts, cfg, run_id)
        yield from _cache_batches(index, rows, counts, desc, _sample_cap(len(rows), n_images, cfg))

    return fn


def _tuned_extract_listed(cfg: RunConfig, run_id: str, listing_bc, ranges):
    """mapInArrow body over ``spark.range(n_parts)``: fetch and extract the listed chunk."""

    def fn(batches):
        index = _partition_id()
        for b in batches:  # one id per partition (spark.range(0, n, 1, n))
            for part in b.column("id").to_pylist():
                if part != index:
                    raise AssertionError(f"partition {index} got chunk {part}")
        a, z = ranges[index]
        rows = listing_bc.value.iloc[a:z].reset_index(drop=True)

        def body():
            data = io.iter_images(cfg.input, rows, cfg.storage_options)
            return extract_partition(rows, data, cfg.orb)

        images, desc, counts = _retry(body)
        rows, counts, desc = _write_extracted(index, [(rows, images, desc, counts)], cfg, run_id)
        n_images = len(listing_bc.value)
        yield from _cache_batches(index, rows, counts, desc, _sample_cap(len(rows), n_images, cfg))

    return fn


def _tuned_features(cfg: RunConfig, run_id: str, mean: np.ndarray, components: np.ndarray):
    """mapInArrow body over the cached partition blobs: centre, project, write features/."""
    mean32 = mean.astype(np.float32)
    comps32 = components.astype(np.float32)

    def fn(batches):
        for b in batches:
            for index, blob in zip(
                b.column("part").to_pylist(), b.column("blob").to_pylist(), strict=True
            ):
                keys, counts, desc = pickle.loads(blob)
                rows = pd.DataFrame({c: pd.array(keys[c], dtype="string") for c in KEY_COLUMNS})
                proj = (desc.astype(np.float32) - mean32) @ comps32.T
                table = pa.table({**_keys(rows, counts), "pca": _list_column(proj)})
                name = _part_name(index, run_id)
                io.write_table(
                    table.cast(FEATURES_SCHEMA),
                    io.join(cfg.output, "features", name),
                    cfg.out_storage_options,
                )
                yield _written(index, table.num_rows)

    return fn


# ---------------------------------------------------------------- executor side: seed
_ORB_STRUCT = (
    "struct<width:int, height:int, status:string, error:string, descriptors:array<array<int>>>"
)


def _seed_keys(path: str, root_uri: str) -> tuple[str, str, str | None]:
    rel = _relative(path, root_uri)
    label, split = _label_split(rel)
    return rel, label, split


def _seed_fetch(path: str, url: str, so: dict[str, Any]) -> tuple[bytes | None, str | None]:
    got = io.read_bytes(url, [path], so)[0]
    if isinstance(got, BaseException):
        if io.is_transient(got):
            raise io.TransientStorageError(f"{path}: {io.translate(got, path)}")
        return None, f"read failed: {io.translate(got, path)}"
    return got, None


def _seed_orb(content, read_error, params: features.OrbParams):
    """The original job's UDF: bytes -> (size, status, descriptors as nested lists)."""
    if content is None:
        return (0, 0, "error", read_error or "read failed", [])
    f = features.extract(bytes(content), params)
    return (f.width, f.height, f.status, f.error, f.descriptors.tolist())


def _seed_writer(table: str, cfg: RunConfig, run_id: str, signs: np.ndarray | None = None):
    """mapInArrow body writing one partition of a seed DataFrame as a fruitdask table."""
    schema = {"images": IMAGES_SCHEMA, "descriptors": DESCRIPTORS_SCHEMA}.get(
        table, FEATURES_SCHEMA
    )

    def fn(batches):
        index = _partition_id()
        tables = [pa.Table.from_batches([b]) for b in batches if b.num_rows]
        if not tables:
            out = _empty(schema)
        else:
            t = pa.concat_tables(tables)
            cols = {c: t.column(c).combine_chunks() for c in t.column_names}
            if table == "descriptors":
                d = cols.pop("d").flatten().to_numpy(zero_copy_only=False).astype(np.uint8)
                cols["descriptor"] = _binary_column(d.reshape(-1, features.DESCRIPTOR_BYTES))
            elif table == "features":
                p = cols.pop("p").flatten().to_numpy(zero_copy_only=False)
                p = p.reshape(t.num_rows, -1) * signs
                cols["pca"] = _list_column(p.astype(np.float32))
            out = pa.table(cols).select(schema.names).cast(schema)
        name = _part_name(index, run_id)
        io.write_table(out, io.join(cfg.output, table, name), cfg.out_storage_options)
        yield _written(index, out.num_rows)

    return fn


# ---------------------------------------------------------------- driver side
def _check_local_input(cfg: RunConfig) -> str:
    fs, root = io.filesystem(cfg.input, cfg.storage_options)
    try:
        exists, isfile = fs.exists(root), fs.isfile(root)
    except Exception as exc:  # noqa: BLE001 - translated at the boundary
        raise io.translate(exc, cfg.input, "list") from None
    if not exists:
        raise io.StorageError(f"{cfg.input}: not found (no such file, folder, bucket or prefix)")
    if isfile:
        raise io.StorageError(f"{cfg.input}: is a file; give the folder that holds the images")
    return root


def _is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


def _choose_reader(cfg: RunConfig, native_s3: bool, reader: str | None = None) -> str:
    protocol = fsspec.utils.get_protocol(cfg.input)
    if reader is not None and reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    if native_s3:
        if protocol not in ("s3", "s3a", "s3n"):
            raise ValueError(f"--native-s3 applies to s3:// inputs, not {cfg.input}")
        return "binaryfile"
    packed = io.exists(io.join(cfg.input, io.PACK_INDEX), cfg.storage_options)
    if reader == "binaryfile" and (not _is_local(cfg.input) or packed):
        raise ValueError(
            "the binaryfile reader reads local folders of images (and s3:// with --native-s3)"
        )
    if reader is not None:
        return reader
    return "binaryfile" if _is_local(cfg.input) and not packed else "fsspec"


def _qualified(spark, uri: str) -> str:
    """The root as Hadoop spells the paths it lists (``file:/x``, ``s3://b/p``)."""
    jvm = spark._jvm
    p = jvm.org.apache.hadoop.fs.Path(uri)
    fs = p.getFileSystem(spark._jsc.hadoopConfiguration())
    return str(fs.makeQualified(p).toString())


def _open_source(
    spark,
    cfg: RunConfig,
    reader: str,
    cores: int,
    listing: pd.DataFrame | None = None,
    tuned: bool = True,
) -> _Source:
    """List the input: a binaryFile relation (listed by Spark), or the driver's listing."""
    if reader == "fsspec":
        if listing is None:
            listing = io.list_images(cfg.input, cfg.storage_options)
        if "row_group" in listing.columns:
            ranges = plan_packed_partitions(listing, cfg.partition_size)
        else:
            ranges = plan_partitions(len(listing), cfg.partition_size, cores)
        return _Source("fsspec", len(listing), listing=listing, ranges=ranges)
    if _is_local(cfg.input):
        # Also the reference the scan is checked against (see _unscanned): 0.1 s
        # for 20,000 local files.
        if listing is None:
            listing = io.list_images(cfg.input, cfg.storage_options)
        uri = "file://" + _check_local_input(cfg)
    else:
        uri = cfg.input
    root_uri = _qualified(spark, uri)
    reader_df = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", _glob(io.IMAGE_EXTENSIONS))
    )
    # Spark lists a tree of more than 32 folders with a distributed job; for a
    # local folder listing on the driver is 2-3x faster (0.8 s vs 2-7 s for
    # 20,000 images in 262 folders). On a cluster (EMRFS) the default stays.
    conf = {}
    if tuned and _is_local(cfg.input):
        conf["spark.sql.sources.parallelPartitionDiscovery.threshold"] = str(2**31 - 1)
    with _session_conf(spark, conf):
        files = reader_df.load(uri)
    # The count without shipping every path through Py4J (DataFrame.inputFiles()
    # fetches them one call each: 2-4 s for 20,000 files).
    n = int(len(files._jdf.inputFiles()))
    if n == 0:
        raise io.StorageError(
            f"{cfg.input}: no image files found (looked for {', '.join(io.IMAGE_EXTENSIONS)})"
        )
    return _Source("binaryfile", n, files=files, root_uri=root_uri, listing=listing)


def _packing_conf(files, n: int, partition_size: int, cores: int) -> dict[str, str]:
    """File packing for partitions of ~the Dask plan's size, in whole waves.

    Spark packs files, largest first, until ``sum(length + openCostInBytes)``
    would pass ``maxPartitionBytes``; the default (4 MB open cost, 128 MB) makes
    partitions of ~32 small images: 600+ tasks for 20,000 images.
    """
    ranges = plan_partitions(n, partition_size, cores)
    per_part = max(1, max(b - a for a, b in ranges))
    try:
        total = int(files._jdf.queryExecution().optimizedPlan().stats().sizeInBytes())
    except Exception:  # noqa: BLE001 - without the size, assume small images
        total = 0
    weight = total / max(n, 1) + OPEN_COST
    return {
        "spark.sql.files.openCostInBytes": str(OPEN_COST),
        "spark.sql.files.maxPartitionBytes": str(int(per_part * weight - weight / 2)),
    }


@contextlib.contextmanager
def _session_conf(spark, conf: dict[str, str]) -> Iterator[None]:
    """Set SQL settings for one stage and put the previous values back after it."""
    old = {k: spark.conf.get(k, None) for k in conf}
    for k, v in conf.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def _check_output(cfg: RunConfig) -> set[str]:
    """What the output holds; refused unless empty or overwriting (Dask's rules)."""
    so = cfg.out_storage_options
    io.check_writable(cfg.output, so)
    entries = set(io.ls(cfg.output, so))
    if entries and not cfg.overwrite:
        raise OutputExistsError(
            f"{cfg.output}: output already exists (use --overwrite to replace it)"
        )
    return entries


def preflight(
    cfg: RunConfig, native_s3: bool = False, reader: str | None = None
) -> pd.DataFrame | None:
    """Check the input and the output before Spark starts (a typo costs no JVM start-up).

    Returns
    -------
    The driver's listing (``fruitdask.io.list_images``; pass it to :func:`run`),
    or None with ``native_s3``, where only Spark lists the input.

    Raises
    ------
    fruitdask.io.StorageError, OutputExistsError, ValueError
    """
    _choose_reader(cfg, native_s3, reader)
    listing = None if native_s3 else io.list_images(cfg.input, cfg.storage_options)
    _check_output(cfg)
    return listing


def _prepare_output(cfg: RunConfig) -> str:
    """Refuse an existing output unless overwriting; a new run id. Same rules as Dask's."""
    so = cfg.out_storage_options
    entries = _check_output(cfg)
    if "_SUCCESS" in entries:
        # First thing an overwrite does: the old result stops being "complete".
        io.remove([io.join(cfg.output, "_SUCCESS")], so)
    if STATE_DIR in entries:
        io.remove_tree(io.join(cfg.output, STATE_DIR), so)
    return uuid.uuid4().hex[:8]


def _read_summaries(
    cfg: RunConfig, n_parts: int, run_id: str
) -> tuple[dict[str, Any], Moments, list[tuple[int, int]]]:
    """Counts, combined moments and (images, descriptors) per partition, from the
    partitions' summaries (see _write_extracted)."""
    so = cfg.out_storage_options

    def read(i: int) -> dict[str, Any]:
        text = io.read_text(_summary_url(cfg, i, run_id), so)
        if text is None:
            raise SparkJobError(f"partition {i} finished without writing its summary")
        return json.loads(text)

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(read, range(n_parts)))
    counts: dict[str, Any] = {
        k: sum(int(p[k]) for p in parts)
        for k in ("images", "ok", "no_keypoints", "error", "descriptors")
    }
    counts["labels"] = set().union(*(p["labels"] for p in parts))
    total = Moments(0, np.zeros(features.DESCRIPTOR_BYTES), np.zeros((32, 32)))
    for p in parts:
        m = p["moments"]
        total = combine_moments(
            total, Moments(int(m["n"]), np.asarray(m["mean"]), np.asarray(m["scatter"]))
        )
    return counts, total, [(int(p["images"]), int(p["descriptors"])) for p in parts]


def _signs(components: np.ndarray) -> np.ndarray:
    # fruitdask.pca's convention: the largest-magnitude loading of each axis is
    # positive, so Spark's and Dask's models compare component by component.
    idx = np.argmax(np.abs(components), axis=1)
    s = np.sign(components[np.arange(len(components)), idx])
    s[s == 0] = 1
    return s


def _model(spark_model, mean: np.ndarray, var: np.ndarray, n: int) -> tuple[PcaModel, np.ndarray]:
    """A fruitdask PcaModel from a fitted ``pyspark.ml.feature.PCAModel``.

    Spark reports ``explainedVariance`` as ratios of the total variance; the
    variances are the ratios times the trace of the covariance (the sum of the
    per-column sample variances).
    """
    comps = np.asarray(spark_model.pc.toArray(), dtype=np.float64).T  # (k, n_features)
    signs = _signs(comps)
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


def _require_descriptors(cfg: RunConfig, counts: dict[str, int]) -> None:
    if counts["descriptors"] < max(2, cfg.n_components):
        raise io.StorageError(
            f"{cfg.input}: only {counts['descriptors']} ORB descriptors in "
            f"{counts['images']} images; PCA with {cfg.n_components} components needs more"
        )


def _run_tuned(spark, cfg, source, run_id, cores, timings, progress) -> dict[str, Any]:
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    sc = spark.sparkContext
    # 1. extraction: one mapInArrow task per partition writes its images/ and
    # descriptors/ files and hands Spark's cache its descriptors (see _cache_batches).
    t = time.perf_counter()
    bc = None
    if source.reader == "binaryfile":
        conf = _packing_conf(source.files, source.n_images, cfg.partition_size, cores)
        conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(_IMAGE_BATCH)
        body = _tuned_extract_binary(cfg, run_id, source.root_uri, source.n_images)
        with _session_conf(spark, conf):
            src = source.files.select("path", "length", "content")
            cached = src.mapInArrow(body, CACHE_SCHEMA).cache()
            with _Watch(spark, "extract", progress):
                cached.count()
    else:
        n_parts = len(source.ranges)
        bc = sc.broadcast(source.listing)
        body = _tuned_extract_listed(cfg, run_id, bc, source.ranges)
        cached = spark.range(0, n_parts, 1, n_parts).mapInArrow(body, CACHE_SCHEMA).cache()
        with _Watch(spark, "extract", progress):
            cached.count()
    n_parts = cached.rdd.getNumPartitions()
    counts, total, per_part = _read_summaries(cfg, n_parts, run_id)
    timings["extract"] = time.perf_counter() - t
    if progress:
        progress("extract", n_parts, n_parts, counts["images"])
    _require_descriptors(cfg, counts)

    # 2. PCA fit: Spark ML on a uniform sample of about pca_sample descriptors
    # (all of them with 0), as the Dask job does: each partition cached a random
    # subset in random order, and takes its share of the sample from its head,
    # in proportion to its descriptor count. The mean, which Spark's PCAModel
    # neither keeps nor subtracts, is the exact one from the partitions' moments.
    t = time.perf_counter()
    n_desc = counts["descriptors"]
    want = min(cfg.pca_sample, n_desc) if cfg.pca_sample > 0 else n_desc
    quotas = [
        min(n, _sample_cap(images, source.n_images, cfg), round(want * n / n_desc))
        for images, n in per_part
    ]
    rank_ok = (F.col("rank") >= 0) & (
        F.col("rank") < F.element_at(F.array(*[F.lit(q) for q in quotas]), F.col("part") + 1)
    )
    vec = cached.filter(rank_ok).select(array_to_vector(F.col("x")).alias("v")).coalesce(cores)
    with _Watch(spark, "pca_fit", None):
        spark_model = PCA(k=cfg.n_components, inputCol="v").fit(vec)
    n_fit = sum(quotas)
    sampled = n_fit < n_desc
    cov_diag = np.diag(total.scatter) / max(total.n - 1, 1)
    model, _ = _model(spark_model, total.mean, cov_diag, n_fit)
    timings["pca_fit"] = time.perf_counter() - t
    exact = exact_pca(total, cfg.n_components)
    angles = principal_angles(model.components, exact.components)
    pca_report = {
        "method": model.method,
        "n_components": model.n_components,
        "fitted_on_rows": int(n_fit),
        "sampled": bool(sampled),
        # both evaluated on every descriptor of the run (from the exact moments)
        "explained_variance_ratio": variance_captured(model, total),
        "exact_explained_variance_ratio": float(exact.explained_variance_ratio.sum()),
        "max_principal_angle_to_exact_deg": float(angles.max()),
        "principal_angles_to_exact_deg": [round(float(a), 4) for a in angles],
    }

    # 3. transform + write: centre and project in the same pass that writes.
    t = time.perf_counter()
    body = _tuned_features(cfg, run_id, model.mean, model.components)
    with _Watch(spark, "features", progress):
        written = cached.filter(F.col("rank") < 0).mapInArrow(body, _WRITTEN_SCHEMA).collect()
    timings["transform_write"] = time.perf_counter() - t
    if sorted(r["part"] for r in written) != list(range(n_parts)):
        raise SparkJobError("the features of some partitions were not written")
    if progress:
        progress("features", n_parts, n_parts, sum(r["rows"] for r in written))
    cached.unpersist()
    if bc is not None:
        bc.destroy()
    return {"parts": n_parts, "counts": counts, "model": model, "pca": pca_report}


def _run_seed(spark, cfg, source, run_id, timings, progress) -> dict[str, Any]:
    from pyspark.ml.feature import PCA, StandardScaler
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.functions import udf

    # 1. extraction: row-at-a-time Python UDFs, default partitioning.
    t = time.perf_counter()
    if source.reader == "binaryfile":
        root = source.root_uri
        keys = udf(lambda p: _seed_keys(p, root), "struct<path:string,label:string,split:string>")
        bytes_df = source.files.select(
            keys("path").alias("k"),
            F.col("length").alias("size"),
            "content",
            F.lit(None).cast("string").alias("read_error"),
        ).select("k.*", "size", "content", "read_error")
    else:
        if "shard" in source.listing.columns:
            raise ValueError("--profile seed reads loose image files; use --profile tuned")
        listing = source.listing
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
        fetch = udf(lambda p: _seed_fetch(p, url, so), "struct<content:binary,read_error:string>")
        bytes_df = df.withColumn("r", fetch("path")).select(
            "path", "label", "split", "size", "r.content", "r.read_error"
        )
    params = cfg.orb
    orb = udf(lambda c, e: _seed_orb(c, e, params), _ORB_STRUCT)
    imgs = (
        bytes_df.select("path", "label", "split", "size", orb("content", "read_error").alias("f"))
        .select("path", "label", "split", "size", "f.*")
        .cache()
    )
    with _Watch(spark, "extract", progress):
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
        n_parts = imgs.rdd.getNumPartitions()
        imgs.select(
            "path",
            "label",
            "split",
            "size",
            "width",
            "height",
            F.size("descriptors").alias("n_keypoints"),
            "status",
            "error",
        ).mapInArrow(_seed_writer("images", cfg, run_id), _WRITTEN_SCHEMA).collect()
        descs = imgs.select(
            "path", "label", "split", F.posexplode("descriptors").alias("keypoint", "d")
        )
        if cfg.write_descriptors:
            descs.mapInArrow(_seed_writer("descriptors", cfg, run_id), _WRITTEN_SCHEMA).collect()
    timings["extract"] = time.perf_counter() - t
    if progress:
        progress("extract", n_parts, n_parts, counts["images"])
    _require_descriptors(cfg, counts)

    # 2. PCA fit on VectorUDT rows: centre (Spark's PCAModel does not), then fit.
    # The vectors are cached, as Spark ML asks of inputs it passes over several
    # times (the scaler's pass, the PCA's two, the transform).
    t = time.perf_counter()
    to_vec = udf(lambda d: Vectors.dense(d), VectorUDT())
    vec = descs.select("path", "label", "split", "keypoint", to_vec("d").alias("v")).cache()
    with _Watch(spark, "pca_fit", None):
        scaler = StandardScaler(withMean=True, withStd=False, inputCol="v", outputCol="c").fit(vec)
        imgs.unpersist()
        centred = scaler.transform(vec)
        spark_model = PCA(k=cfg.n_components, inputCol="c", outputCol="p").fit(centred)
    var = scaler.std.toArray() ** 2
    model, signs = _model(spark_model, scaler.mean.toArray(), var, counts["descriptors"])
    timings["pca_fit"] = time.perf_counter() - t

    # 3. transform + write.
    t = time.perf_counter()
    feats = spark_model.transform(centred).select(
        "path", "label", "split", "keypoint", vector_to_array(F.col("p"), "float32").alias("p")
    )
    with _Watch(spark, "features", progress):
        written = feats.mapInArrow(
            _seed_writer("features", cfg, run_id, signs), _WRITTEN_SCHEMA
        ).collect()
    timings["transform_write"] = time.perf_counter() - t
    if progress:
        progress("features", n_parts, n_parts, sum(r["rows"] for r in written))
    vec.unpersist()
    ratio = float(model.explained_variance_ratio.sum())
    # Spark's fit is an exact eigendecomposition of the covariance of every
    # descriptor here: it *is* the exact PCA.
    pca_report = {
        "method": model.method,
        "n_components": model.n_components,
        "fitted_on_rows": int(model.n_samples),
        "sampled": False,
        "explained_variance_ratio": ratio,
        "exact_explained_variance_ratio": ratio,
        "max_principal_angle_to_exact_deg": 0.0,
        "principal_angles_to_exact_deg": [0.0] * model.n_components,
    }
    return {"parts": n_parts, "counts": counts, "model": model, "pca": pca_report}


def _unscanned(cfg: RunConfig, source: _Source, run_id: str, n_parts: int) -> pd.DataFrame:
    """Listed images that Spark's file scan left out, as listing rows.

    Hadoop file sources skip empty files (``PartitioningAwareFileIndex.listFiles``
    keeps ``getLen > 0``) and never list names starting with ``_`` or ``.``;
    ``fruitdask.io.list_images`` keeps both, and the Dask job gives every listed
    file an ``images/`` row (an empty file is an error row). Only called when the
    counts differ, so the usual cost is nothing.
    """
    so = cfg.out_storage_options
    done: set[str] = set()
    for i in range(n_parts):
        t = io.read_table(io.join(cfg.output, "images", _part_name(i, run_id)), so, ["path"])
        done.update(t.column("path").to_pylist())
    if source.listing is not None:
        rows = source.listing[~source.listing["path"].isin(done)]
        return rows.reset_index(drop=True)
    from urllib.parse import unquote

    root = str(source.root_uri)
    rels = [_relative(unquote(u), root) for u in source.files._jdf.inputFiles()]
    rels = sorted(set(rels) - done)
    ls = [_label_split(r) for r in rels]
    return pd.DataFrame(
        {
            "path": pd.array(rels, dtype="string"),
            "label": pd.array([x[0] for x in ls], dtype="string"),
            "split": pd.array([x[1] for x in ls], dtype="string"),
            "size": pd.array([0] * len(rels), dtype="int64"),  # the scan skips only empty files
        }
    )


def _extract_on_driver(
    cfg: RunConfig, run_id: str, index: int, rows: pd.DataFrame, model: PcaModel
) -> dict[str, Any]:
    """One more partition, done here: the files Spark's scan left out (see _unscanned)."""
    data = io.iter_images(cfg.input, rows, cfg.storage_options)
    images, desc, counts = extract_partition(rows, data, cfg.orb)
    rows, counts, desc = _write_extracted(index, [(rows, images, desc, counts)], cfg, run_id)
    proj = model.transform(desc) if len(desc) else np.zeros((0, model.n_components), np.float32)
    table = pa.table({**_keys(rows, counts), "pca": _list_column(proj)}).cast(FEATURES_SCHEMA)
    name = _part_name(index, run_id)
    io.write_table(table, io.join(cfg.output, "features", name), cfg.out_storage_options)
    status = images.column("status").to_pylist()
    return {
        "images": images.num_rows,
        "ok": status.count("ok"),
        "no_keypoints": status.count("no_keypoints"),
        "error": status.count("error"),
        "descriptors": int(len(desc)),
        "labels": {str(x) for x in images.column("label").to_pylist()},
    }


def _versions(spark) -> dict[str, str]:
    import cv2
    import pyspark

    import fruitdask

    try:
        java = str(spark.sparkContext._jvm.System.getProperty("java.version"))
    except Exception:  # noqa: BLE001 - informational only
        java = "unknown"
    return {
        "fruitdask": fruitdask.__version__,
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "java": java,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "fsspec": fsspec.__version__,
        "opencv": cv2.__version__,
    }


def _cleanup(cfg: RunConfig, files: dict[str, list[str]]) -> None:
    """Delete files of earlier runs and any Dask run state, after ``_SUCCESS`` is written."""
    so = cfg.out_storage_options
    keep = {f for fs in files.values() for f in fs}
    stale = [
        io.join(cfg.output, folder, name)
        for folder in (*TABLES, "model")
        for name in io.ls(io.join(cfg.output, folder), so)
        if f"{folder}/{name}" not in keep
    ]
    io.remove(stale, so)
    io.remove_tree(io.join(cfg.output, STATE_DIR), so)


def run(
    cfg: RunConfig,
    spark,
    profile: str = "tuned",
    native_s3: bool = False,
    reader: str | None = None,
    progress: Callable[[str, int, int, int], None] | None = None,
    startup_seconds: float = 0.0,
    listing: pd.DataFrame | None = None,
    listing_seconds: float = 0.0,
) -> RunSummary:
    """Run the whole job on a SparkSession; the output is ``fruitdask run``'s.

    Parameters
    ----------
    cfg : RunConfig
        The Dask job's settings. Used here: input, output, storage options, ORB,
        ``partition_size`` (tuned profile), ``n_components``, ``pca_sample``
        (0 = fit on every descriptor; Spark's fit is exact either way),
        ``write_descriptors``, ``overwrite``.
    spark : pyspark.sql.SparkSession
    profile : {"tuned", "seed"}
    native_s3 : bool
        Read ``s3://`` input with Spark's binaryFile source (EMRFS on EMR)
        instead of listing on the driver and fetching through fsspec.
    reader : {"binaryfile", "fsspec"}, optional
        How to read the input (see :data:`READERS`); by default binaryfile for
        a local folder of images, fsspec for anything else.
    progress : callable, optional
        ``progress(stage, done_tasks, total_tasks, items)``, called from a
        polling thread during a stage and once at its end.
    startup_seconds : float
        Recorded as the ``startup`` timing (the session start).
    listing, listing_seconds : DataFrame and float, optional
        The result of :func:`preflight` and the time it took, so the driver's
        listing is not done twice.

    Returns
    -------
    fruitdask.pipeline.RunSummary

    Raises
    ------
    fruitdask.io.StorageError
        Input missing, empty, unreachable or denied; a write failed.
    OutputExistsError
        The output exists and ``cfg.overwrite`` is not set.
    SparkJobError
        A Spark job failed for another reason.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if cfg.resume:
        raise ValueError("the Spark job cannot resume a run; use --overwrite")
    sc = spark.sparkContext
    cores = int(sc.defaultParallelism)
    timings: dict[str, float] = {"startup": round(startup_seconds, 3)}
    reader = _choose_reader(cfg, native_s3, reader)
    t = time.perf_counter()
    try:
        source = _open_source(spark, cfg, reader, cores, listing, profile == "tuned")
    except (io.StorageError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - Py4J errors become one line
        raise _translate(exc, cfg) from None
    timings["listing"] = time.perf_counter() - t + listing_seconds
    run_id = _prepare_output(cfg)
    try:
        with quiet_pandas_warning():
            if profile == "tuned":
                res = _run_tuned(spark, cfg, source, run_id, cores, timings, progress)
            else:
                res = _run_seed(spark, cfg, source, run_id, timings, progress)
    except (io.StorageError, ValueError, SparkJobError):
        raise
    except Exception as exc:  # noqa: BLE001 - a failed Spark job becomes one line
        raise _translate(exc, cfg) from None
    finally:
        sc.setJobGroup("fruitdask-idle", "")

    counts, model, n_parts = res["counts"], res["model"], res["parts"]
    expected = len(source.listing) if source.listing is not None else source.n_images
    if source.reader == "binaryfile" and counts["images"] < expected:
        t = time.perf_counter()
        rows = _unscanned(cfg, source, run_id, n_parts)
        if len(rows):
            extra = _extract_on_driver(cfg, run_id, n_parts, rows, model)
            for k in ("images", "ok", "no_keypoints", "error", "descriptors"):
                counts[k] += extra[k]
            counts["labels"] |= extra["labels"]
            n_parts += 1
        timings["extract"] += time.perf_counter() - t

    # 4. publish: model, manifest, _SUCCESS last; then drop what an old run left.
    t = time.perf_counter()
    so = cfg.out_storage_options
    names = [_part_name(i, run_id) for i in range(n_parts)]
    files = {tbl: [f"{tbl}/{n}" for n in names] for tbl in TABLES}
    if not cfg.write_descriptors:
        files.pop("descriptors")
    files["model"] = [f"model/pca-{run_id}.json"]
    io.write_bytes(io.join(cfg.output, files["model"][0]), model.to_json().encode(), so)
    timings["publish"] = time.perf_counter() - t

    summary = RunSummary(
        output=cfg.output,
        run_id=run_id,
        images=counts["images"],
        images_ok=counts["ok"],
        images_no_keypoints=counts["no_keypoints"],
        images_error=counts["error"],
        descriptors=counts["descriptors"],
        partitions=n_parts,
        timings={k: round(v, 3) for k, v in timings.items()},
        files=files,
    )
    summary.pca = res["pca"]
    manifest = _manifest(cfg, summary, counts, spark, profile, reader, cores)
    io.write_bytes(
        io.join(cfg.output, "manifest.json"), json.dumps(manifest, indent=1).encode(), so
    )
    io.write_bytes(io.join(cfg.output, "_SUCCESS"), f"{run_id}\n".encode(), so)
    _cleanup(cfg, files)
    return summary


def _manifest(cfg, s: RunSummary, counts, spark, profile, reader, cores) -> dict[str, Any]:
    from spark_parity.session import ui_url

    work = sum(v for k, v in s.timings.items() if k != "startup")
    sc = spark.sparkContext
    try:
        executors = int(sc._jsc.sc().getExecutorMemoryStatus().size())
    except Exception:  # noqa: BLE001 - informational only
        executors = None
    return {
        "format": "fruitdask-output/1",
        "engine": "spark",
        "run_id": s.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": cfg.input,
        "config": cfg.public_dict(),
        "cluster": {
            "workers": executors,
            "threads": cores,
            "master": sc.master,
            "profile": profile,
            "reader": reader,
            "ui": ui_url(spark),
        },
        "counts": {
            "images": s.images,
            "ok": s.images_ok,
            "no_keypoints": s.images_no_keypoints,
            "error": s.images_error,
            "descriptors": s.descriptors,
            "partitions": s.partitions,
            "partitions_resumed": 0,
            "labels": len(counts["labels"]),
        },
        "timings": s.timings,
        "throughput": {
            "images_per_s": round(s.images / work, 1) if work else None,
            "images_per_s_per_core": round(s.images / work / cores, 1) if work else None,
        },
        "pca": s.pca,
        "files": s.files,
        "versions": _versions(spark),
    }
