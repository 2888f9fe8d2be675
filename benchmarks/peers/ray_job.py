"""The fruitdask job on Ray Data, written the way Ray's docs recommend.

    python -m benchmarks.peers.ray_job --input URL --output DIR [--cores N] [--json]
        [--storage-option KEY=VALUE ...] [--endpoint-url URL] [--overwrite]
        [--blocks N] [--batch-size N] [--actors] [--pca {aggregate,map}]
        [--shuffle {sort,hash,ray}] [--object-store-mb N]

Pipeline (Ray Data's own building blocks throughout):

* listing: ``ray.data.read_binary_files(root, include_paths=True,
  file_extensions=...)``. Ray lists the files in the driver when the dataset is
  created (timed as ``listing``); the bytes are read inside the map tasks.
* extract: ``map_batches`` with ``batch_format="pyarrow"`` (zero-copy batches)
  over the bytes, calling :func:`fruitdask.tables.extract_partition` (exactly
  the project's decode + ORB kernel). Ray fuses the read and the map into one
  task per block. Each output row is one image: the images table's columns
  and its descriptors as one binary value (``32 * n_keypoints`` bytes), so the
  map's output is a fraction of its input. ``.materialize()`` keeps the result
  in Ray's object store for the passes below.
* pca_fit: one ``Dataset.aggregate`` pass with an ``AggregateFnV2`` that
  computes per-block moments (count, mean, scatter) and merges them exactly
  (Chan et al.), plus the status counts; then :func:`fruitdask.pca.exact_pca`
  on the driver. Ray has no PCA of its own (Ray Data's preprocessors stop at
  scalers and encoders), so this is the exact PCA from moments, the same fit
  as ``fruitdask run --pca-method exact``.
* transform_write: three writes from the materialized dataset with
  ``Dataset.write_parquet``: images (select_columns), descriptors (a
  ``map_batches`` that flattens each image's blob into one row per
  descriptor, i.e. the explode) and features (a ``map_batches`` that projects).
  Ray's writer keeps the Arrow schema of the blocks (``string``, ``int32``,
  ``binary``, ``list<float>``), which are built with :mod:`fruitdask.tables`,
  so the files have exactly fruitdask's schemas. File names are Ray's own.

Ray is started in-process, limited to ``--cores`` CPUs, without the dashboard,
usage statistics off (``RAY_USAGE_STATS_ENABLED=0``: no dial-out), its session
files in a private temporary folder removed at exit. It listens on loopback
only through Ray's own single-machine switch, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
(the mode Ray uses on macOS and Windows): the node's address is then 127.0.0.1
and every Ray server (GCS, raylet, workers, agents) binds it. Without it Ray
2.60 binds every interface, and ``ray.init(_node_ip_address="127.0.0.1")`` does
not help (``resolve_ip_for_localhost`` rewrites it to the routable address).
Checked by listing the sockets of the process tree during a run: all LISTEN
and ESTABLISHED sockets on 127.0.0.1.

WHAT WAS TRIED. Measured with benchmarks' TreeMonitor (wall, CPU and RSS of the
whole process tree) on 2,000 and 20,000 generated images, 2 cores. The machine
was shared and its load average went from 2 to 20 during these runs, so wall
times moved by 2-3x between identical runs; CPU seconds of the process tree
(which contention inflates much less) decided, over 3 alternating rounds ::

    setting                                    effect (20k images unless said)
    -----------------------------------------  ---------------------------------------
    Dataset.aggregate, Ray's default shuffle   PCA fit 2.1-3.2 s (2k: 2.1-2.6 s) and
      (hash shuffle: starts aggregator actors)   +5-8 CPU-s per run (23.5-28.3 CPU-s)
    same, DataContext.shuffle_strategy =       PCA fit 0.2-0.8 s, 16.4-20.7 CPU-s:
      SORT_SHUFFLE_PULL_BASED (tasks only)       DEFAULT (--shuffle sort)
    moments by map_batches + take_all          = the sort-based aggregate (2k: 0.16 s
      (--pca map)                                against 0.19 s); kept as an option
    read tasks (override_num_blocks) 4, 8      no difference beyond the noise (CPU
      (DEFAULT: 4 per core), 16                  16.4-20.7 s for all three); 32 on
                                                 2k images: +1-2 CPU-s (more tasks)
    batch_size None (whole block, DEFAULT)     250 rows: +1.5-6 CPU-s, no faster
      against 250
    tasks (DEFAULT) against ActorPoolStrategy  actors: +2-8 CPU-s, slower start (the
      of --cores actors (--actors)              actors start after the pool is up);
                                                 the kernel has no state worth keeping
    batch_format pyarrow + zero_copy_batch     (chosen from the docs: the kernel takes
                                                 bytes; numpy/pandas batches would copy)
    object_store_memory 256 MB against Ray's   no change in RSS (1.97 GiB): only pages
      default (30% of memory)                    written count, and little is stored
    read_images instead of read_binary_files   not used: it decodes with PIL to RGB,
                                                 not the project's kernel (OpenCV,
                                                 straight to grayscale)

Where Ray's time and memory go (2k images, load 1-3.5: 9.6-11 s end to end
against 2.9-3.6 s for Dask): ray.init 2.2-4 s, importing Ray ~1 s and shutting
down ~1 s; the first map tasks wait for workers that import pandas, pyarrow
and OpenCV. Peak RSS 1.7-2.0 GiB at any size (PSS ~1.1-1.4 GiB): besides the
driver and one worker per core, Ray runs gcs_server, raylet, a dashboard agent
and a runtime-env agent even without the dashboard, and Ray Data starts two
actors of its own (_StatsActor, _AutoscalingCoordinator), ~100-200 MB each;
the object store's shared pages count in every process that maps them.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Before Ray is imported: no usage statistics (Ray would otherwise post them), and
# Ray's single-machine mode, whose node address is loopback (see the docstring).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import pandas as pd
import pyarrow as pa

from benchmarks.peers import common
from fruitdask import io, tables
from fruitdask.features import OrbParams
from fruitdask.pca import PcaModel, combine_moments

PROG = "python -m benchmarks.peers.ray_job"
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- per batch (in Ray workers)
def extract_batch(batch: pa.Table, prefix: str, params: OrbParams) -> pa.Table:
    """Decode + ORB over one batch of ``read_binary_files`` rows (``bytes``, ``path``).

    Returns one row per image: the images table's columns (IMAGES_SCHEMA) and
    ``desc``, the image's descriptors as one binary value.
    """
    rel = [p[len(prefix) :] for p in batch.column("path").to_pylist()]
    ls = [io.label_split(r) for r in rel]
    blobs = batch.column("bytes").to_pylist()
    rows = pd.DataFrame(
        {
            "path": rel,
            "label": [x[0] for x in ls],
            "split": [x[1] for x in ls],
            # read_binary_files reads whole files: the length is the file's size
            "size": np.array([len(b) for b in blobs], dtype=np.int64),
        }
    )
    images, desc, counts = tables.extract_partition(rows, blobs, params)
    return images.append_column(common.DESC, common.desc_blobs(desc, counts))


def extract_packed_batch(batch: pa.Table, params: OrbParams) -> pa.Table:
    """The same over one batch of a pack's shards (``read_parquet`` rows: the
    listing's columns and the image ``bytes``)."""
    rows = pd.DataFrame(
        {c: batch.column(c).to_pandas() for c in ("path", "label", "split", "size")}
    )
    blobs = common.packed_blobs(
        batch.column("bytes").to_pylist(), batch.column("error").to_pylist()
    )
    images, desc, counts = tables.extract_partition(rows, blobs, params)
    return images.append_column(common.DESC, common.desc_blobs(desc, counts))


