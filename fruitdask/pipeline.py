"""The Dask job: listing -> per-partition decode + ORB -> PCA fit -> transform -> Parquet.

Data flows one way. The client holds only the listing and small per-partition
summaries; image bytes and descriptors live in the workers, which read their own
inputs and write their own output files.

Output layout (every table plain Parquet, one file per partition)::

    OUT/images/part-00000-<run>.parquet       one row per listed file
    OUT/descriptors/part-00000-<run>.parquet  one row per keypoint, raw 32 bytes
    OUT/features/part-00000-<run>.parquet     one row per keypoint, PCA vector
    OUT/model/pca-<run>.json                  the fitted PCA
    OUT/manifest.json                         settings, counts, timings, file list
    OUT/_SUCCESS                              written last; holds the run id

Publishing is safe without renames (S3 has none): file names carry the run id,
an ``--overwrite`` first deletes ``_SUCCESS``, writes the new run beside the old
one, writes the manifest and ``_SUCCESS``, and only then deletes the old files. A
reader that honours ``_SUCCESS`` and the manifest never sees a mix of two runs.
While a run is in flight its state (partitioning, finished partitions) lives in
``OUT/_fruitdask/`` so ``--resume`` can skip finished partitions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

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

__all__ = [
    "DESCRIPTORS_SCHEMA",
    "FEATURES_SCHEMA",
    "IMAGES_SCHEMA",
    "OutputExistsError",
    "RunSummary",
    "run",
]

TABLES = ("images", "descriptors", "features")
STATE_DIR = "_fruitdask"

IMAGES_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("size", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_keypoints", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
DESCRIPTORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("keypoint", pa.int32()),
        ("descriptor", pa.binary()),
    ]
)
FEATURES_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("keypoint", pa.int32()),
        ("pca", pa.list_(pa.float32())),
    ]
)


class OutputExistsError(Exception):
    """The output location already holds something and neither overwrite nor resume was asked."""


@dataclass
class RunSummary:
    """What a run did; also the body of ``manifest.json``'s ``counts``/``timings``."""

    output: str
    run_id: str
    images: int = 0
    images_ok: int = 0
    images_no_keypoints: int = 0
    images_error: int = 0
    descriptors: int = 0
    partitions: int = 0
    partitions_resumed: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    pca: dict[str, Any] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    already_complete: bool = False

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))

    @property
    def images_per_s(self) -> float:
        work = sum(v for k, v in self.timings.items() if k != "startup")
        return self.images / work if work > 0 else 0.0


Progress = Callable[[str, int, int, int], None]


# ---------------------------------------------------------------- partition tasks
def _binary_column(desc: np.ndarray) -> pa.Array:
    n = len(desc)
    offsets = np.arange(0, (n + 1) * features.DESCRIPTOR_BYTES, features.DESCRIPTOR_BYTES)
    return pa.Array.from_buffers(
        pa.binary(),
        n,
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(desc))],
    )


def _list_column(values: np.ndarray) -> pa.Array:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


def _keys(rows: pd.DataFrame, counts: np.ndarray) -> dict[str, pa.Array]:
    """path/label/split repeated per keypoint, and the keypoint index within its image."""
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    keypoint = (np.arange(len(owner), dtype=np.int64) - starts).astype(np.int32)
    take = pa.array(owner)
    return {
        "path": pa.array(rows["path"], type=pa.string()).take(take),
        "label": pa.array(rows["label"], type=pa.string()).take(take),
        "split": pa.array(rows["split"], type=pa.string()).take(take),
        "keypoint": pa.array(keypoint, type=pa.int32()),
    }


def _part_name(index: int, run_id: str) -> str:
    return f"part-{index:05d}-{run_id}.parquet"


