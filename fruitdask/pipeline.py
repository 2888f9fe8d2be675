"""The Dask job: list -> extract (decode + ORB) -> fit PCA -> transform + write -> publish.

Data flows one way. The client holds only the listing and small per-partition
summaries; image bytes and descriptors live in the workers, which read their own
inputs and write their own output files. :func:`run` reads like that flow: each
stage is a function below it, timed by :class:`Timer`. The output's lifecycle
(lock, run state, resume, commit, cleanup) is :class:`fruitdask.output.OutputDir`'s.

Output layout (every table plain Parquet, one file per partition)::

    OUT/images/part-00000-<run>.parquet       one row per listed file
    OUT/descriptors/part-00000-<run>.parquet  one row per keypoint, raw 32 bytes
    OUT/features/part-00000-<run>.parquet     one row per keypoint, PCA vector
    OUT/model/pca-<run>.json                  the fitted PCA
    OUT/manifest.json                         settings, counts, timings, file list
    OUT/_SUCCESS                              the commit point; holds the run id
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fruitdask import features, io, source, tables
from fruitdask.cancel import StopToken
from fruitdask.cluster import gather_as_completed, n_threads, usage
from fruitdask.config import RunConfig, absolute
from fruitdask.errors import FruitdaskError, InputError, retrying
from fruitdask.output import (
    OutputDir,
    RunState,
    library_versions,
    new_run_id,
    read_committed,
    recordable_options,
)
from fruitdask.partition import plan
from fruitdask.pca import (
    Moments,
    PcaModel,
    combine_moments,
    exact_pca,
    fit_incremental,
    moments,
    pca_report,
)

__all__ = [
    "Job",
    "Progress",
    "RunSummary",
    "Timer",
    "begin",
    "extract",
    "fit_pca",
    "list_input",
    "lock_output",
    "preflight",
    "preload",
    "publish",
    "run",
    "settings_of",
    "write_features",
]

#: ``progress(stage, done, total, items)``: called as tasks finish.
Progress = Callable[[str, int, int, int], None]


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
    #: Where the HTML report was written (by the CLI, after the commit).
    report: str | None = None

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))

    @property
    def images_per_s(self) -> float:
        work = sum(v for k, v in self.timings.items() if k != "startup")
        return self.images / work if work > 0 else 0.0


class Timer:
    """Per-stage seconds, recorded by ``with timer("stage"):``.

    ``on_stage(stage, event, seconds)``, when given, hears ``"begin"`` and
    ``"end"`` of every stage (the CLI shows them as progress).
    """

    def __init__(
        self, on_stage: Callable[[str, str, float], None] | None = None, **already: float
    ) -> None:
        self.seconds: dict[str, float] = {k: float(v) for k, v in already.items()}
        self.on_stage = on_stage
        self._running: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.on_stage:
            self.on_stage(stage, "begin", 0.0)
        t = time.perf_counter()
        ok = False
        self._running[stage] = t
        try:
            yield
            ok = True
        finally:
            self._running.pop(stage, None)
            spent = time.perf_counter() - t
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
            if self.on_stage and ok:
                self.on_stage(stage, "end", spent)

    def record(self, stage: str, seconds: float) -> None:
        """A stage timed elsewhere (the cluster's start-up)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        if self.on_stage:
            self.on_stage(stage, "end", seconds)

    def rounded(self) -> dict[str, float]:
        """Seconds per stage; a stage still running (``publish``, which writes the
        manifest holding these) counts up to now."""
        now = time.perf_counter()
        out = dict(self.seconds)
        for stage, t in self._running.items():
            out[stage] = out.get(stage, 0.0) + now - t
        return {k: round(v, 3) for k, v in out.items()}


@dataclass
class Job:
    """A run in progress: its settings, output, listing and partitions."""

    cfg: RunConfig
    out: OutputDir
    listing: pd.DataFrame
    run: RunState
    ranges: list[tuple[int, int]]
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: makes task keys unique to this invocation: a --resume in the same client
    #: after a failure must not meet the failed attempt's cancelled keys
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    #: whether this continues an interrupted run (``--resume``)
    resumed: bool = False

    @property
    def chunks(self) -> list[pd.DataFrame]:
        return [self.listing.iloc[a:b].reset_index(drop=True) for a, b in self.ranges]

    def key(self, stage: str, index: int) -> str:
        return f"{stage}-{self.run.run_id}-{self.token}-{index:05d}"


# ---------------------------------------------------------------- the flow
def run(
    cfg: RunConfig,
    client,
    progress: Progress | None = None,
    stop: StopToken | None = None,
    listing: pd.DataFrame | None = None,
    out: OutputDir | None = None,
    timer: Timer | None = None,
) -> RunSummary:
    """Run the whole job on a Dask ``client``; see the module docstring for the output.

    ``listing`` and ``out`` are :func:`preflight`'s (the CLI runs it before
    starting a cluster); without them this call lists and locks itself.

    Raises
    ------
    fruitdask.errors.FruitdaskError
        Typed, one line: a bad or unreachable input (nothing written), an
        existing output, a locked one, a changed input on resume, a stop request.
    """
    stop = stop or StopToken()
    timer = timer or Timer()
    preload(cfg.pca_method, wait=False)
    if listing is None:
        with timer("listing"):
            listing = list_input(cfg)
    if out is None:
        out = lock_output(cfg, stop)
    try:
        job = begin(cfg, out, listing, n_threads(client))
        if job is None:
            return RunSummary(output=cfg.output, run_id="", already_complete=True)
        with timer("extract"):
            parts, summaries = extract(client, job, progress, stop)
        with timer("pca_fit"):
            try:
                model, total = fit_pca(client, job, parts, summaries, stop)
            except InputError:
                # too few descriptors for the PCA: the same settings on the same
                # files can never commit, so nothing of this run may stay behind
                if not job.resumed:
                    client.cancel(parts)
                    out.abandon(job.run.run_id)
                raise
        with timer("transform_write"):
            write_features(client, job, parts, model, progress, stop)
        with timer("publish"):
            summary = summarize(job, summaries, model, total)
            publish(client, job, summary, model, timer, stop)
        summary.timings = timer.rounded()
        return summary
    finally:
        out.release()


def list_input(cfg: RunConfig) -> pd.DataFrame:
    """The input's listing, retried with backoff while the store is unavailable
    (after one quick check that a custom endpoint answers at all)."""
    io.check_reachable(cfg.input, cfg.storage_options)
    return retrying(source.list_input)(cfg.input, cfg.storage_options)


def preflight(cfg: RunConfig, stop: StopToken | None = None) -> tuple[pd.DataFrame, OutputDir]:
    """Everything that can refuse a run before a cluster starts: the input is
    listed, the output checked (and kept apart from the input) and locked.

    Returns the listing and the locked :class:`OutputDir`; call ``out.release()``
    if the run does not go ahead. A ``--resume`` of another job (other settings,
    changed input files) is refused here, not after a cluster has started.
    """
    listing = list_input(cfg)
    out = lock_output(cfg, stop)
    if cfg.resume and out.resumable() is not None:
        try:  # a changed job is refused now, not after the cluster's start-up
            out.resume(settings_of(cfg), listing)
        except BaseException:
            out.release()
            raise
    return listing, out


def lock_output(cfg: RunConfig, stop: StopToken | None = None) -> OutputDir:
    """The output, checked (and kept apart from the input) and locked."""
    out = OutputDir(cfg.output, cfg.out_storage_options)
    mode = "resume" if cfg.resume else "overwrite" if cfg.overwrite else "new"
    out.check(mode, {"input": (cfg.input, cfg.storage_options)})
    out.lock(new_run_id(), stop=stop)
    return out


def settings_of(cfg: RunConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    d = cfg.public_dict()
    for k in ("overwrite", "resume"):
        d.pop(k)
    return d


def begin(cfg: RunConfig, out: OutputDir, listing: pd.DataFrame, threads: int) -> Job | None:
    """Start a new run, or continue an interrupted one (``cfg.resume``); None when
    ``--resume`` finds the output already complete."""
    if cfg.resume:
        if out.resumable() is None:
            if read_committed(out.url, out.so) is not None:
                return None
        else:
            run, state = out.resume(settings_of(cfg), listing)
            ranges = [(int(a), int(b)) for a, b in state["partitions"]]
            job = Job(cfg, out, listing, run, ranges, resumed=True)
            job.done = run.done(len(ranges))
            return job
    ranges = plan(listing, cfg.partition_size, threads)
    run_id = out.lease.run_id if out.lease is not None else new_run_id()
    run = RunState(out.url, out.so, run_id)
    files = [run.part(t, i) for t in tables.TABLES for i in range(len(ranges))]
    files.append(f"model/pca-{run_id}.json")
    out.start(run_id, settings_of(cfg), ranges, listing, files)
    return Job(cfg, out, listing, run, ranges)


# ---------------------------------------------------------------- tasks (worker side)
def _sample_rows(desc: np.ndarray, index: int, cap: int) -> np.ndarray:
    """A uniform random subset of ``cap`` rows, in random order (any prefix of it is
    a uniform sample too); seeded by the partition index, so runs repeat."""
    rng = np.random.default_rng([index, 20])
    if cap >= len(desc):
        return desc[rng.permutation(len(desc))]
    return desc[rng.choice(len(desc), cap, replace=False)]


def _result(images, desc: np.ndarray, counts: np.ndarray, index: int, cap: int) -> dict:
    summary = {**tables.status_counts(images), "descriptors": len(desc), "moments": moments(desc)}
    return {"desc": desc, "counts": counts, "summary": summary,
            "sample": _sample_rows(desc, index, cap)}  # fmt: skip


def _extract_task(
    index: int, rows: pd.DataFrame, cfg: RunConfig, run: RunState, cap: int = 0
) -> dict[str, Any]:
    """Read, extract, write the partition's images/ and descriptors/ files, mark it done.

    Idempotent: file names depend only on the run and the partition, so a retry
    (or a recomputation after a lost worker) overwrites the same objects."""
    data = source.iter_images(cfg.input, rows, cfg.storage_options, cfg.orb.max_pixels)
    images, desc, counts = tables.extract_partition(rows, data, cfg.orb)
    run.write_table(run.part("images", index), images)
    run.write_table(run.part("descriptors", index), tables.descriptors_table(rows, counts, desc))
    run.mark_done(index, {"images": images.num_rows, "descriptors": len(desc)})
    return _result(images, desc, counts, index, cap)


_extract_retrying = retrying(_extract_task)


def _load_task(
    index: int, rows: pd.DataFrame, cfg: RunConfig, run: RunState, cap: int = 0
) -> dict[str, Any]:
    """On --resume: reload a finished partition, or extract it again when its
    files do not verify against its listing rows."""
    try:
        images = io.read_table(run.url_of(run.part("images", index)), run.storage_options)
        dtable = io.read_table(run.url_of(run.part("descriptors", index)), run.storage_options)
    except FruitdaskError:
        return _extract_retrying(index, rows, cfg, run, cap)
    counts = images.column("n_keypoints").to_numpy().astype(np.int32)
    same = images.column("path").to_pylist() == list(rows["path"])
    if not same or dtable.num_rows != int(counts.sum()):
        return _extract_retrying(index, rows, cfg, run, cap)
    flat = dtable.column("descriptor").combine_chunks()
    width = features.DESCRIPTOR_BYTES
    if dtable.num_rows:
        buf = flat.buffers()[2]
        off = flat.offset * width
        desc = np.frombuffer(buf, dtype=np.uint8)[off : off + dtable.num_rows * width]
        desc = desc.reshape(-1, width).copy()
    else:
        desc = np.zeros((0, width), np.uint8)
    result = _result(images, desc, counts, index, cap)
    result["summary"]["resumed"] = True
    return result


def _features_task(
    index: int, rows: pd.DataFrame, part: dict[str, Any], model: PcaModel, run: RunState
) -> int:
    """Project one partition's descriptors and write its features/ file."""
    desc, counts = part["desc"], part["counts"]
    proj = model.transform(desc) if len(desc) else np.zeros((0, model.n_components), np.float32)
    run.write_table(run.part("features", index), tables.features_table(rows, counts, proj))
    return int(len(desc))


_features_retrying = retrying(_features_task)


def _get(d: dict[str, Any], key: str) -> Any:
    return d[key]


def _head(d: dict[str, Any], key: str, n: int) -> Any:
    return d[key][:n]


# ---------------------------------------------------------------- stages (client side)
def _sample_caps(job: Job) -> list[int]:
    # Each partition keeps a random subset of its descriptors, 4x its share of a
    # pca_sample-row sample if descriptors were spread evenly over images; the
    # share taken (fit_pca) follows the real counts, so the sample stays uniform
    # unless a partition is >4x denser than average.
    cfg = job.cfg
    if cfg.pca_method != "incremental" or cfg.pca_sample <= 0:
        return [0] * len(job.ranges)
    n = max(1, len(job.listing))
    return [math.ceil(4 * cfg.pca_sample * (b - a) / n) + cfg.n_components for a, b in job.ranges]


def extract(
    client, job: Job, progress: Progress | None, stop: StopToken
) -> tuple[list, list[dict[str, Any]]]:
    """One task per partition; results (descriptors, samples) stay on the workers.

    Returns the futures and the partitions' summaries (counts, moments).
    """
    caps = _sample_caps(job)
    futures = [
        client.submit(_load_task if i in job.done else _extract_retrying,
                      i, rows, job.cfg, job.run, caps[i], key=job.key("extract", i))
        for i, rows in enumerate(job.chunks)
    ]  # fmt: skip
    infos = [
        client.submit(_get, f, "summary", key=job.key("summary", i)) for i, f in enumerate(futures)
    ]
    seen = {"parts": 0, "images": 0}

    def tick(_: int, s: dict[str, Any]) -> None:
        seen["parts"] += 1
        seen["images"] += s["images"]
        if progress:
            progress("extract", seen["parts"], len(infos), seen["images"])

    try:
        summaries = gather_as_completed(client, infos, stop, tick)
    except BaseException:
        client.cancel(futures)
        raise
    return futures, summaries


def fit_pca(
    client, job: Job, parts: list, summaries: list[dict[str, Any]], stop: StopToken
) -> tuple[PcaModel, Moments]:
    """Fit the PCA (see :mod:`fruitdask.pca`); returns it and the exact moments of
    every descriptor, which the manifest's accuracy figures are computed from."""
    cfg = job.cfg
    total = Moments(0, np.zeros(32), np.zeros((32, 32)))
    for s in summaries:
        total = combine_moments(total, s["moments"])
    if total.n < max(2, cfg.n_components):
        images = sum(s["images"] for s in summaries)
        raise InputError(
            f"{cfg.input}: only {total.n} ORB descriptors in {images} images; "
            f"PCA with {cfg.n_components} components needs at least {max(2, cfg.n_components)}"
        )
    if cfg.pca_method == "exact":
        return exact_pca(total, cfg.n_components), total
    preload(cfg.pca_method)
    sizes = [s["descriptors"] for s in summaries]
    if cfg.pca_sample > 0:
        caps = _sample_caps(job)
        want = min(cfg.pca_sample, total.n)
        quotas = [min(caps[i], round(want * n / total.n)) for i, n in enumerate(sizes)]
        heads = [
            client.submit(_head, p, "sample", q, key=job.key("sample", i))
            for i, (p, q) in enumerate(zip(parts, quotas, strict=True))
            if q > 0
        ]
        x = np.concatenate(gather_as_completed(client, heads, stop))
    else:
        import dask.array as da

        blocks = [
            da.from_delayed(client.submit(_get, p, "desc", key=job.key("desc", i)),
                            shape=(n, features.DESCRIPTOR_BYTES), dtype=np.uint8)
            for i, (p, n) in enumerate(zip(parts, sizes, strict=True))
            if n > 0
        ]  # fmt: skip
        x = da.concatenate(blocks, axis=0)
    stop.check()
    return fit_incremental(x, cfg.n_components, cfg.pca_batch_size, cfg.pca_svd_solver), total


def write_features(
    client, job: Job, parts: list, model: PcaModel, progress: Progress | None, stop: StopToken
) -> None:
    """Project every partition's descriptors and write its features/ file."""
    model_f = client.scatter(model, broadcast=False)
    writes = [
        client.submit(_features_retrying, i, rows, p, model_f, job.run,
                      key=job.key("features", i))
        for i, (rows, p) in enumerate(zip(job.chunks, parts, strict=True))
    ]  # fmt: skip
    seen = {"parts": 0, "rows": 0}

    def tick(_: int, n: int) -> None:
        seen["parts"] += 1
        seen["rows"] += n
        if progress:
            progress("features", seen["parts"], len(writes), seen["rows"])

    try:
        gather_as_completed(client, writes, stop, tick)
    except BaseException:
        client.cancel(parts)  # stop what still runs; on success the caller's release frees them
        raise


def summarize(
    job: Job, summaries: list[dict[str, Any]], model: PcaModel, total: Moments
) -> RunSummary:
    """The run's counts and PCA accuracy (before its files are published)."""
    s = RunSummary(output=job.cfg.output, run_id=job.run.run_id, partitions=len(job.ranges))
    for x in summaries:
        s.images += x["images"]
        s.images_ok += x["ok"]
        s.images_no_keypoints += x["no_keypoints"]
        s.images_error += x["error"]
        s.descriptors += x["descriptors"]
        s.partitions_resumed += int(bool(x.get("resumed")))
    s.pca = pca_report(model, total)
    run = job.run
    s.files = {t: [run.part(t, i) for i in range(len(job.ranges))] for t in tables.TABLES}
    if not job.cfg.write_descriptors:
        s.files.pop("descriptors")
    s.files["model"] = [f"model/pca-{run.run_id}.json"]
    return s


def publish(
    client, job: Job, summary: RunSummary, model: PcaModel, timer: Timer, stop: StopToken
) -> None:
    """Write the model and commit the run (``_SUCCESS``, then the cleanup)."""
    stop.check()
    job.run.write_bytes(summary.files["model"][0], model.to_json().encode())
    summary.timings = timer.rounded()
    job.out.publish(job.run, manifest_of(job, summary, client), stop=stop)


def manifest_of(job: Job, s: RunSummary, client) -> dict[str, Any]:
    cfg = job.cfg
    work = sum(v for k, v in s.timings.items() if k != "startup")
    threads = n_threads(client)
    cluster: dict[str, Any] = {"workers": len(client.nthreads()), "threads": threads}
    used = usage(client)  # a cloud cluster's instance-hours and estimated cost
    if used:
        cluster["usage"] = used
    unlisted = job.listing.attrs.get("unlisted") or []
    return {
        "engine": "dask",
        "input": absolute(cfg.input),
        "config": cfg.public_dict(),
        "storage_options": recordable_options(cfg.storage_options),
        "cluster": cluster,
        "counts": {
            "images": s.images,
            "ok": s.images_ok,
            "no_keypoints": s.images_no_keypoints,
            "error": s.images_error,
            "descriptors": s.descriptors,
            "partitions": s.partitions,
            "partitions_resumed": s.partitions_resumed,
            "labels": int(job.listing["label"].nunique()),
            "folders_not_listed": len(unlisted),
        },
        "not_listed": [{"path": p, "reason": r} for p, r in unlisted[:100]],
        "timings": s.timings,
        "throughput": {
            "images_per_s": round(s.images / work, 1) if work else None,
            "images_per_s_per_core": round(s.images / work / threads, 1) if work else None,
        },
        "pca": s.pca,
        "files": s.files,
        "versions": library_versions(),
    }


# ---------------------------------------------------------------- client imports
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