class ExtractActor:
    """The same, as a callable class for ``ActorPoolStrategy`` (tried; see above)."""

    def __init__(self, prefix: str, params: OrbParams) -> None:
        self.prefix = prefix
        self.params = params

    def __call__(self, batch: pa.Table) -> pa.Table:
        return extract_batch(batch, self.prefix, self.params)


def _rows(batch: pa.Table) -> pd.DataFrame:
    return pd.DataFrame({c: batch.column(c).to_pandas() for c in tables.KEY_COLUMNS})


def descriptor_rows(batch: pa.Table) -> pa.Table:
    """Per-image rows -> one row per descriptor (DESCRIPTORS_SCHEMA): the explode."""
    counts = batch.column("n_keypoints").to_numpy(zero_copy_only=False)
    desc = common.desc_array(batch.column(common.DESC))
    return tables.descriptors_table(_rows(batch), counts, desc)


def feature_rows(batch: pa.Table, model: PcaModel) -> pa.Table:
    """Per-image rows -> one row per descriptor, projected (FEATURES_SCHEMA)."""
    counts = batch.column("n_keypoints").to_numpy(zero_copy_only=False)
    proj = common.project(batch.column(common.DESC), model)
    return tables.features_table(_rows(batch), counts, proj)


def block_summary(batch: pa.Table) -> pa.Table:
    """One row per batch: its descriptors' moments and status counts (``--pca map``)."""
    s = batch.column("status").to_pylist()
    m = common.moments_to_list(common.blob_moments(batch.column(common.DESC)))
    return pa.table(
        {
            "moments": pa.array([m], pa.list_(pa.float64())),
            "images": [len(s)],
            "ok": [s.count("ok")],
            "no_keypoints": [s.count("no_keypoints")],
            "error": [s.count("error")],
        }
    )