def extract_partition(
    rows: pd.DataFrame, data: Iterable[bytes | Exception], params: features.OrbParams
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Run the kernel over one partition's bytes.

    Returns
    -------
    images : pyarrow.Table with :data:`IMAGES_SCHEMA`
    descriptors : ndarray of shape (n_keypoints_total, 32), uint8
    counts : ndarray of shape (n_images,), int32 (keypoints per image)
    """
    orb = params.create()
    n = len(rows)
    width = np.zeros(n, np.int32)
    height = np.zeros(n, np.int32)
    counts = np.zeros(n, np.int32)
    status: list[str] = []
    error: list[str | None] = []
    descs: list[np.ndarray] = []
    for i, blob in enumerate(data):
        if isinstance(blob, BaseException):
            if io.is_transient(blob):
                # the store is down, not the file bad: fail (and retry) the task
                raise io.TransientStorageError(
                    f"{rows['path'].iat[i]}: {io.translate(blob, str(rows['path'].iat[i]))}"
                )
            status.append("error")
            error.append(f"read failed: {io.translate(blob, str(rows['path'].iat[i]))}")
            continue
        f = features.extract(blob, params, orb)
        width[i], height[i], counts[i] = f.width, f.height, len(f.descriptors)
        status.append(f.status)
        error.append(f.error)
        if len(f.descriptors):
            descs.append(f.descriptors)
    desc = (
        np.concatenate(descs) if descs else np.zeros((0, features.DESCRIPTOR_BYTES), dtype=np.uint8)
    )
    images = pa.table(
        {
            "path": pa.array(rows["path"], type=pa.string()),
            "label": pa.array(rows["label"], type=pa.string()),
            "split": pa.array(rows["split"], type=pa.string()),
            "size": pa.array(rows["size"], type=pa.int64()),
            "width": width,
            "height": height,
            "n_keypoints": counts,
            "status": pa.array(status, type=pa.string()),
            "error": pa.array(error, type=pa.string()),
        },
        schema=IMAGES_SCHEMA,
    )
    return images, desc, counts


def _summary(images: pa.Table, desc: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    status = images.column("status").to_pylist()
    return {
        "images": images.num_rows,
        "ok": status.count("ok"),
        "no_keypoints": status.count("no_keypoints"),
        "error": status.count("error"),
        "descriptors": int(len(desc)),
        "moments": moments(desc),
    }


def _sample_rows(desc: np.ndarray, index: int, cap: int) -> np.ndarray:
    """A uniform random subset of ``cap`` rows, in random order (any prefix of it is
    a uniform sample too); seeded by the partition index, so runs repeat."""
    if cap >= len(desc):
        rng = np.random.default_rng([index, 20])
        return desc[rng.permutation(len(desc))]
    rng = np.random.default_rng([index, 20])
    return desc[rng.choice(len(desc), cap, replace=False)]


#: Waits between attempts of a task when the store fails as a whole (a few
#: seconds of outage are ridden out; longer ones fail the run with one line).
RETRY_WAITS = (1.0, 2.0, 4.0, 8.0, 16.0)


# The client's listing comes first: a store that does not answer then is more
# often a wrong endpoint than an outage, and the user waits for the verdict.
LISTING_RETRY_WAITS = (1.0, 2.0)


def _retrying(fn: Callable[..., Any], waits: tuple[float, ...] = RETRY_WAITS) -> Callable[..., Any]:
    """Re-run an idempotent task body on transient storage errors, with backoff."""

    @functools.wraps(fn)  # keeps the name, so the task pickles by reference
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for wait in (*waits, None):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if wait is None or not io.is_transient(exc):
                    if io.is_transient(exc) and not isinstance(exc, io.StorageError):
                        raise io.TransientStorageError(
                            f"storage unavailable after {len(waits)} retries: {io._one_line(exc)}"
                        ) from None
                    raise
                time.sleep(wait)
        raise AssertionError("unreachable")

    return wrapper


def list_input(cfg: RunConfig) -> pd.DataFrame:
    """The input's listing, retried with backoff while the store is unavailable."""
    return _retrying(io.list_images, LISTING_RETRY_WAITS)(cfg.input, cfg.storage_options)


def _read_guarded(cfg: RunConfig, rows: pd.DataFrame) -> Iterator[bytes | Exception]:
    """The partition's bytes, except files too large to be an image within
    ``max_pixels``: those are refused unread (reading a 2 GB file named .jpg
    took the worker over its memory limit, and its retries every other worker)."""
    limit = features.max_file_bytes(cfg.orb.max_pixels)
    sizes = pd.to_numeric(rows["size"], errors="coerce").fillna(0).to_numpy()
    big = sizes > limit
    if not big.any():
        yield from io.iter_images(cfg.input, rows, cfg.storage_options)
        return
    rest = io.iter_images(cfg.input, rows[~big], cfg.storage_options)
    for too_big, size in zip(big, sizes, strict=True):
        if too_big:
            yield ValueError(f"file too large: {int(size):,} bytes (over {limit:,})")
        else:
            yield next(rest)


@_retrying
def _extract_task(
    index: int,
    rows: pd.DataFrame,
    cfg: RunConfig,
    run_id: str,
    sample_cap: int = 0,
) -> dict[str, Any]:
    """Worker side: read bytes, extract, write images/ and descriptors/ parts, mark done.

    Idempotent: file names depend only on the run and the partition, so a retry
    (or a recomputation after a lost worker) overwrites the same objects."""
    data = _read_guarded(cfg, rows)
    images, desc, counts = extract_partition(rows, data, cfg.orb)
    name = _part_name(index, run_id)
    so = cfg.out_storage_options
    io.write_table(images, io.join(cfg.output, "images", name), so)
    dtable = pa.table({**_keys(rows, counts), "descriptor": _binary_column(desc)})
    io.write_table(dtable.cast(DESCRIPTORS_SCHEMA), io.join(cfg.output, "descriptors", name), so)
    summary = _summary(images, desc, counts)
    marker = {
        "index": index,
        "name": name,
        "images": summary["images"],
        "descriptors": summary["descriptors"],
    }
    io.write_bytes(
        io.join(cfg.output, STATE_DIR, "done", f"{index:05d}.json"),
        json.dumps(marker).encode(),
        so,
    )
    return {
        "desc": desc,
        "counts": counts,
        "summary": summary,
        "sample": _sample_rows(desc, index, sample_cap),
    }


def _load_task(
    index: int, rows: pd.DataFrame, cfg: RunConfig, run_id: str, sample_cap: int = 0
) -> dict[str, Any] | None:
    """Worker side, on --resume: reload a finished partition instead of recomputing it.

    Returns None when the files do not verify (then the partition is recomputed).
    """
    name = _part_name(index, run_id)
    so = cfg.out_storage_options
    try:
        images = io.read_table(io.join(cfg.output, "images", name), so)
        dtable = io.read_table(io.join(cfg.output, "descriptors", name), so)
    except io.StorageError:
        return None
    if images.num_rows != len(rows) or images.column("path").to_pylist() != list(rows["path"]):
        return None
    counts = images.column("n_keypoints").to_numpy().astype(np.int32)
    if dtable.num_rows != int(counts.sum()):
        return None
    flat = dtable.column("descriptor").combine_chunks()
    if dtable.num_rows:
        buf = flat.buffers()[2]
        off = flat.offset * features.DESCRIPTOR_BYTES
        desc = np.frombuffer(buf, dtype=np.uint8)[off : off + dtable.num_rows * 32]
        desc = desc.reshape(-1, features.DESCRIPTOR_BYTES).copy()
    else:
        desc = np.zeros((0, features.DESCRIPTOR_BYTES), np.uint8)
    return {
        "desc": desc,
        "counts": counts,
        "summary": _summary(images, desc, counts),
        "sample": _sample_rows(desc, index, sample_cap),
    }


def _resume_or_extract(
    index: int, rows: pd.DataFrame, cfg: RunConfig, run_id: str, sample_cap: int = 0
) -> dict:
    got = _load_task(index, rows, cfg, run_id, sample_cap)
    if got is not None:
        got["summary"]["resumed"] = True
        return got
    return _extract_task(index, rows, cfg, run_id, sample_cap)


@_retrying
def _features_task(
    index: int,
    rows: pd.DataFrame,
    part: dict[str, Any],
    model: PcaModel,
    cfg: RunConfig,
    run_id: str,
) -> int:
    """Worker side: project one partition's descriptors and write its features/ part."""
    desc, counts = part["desc"], part["counts"]
    proj = model.transform(desc) if len(desc) else np.zeros((0, model.n_components), np.float32)
    table = pa.table({**_keys(rows, counts), "pca": _list_column(proj)}).cast(FEATURES_SCHEMA)
    io.write_table(
        table, io.join(cfg.output, "features", _part_name(index, run_id)), cfg.out_storage_options
    )
    return int(len(desc))


def _import_dask_ml() -> None:
    import dask_ml.decomposition  # noqa: F401


_preloading: threading.Thread | None = None


def preload(pca_method: str = "incremental", wait: bool = True) -> None:
    """Import dask-ml (~2.5 s of CPU: sklearn) unless already done or under way.

    The CLI calls this in a thread while the cluster starts, so the import is
    paid during start-up instead of competing with the workers for the cores
    during extraction; ``run`` calls it too, as a fallback.
    """
    global _preloading
    if pca_method != "incremental":
        return
    if _preloading is None:
        _preloading = threading.Thread(target=_import_dask_ml, daemon=True)
        _preloading.start()
    if wait:
        _preloading.join()


def _get(d: dict[str, Any], key: str) -> Any:
    return d[key]


def _head(d: dict[str, Any], key: str, n: int) -> Any:
    return d[key][:n]


# ---------------------------------------------------------------- orchestration
def plan_partitions(n_images: int, partition_size: int, n_threads: int) -> list[tuple[int, int]]:
    """[start, end) row ranges: at most ``partition_size`` images each, and at least
    two partitions per worker thread when the input is small, so every core works."""
    if n_images <= 0:
        return []
    threads = max(1, n_threads)
    n_parts = max(math.ceil(n_images / partition_size), 2 * threads)
    # A whole number of waves: 5 partitions on 2 threads would leave one core
    # idle for the last partition's duration.
    n_parts = min(n_images, math.ceil(n_parts / threads) * threads)
    size = math.ceil(n_images / n_parts)
    return [(s, min(s + size, n_images)) for s in range(0, n_images, size)]


def plan_packed_partitions(listing: pd.DataFrame, partition_size: int) -> list[tuple[int, int]]:
    """Partitions of a packed listing along its row groups, so each task reads whole
    row groups: consecutive groups are merged up to ``partition_size`` images."""
    key = listing["shard"].astype(str) + "#" + listing["row_group"].astype(str)
    starts = [0] + [i for i in range(1, len(key)) if key.iat[i] != key.iat[i - 1]]
    bounds = [*starts, len(key)]
    ranges: list[tuple[int, int]] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if ranges and (b - ranges[-1][0]) <= partition_size:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


def _fingerprint(cfg: RunConfig, listing: pd.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(cfg.input.encode())
    h.update(json.dumps(cfg.public_dict()["orb"], sort_keys=True).encode())
    h.update(pd.util.hash_pandas_object(listing[["path", "size"]], index=False).values.tobytes())
    return h.hexdigest()[:16]


def _read_json(url: str, so: dict[str, Any]) -> dict[str, Any] | None:
    text = io.read_text(url, so)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _output_state(cfg: RunConfig) -> set[str]:
    return set(io.ls(cfg.output, cfg.out_storage_options))


def _prepare_output(cfg: RunConfig, listing: pd.DataFrame, n_threads: int) -> dict[str, Any]:
    """Decide run id and partitioning; refuse, resume or start over. Returns the state."""
    so = cfg.out_storage_options
    out = cfg.output
    io.check_writable(out, so)
    entries = _output_state(cfg)
    ours = entries & {
        "images",
        "descriptors",
        "features",
        "model",
        "manifest.json",
        "_SUCCESS",
        STATE_DIR,
    }
    state_url = io.join(out, STATE_DIR, "run.json")
    fingerprint = _fingerprint(cfg, listing)
    if cfg.resume:
        state = _read_json(state_url, so) if STATE_DIR in entries else None
        if state is None:
            if "_SUCCESS" in entries:
                return {"complete": True}
            if entries - {STATE_DIR}:
                raise OutputExistsError(
                    f"{out}: nothing to resume (no interrupted fruitdask run there)"
                )
            # nothing was written before the interruption: start from scratch
        elif state.get("fingerprint") != fingerprint:
            raise OutputExistsError(
                f"{out}: the interrupted run used a different input or ORB settings; "
                "use --overwrite to start over"
            )
        else:
            return state
    elif entries and not cfg.overwrite:
        raise OutputExistsError(
            f"{out}: output already exists (use --overwrite to replace it, "
            "or --resume to finish an interrupted run)"
        )
    if "_SUCCESS" in ours:
        # First thing an overwrite does: the old result stops being "complete".
        io.remove([io.join(out, "_SUCCESS")], so)
    if STATE_DIR in ours:
        io.remove_tree(io.join(out, STATE_DIR), so)
    if "row_group" in listing.columns:
        ranges = plan_packed_partitions(listing, cfg.partition_size)
    else:
        ranges = plan_partitions(len(listing), cfg.partition_size, n_threads)
    state = {
        "run_id": uuid.uuid4().hex[:8],
        "fingerprint": fingerprint,
        "partitions": ranges,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    io.write_bytes(state_url, json.dumps(state).encode(), so)
    return state


def _library_versions() -> dict[str, str]:
    import cv2
    import dask
    import distributed
    import fsspec
    import sklearn

    import fruitdask

    versions = {
        "fruitdask": fruitdask.__version__,
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "fsspec": fsspec.__version__,
        "opencv": cv2.__version__,
        "scikit-learn": sklearn.__version__,
    }
    try:
        import dask_ml

        versions["dask-ml"] = dask_ml.__version__
    except ImportError:
        pass
    return versions


def _n_threads(client) -> int:
    info = (
        client.scheduler_info(n_workers=-1)
        if _accepts_n_workers(client)
        else client.scheduler_info()
    )
    return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def run(
    cfg: RunConfig,
    client,
    progress: Progress | None = None,
    listing: pd.DataFrame | None = None,
    startup_seconds: float = 0.0,
    listing_seconds: float = 0.0,
) -> RunSummary:
    """Run the whole job on a Dask ``client``; see the module docstring for the output.

    Raises
    ------
    io.StorageError
        The input is missing, empty, unreachable or denied; nothing is written.
    OutputExistsError
        The output exists and neither ``overwrite`` nor ``resume`` is set.
    """
    from distributed import as_completed

    timings: dict[str, float] = {"startup": round(startup_seconds, 3)}
    preload(cfg.pca_method, wait=False)
    t = time.perf_counter()
    if listing is None:
        listing = list_input(cfg)
    timings["listing"] = time.perf_counter() - t + listing_seconds

    n_threads = _n_threads(client)
    state = _prepare_output(cfg, listing, n_threads)
    if state.get("complete"):
        summary = RunSummary(output=cfg.output, run_id="", already_complete=True)
        return summary
    run_id = state["run_id"]
    # Task keys name this invocation, not only the run: a --resume in the same
    # client after a failure must not meet the failed attempt's cancelled keys.
    # (Files are named by run_id alone, so a resume still reuses finished parts.)
    tk = f"{run_id}-{uuid.uuid4().hex[:6]}"
    ranges = [tuple(r) for r in state["partitions"]]
    so = cfg.out_storage_options
    done = set()
    if cfg.resume:
        done = {
            int(n.split(".")[0])
            for n in io.ls(io.join(cfg.output, STATE_DIR, "done"), so)
            if n.endswith(".json")
        }
    summary = RunSummary(output=cfg.output, run_id=run_id, partitions=len(ranges))
    chunks = [listing.iloc[a:b].reset_index(drop=True) for a, b in ranges]

    # 1. extraction: one task per partition, results stay on the workers.
    t = time.perf_counter()
    # Each partition keeps a random subset of its descriptors, 4x its share of a
    # pca_sample-row sample if descriptors were spread evenly over images; the
    # share actually taken (below) follows the real counts, so the sample stays
    # uniform over descriptors unless a partition is >4x denser than average.
    n_list = max(1, len(listing))
    sampled = cfg.pca_method == "incremental" and cfg.pca_sample > 0
    caps = [
        math.ceil(4 * cfg.pca_sample * len(rows) / n_list) + cfg.n_components if sampled else 0
        for rows in chunks
    ]
    parts = []
    for i, rows in enumerate(chunks):
        fn = _resume_or_extract if i in done else _extract_task
        parts.append(client.submit(fn, i, rows, cfg, run_id, caps[i], key=f"extract-{tk}-{i:05d}"))
    infos = [
        client.submit(_get, p, "summary", key=f"summary-{tk}-{i:05d}") for i, p in enumerate(parts)
    ]
    summaries: list[dict[str, Any] | None] = [None] * len(parts)
    index_of = {f.key: i for i, f in enumerate(infos)}
    n_done_images = 0
    try:
        for fut in as_completed(infos):
            s = fut.result()
            i = index_of[fut.key]
            summaries[i] = s
            n_done_images += s["images"]
            if progress:
                progress(
                    "extract", sum(x is not None for x in summaries), len(parts), n_done_images
                )
        timings["extract"] = time.perf_counter() - t

        total = Moments(0, np.zeros(32), np.zeros((32, 32)))
        sizes = []
        for s in summaries:
            assert s is not None
            summary.images += s["images"]
            summary.images_ok += s["ok"]
            summary.images_no_keypoints += s["no_keypoints"]
            summary.images_error += s["error"]
            summary.descriptors += s["descriptors"]
            summary.partitions_resumed += int(bool(s.get("resumed")))
            total = combine_moments(total, s["moments"])
            sizes.append(s["descriptors"])

        # 2. PCA fit.
        t = time.perf_counter()
        if summary.descriptors < max(2, cfg.n_components):
            raise io.StorageError(
                f"{cfg.input}: only {summary.descriptors} ORB descriptors in "
                f"{summary.images} images; PCA with {cfg.n_components} components needs more"
            )
        exact = exact_pca(total, cfg.n_components)
        sample_rows = 0
        if cfg.pca_method == "exact":
            model = exact
        elif sampled:
            from fruitdask.pca import fit_incremental

            want = min(cfg.pca_sample, summary.descriptors)
            quotas = [
                min(caps[i], round(want * n / summary.descriptors)) for i, n in enumerate(sizes)
            ]
            heads = [
                client.submit(_head, p, "sample", q, key=f"sample-{tk}-{i:05d}")
                for i, (p, q) in enumerate(zip(parts, quotas, strict=True))
                if q > 0
            ]
            x = np.concatenate(client.gather(heads))
            sample_rows = len(x)
            model = fit_incremental(x, cfg.n_components, cfg.pca_batch_size, cfg.pca_svd_solver)
        else:
            import dask.array as da

            from fruitdask.pca import fit_incremental

            blocks = [
                da.from_delayed(
                    client.submit(_get, p, "desc", key=f"desc-{tk}-{i:05d}"),
                    shape=(n, features.DESCRIPTOR_BYTES),
                    dtype=np.uint8,
                )
                for i, (p, n) in enumerate(zip(parts, sizes, strict=True))
                if n > 0
            ]
            x = da.concatenate(blocks, axis=0)
            model = fit_incremental(x, cfg.n_components, cfg.pca_batch_size, cfg.pca_svd_solver)
        timings["pca_fit"] = time.perf_counter() - t
        angles = principal_angles(model.components, exact.components)
        summary.pca = {
            "method": model.method,
            "n_components": model.n_components,
            "fitted_on_rows": int(model.n_samples),
            "sampled": bool(sample_rows),
            # both evaluated on every descriptor of the run (from the exact moments)
            "explained_variance_ratio": variance_captured(model, total),
            "exact_explained_variance_ratio": float(exact.explained_variance_ratio.sum()),
            "max_principal_angle_to_exact_deg": float(angles.max()),
            "principal_angles_to_exact_deg": [round(float(a), 4) for a in angles],
        }

        # 3. transform + write features.
        t = time.perf_counter()
        model_f = client.scatter(model, broadcast=False)
        writes = [
            client.submit(
                _features_task, i, rows, p, model_f, cfg, run_id, key=f"features-{tk}-{i:05d}"
            )
            for i, (rows, p) in enumerate(zip(chunks, parts, strict=True))
        ]
        written = 0
        for k, fut in enumerate(as_completed(writes), 1):
            written += fut.result()
            if progress:
                progress("features", k, len(writes), written)
        timings["transform_write"] = time.perf_counter() - t
    except BaseException:
        client.cancel(parts)
        raise

    # 4. publish: model, manifest, _SUCCESS last; then drop what the old run left.
    t = time.perf_counter()
    names = [_part_name(i, run_id) for i in range(len(ranges))]
    files = {tbl: [f"{tbl}/{n}" for n in names] for tbl in TABLES}
    if not cfg.write_descriptors:
        io.remove([io.join(cfg.output, f) for f in files.pop("descriptors")], so)
    files["model"] = [f"model/pca-{run_id}.json"]
    io.write_bytes(io.join(cfg.output, files["model"][0]), model.to_json().encode(), so)
    summary.files = files
    timings["publish"] = time.perf_counter() - t
    summary.timings = {k: round(v, 3) for k, v in timings.items()}
    manifest = _manifest(cfg, summary, listing, client)
    io.write_bytes(
        io.join(cfg.output, "manifest.json"), json.dumps(manifest, indent=1).encode(), so
    )
    io.write_bytes(io.join(cfg.output, "_SUCCESS"), f"{run_id}\n".encode(), so)
    _cleanup(cfg, files)
    return summary


def _cleanup(cfg: RunConfig, files: dict[str, list[str]]) -> None:
    """Delete files of earlier runs and the run state, after ``_SUCCESS`` is written."""
    so = cfg.out_storage_options
    keep = {f for fs in files.values() for f in fs}
    stale = []
    for folder in (*TABLES, "model"):
        for name in io.ls(io.join(cfg.output, folder), so):
            if f"{folder}/{name}" not in keep:
                stale.append(io.join(cfg.output, folder, name))
    io.remove(stale, so)
    io.remove_tree(io.join(cfg.output, STATE_DIR), so)


def _manifest(cfg: RunConfig, s: RunSummary, listing: pd.DataFrame, client) -> dict[str, Any]:
    work = sum(v for k, v in s.timings.items() if k != "startup")
    try:
        n_workers = len(client.scheduler_info().get("workers", {}))
    except Exception:  # noqa: BLE001 - informational only
        n_workers = None
    threads = _n_threads(client)
    return {
        "format": "fruitdask-output/1",
        "engine": "dask",
        "run_id": s.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": cfg.input,
        "config": cfg.public_dict(),
        "cluster": {"workers": n_workers, "threads": threads},
        "counts": {
            "images": s.images,
            "ok": s.images_ok,
            "no_keypoints": s.images_no_keypoints,
            "error": s.images_error,
            "descriptors": s.descriptors,
            "partitions": s.partitions,
            "partitions_resumed": s.partitions_resumed,
            "labels": int(listing["label"].nunique()),
        },
        "timings": s.timings,
        "throughput": {
            "images_per_s": round(s.images / work, 1) if work else None,
            "images_per_s_per_core": round(s.images / work / threads, 1) if work else None,
        },
        "pca": s.pca,
        "files": s.files,
        "versions": _library_versions(),
    }