def _aggregates(desc_col: str):
    """Moments of every descriptor and the status counts, as Ray aggregations."""
    from ray.data.aggregate import AggregateFnV2
    from ray.data.block import BlockAccessor

    class DescriptorMoments(AggregateFnV2):
        """Count, mean and centred scatter of the descriptors, merged exactly."""

        def __init__(self) -> None:
            super().__init__("moments", zero_factory=list, on=desc_col, ignore_nulls=True)

        def aggregate_block(self, block) -> list[float]:
            t = BlockAccessor.for_block(block).to_arrow()
            return common.moments_to_list(common.blob_moments(t.column(desc_col)))

        def combine(self, current: list[float], new: list[float]) -> list[float]:
            return common.merge_lists(current, new)

    class StatusCounts(AggregateFnV2):
        """[images, ok, no_keypoints, error] (Ray passes an aggregation only its column)."""

        def __init__(self) -> None:
            super().__init__("status", zero_factory=lambda: [0, 0, 0, 0], on="status",
                             ignore_nulls=True)  # fmt: skip

        def aggregate_block(self, block) -> list[int]:
            s = BlockAccessor.for_block(block).to_arrow().column("status").to_pylist()
            return [len(s), s.count("ok"), s.count("no_keypoints"), s.count("error")]

        def combine(self, current: list[int], new: list[int]) -> list[int]:
            return [a + b for a, b in zip(current, new, strict=True)]

    return DescriptorMoments(), StatusCounts()


# ---------------------------------------------------------------- driver
def build_parser():
    ap = common.parser(PROG, "The fruitdask job on Ray Data.")
    ap.add_argument("--blocks", type=int, default=None,
                    help="read tasks (override_num_blocks); default: 4 per core")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per map_batches call (default: whole blocks)")  # fmt: skip
    ap.add_argument("--actors", action="store_true",
                    help="extract in an ActorPoolStrategy of --cores actors instead of tasks")  # fmt: skip
    ap.add_argument("--pca", choices=("aggregate", "map"), default="aggregate",
                    help="moments by Dataset.aggregate, or by map_batches + take_all")  # fmt: skip
    ap.add_argument("--shuffle", choices=("hash", "sort", "ray"), default="sort",
                    help="DataContext.shuffle_strategy for the aggregate: sort-based "
                         "(default), hash (Ray's default), or leave Ray's")  # fmt: skip
    ap.add_argument("--object-store-mb", type=int, default=None,
                    help="Ray object store size (default: Ray's, 30%% of memory)")  # fmt: skip
    return ap


def start_ray(cores: int, quiet: bool = True, object_store_mb: int | None = None) -> str:
    """Start a private, local Ray instance on ``cores`` CPUs; its session folder."""
    import ray

    # Ray's workers are started by its raylet with the driver's environment:
    # make this checkout importable there (functions are pickled by reference).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    # Short, private session folder (Unix socket paths are limited to 107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    init: dict[str, Any] = {
        "address": "local",  # always a new, private instance; never join another
        "num_cpus": cores,
        "num_gpus": 0,
        "include_dashboard": False,
        "dashboard_host": "127.0.0.1",
        "logging_level": logging.WARNING,
        "log_to_driver": not quiet,
        "_temp_dir": ray_tmp,
    }
    if object_store_mb:
        init["object_store_memory"] = object_store_mb * 2**20
    try:
        ray.init(**init)
    except BaseException:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        raise
    return ray_tmp


def stop_ray(ray_tmp: str) -> None:
    import ray

    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def run(args) -> dict[str, Any]:
    so = io.parse_storage_options(args.storage_option, args.endpoint_url)
    timings: dict[str, float] = {}
    out = common.Output(args.output, so, args.overwrite)
    params = OrbParams()
    s3_in, s3_out = common.is_s3(args.input), common.is_s3(args.output)
    in_fs = common.arrow_s3(so) if s3_in else None
    out_fs = common.arrow_s3(so) if s3_out else None
    root = common.strip_scheme(args.input)
    prefix = root.rstrip("/") + "/"
    out_root = common.strip_scheme(args.output)

    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    if args.quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    t = time.perf_counter()
    ray_tmp = start_ray(args.cores, args.quiet, args.object_store_mb)
    timings["startup"] = time.perf_counter() - t
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = not args.quiet
        ctx.print_on_execution_start = not args.quiet
        if args.shuffle != "ray":
            from ray.data.context import ShuffleStrategy

            ctx.shuffle_strategy = {
                "hash": ShuffleStrategy.HASH_SHUFFLE,
                "sort": ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
            }[args.shuffle]

        # 1. listing (Ray lists in the driver when the dataset is created); a
        #    pack is read as what it is, Parquet (read_parquet, one task per file)
        t = time.perf_counter()
        blocks = args.blocks or 4 * args.cores
        packed = common.packed_shards(args.input, so)
        if packed:
            ds = ray.data.read_parquet(
                packed[0], filesystem=in_fs, columns=common.PACK_COLUMNS,
                override_num_blocks=max(blocks, len(packed[0])),
            )  # fmt: skip
        else:
            ds = ray.data.read_binary_files(
                root,
                include_paths=True,
                file_extensions=common.EXTENSIONS,
                filesystem=in_fs,
                override_num_blocks=blocks,
            )
        timings["listing"] = time.perf_counter() - t

        # 2. extract: read + decode + ORB fused into one task per block
        t = time.perf_counter()
        if args.actors and packed:
            raise ValueError("--actors is for loose files (a pack is read by read_parquet tasks)")
        if args.actors:
            mapped = ds.map_batches(
                ExtractActor,
                fn_constructor_args=(prefix, params),
                batch_format="pyarrow",
                batch_size=args.batch_size,
                zero_copy_batch=True,
                compute=ActorPoolStrategy(size=args.cores),
                num_cpus=1,
            )
        else:
            mapped = ds.map_batches(
                extract_packed_batch if packed else extract_batch,
                fn_args=(params,) if packed else (prefix, params),
                batch_format="pyarrow",
                batch_size=args.batch_size,
                zero_copy_batch=True,
                num_cpus=1,
            )
        extracted = mapped.materialize()
        timings["extract"] = time.perf_counter() - t

        # 3. PCA fit: one aggregation pass (moments + counts), exact PCA on the driver
        t = time.perf_counter()
        if args.pca == "aggregate":
            agg_m, agg_s = _aggregates(common.DESC)
            res = extracted.aggregate(agg_m, agg_s)
            total = common.moments_from_list(res["moments"])
            n_images, ok, no_kp, err = (int(x) for x in res["status"])
        else:
            parts = extracted.map_batches(block_summary, batch_format="pyarrow").take_all()
            total = common.moments_from_list(None)
            n_images = ok = no_kp = err = 0
            for r in parts:
                total = combine_moments(total, common.moments_from_list(r["moments"]))
                n_images += r["images"]
                ok += r["ok"]
                no_kp += r["no_keypoints"]
                err += r["error"]
        n_desc = total.n
        model, pca_info = common.fit_pca(total, args.n_components)
        timings["pca_fit"] = time.perf_counter() - t

        # 4. write images, descriptors (exploded), features (projected)
        t = time.perf_counter()
        dest = {tbl: f"{out_root}/{tbl}" for tbl in tables.TABLES}
        extracted.select_columns(common.IMAGE_COLUMNS).write_parquet(
            dest["images"], filesystem=out_fs
        )
        extracted.map_batches(descriptor_rows, batch_format="pyarrow").write_parquet(
            dest["descriptors"], filesystem=out_fs
        )
        extracted.map_batches(feature_rows, fn_args=(model,), batch_format="pyarrow").write_parquet(
            dest["features"], filesystem=out_fs
        )
        timings["transform_write"] = time.perf_counter() - t
        partitions = extracted.num_blocks()
    finally:
        stop_ray(ray_tmp)

    # 5. publish: list the files, model, manifest, _SUCCESS
    t = time.perf_counter()
    files = {tbl: out.listed(tbl) for tbl in tables.TABLES}
    files["model"] = [out.write_model(model)]
    counts = {
        "images": n_images,
        "ok": ok,
        "no_keypoints": no_kp,
        "error": err,
        "descriptors": n_desc,
        "partitions": partitions,
    }
    timings["publish"] = time.perf_counter() - t
    settings = {
        "blocks": blocks,
        "batch_size": args.batch_size,
        "compute": "actors" if args.actors else "tasks",
        "object_store_mb": args.object_store_mb,
        "pca": args.pca,
        "shuffle": args.shuffle,
    }
    m = common.manifest("ray", out, args.input, counts, timings, pca_info, files, args.cores,
                        settings, {"ray": ray.__version__})  # fmt: skip
    out.commit(m)
    return m


def main(argv: list[str] | None = None) -> int:
    return common.main(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
