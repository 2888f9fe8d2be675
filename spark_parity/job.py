"""The fruitdask job in PySpark: list -> decode + ORB -> PCA -> Parquet -> commit.

It writes what ``fruitdask run`` writes (``images/``, ``descriptors/``,
``features/``, ``model/pca-<run>.json``, ``manifest.json``, ``_SUCCESS``),
with the same schemas (:mod:`fruitdask.tables`), the same file names and the
same commit protocol (:class:`fruitdask.output.OutputDir`), so only the
manifest's ``"engine": "spark"`` tells which engine wrote a result. The
per-image work is the same code as Dask's: :func:`fruitdask.tables.extract_partition`
over :mod:`fruitdask.features`. How the input is read is :mod:`.reading`; the
two profiles are :mod:`.tuned` (the default, the best Spark we know) and
:mod:`.seed` (the original EMR job's structure).

Spark's fit is exact (an eigendecomposition of the covariance, like
``fruitdask.pca.exact_pca``), but ``PCAModel.transform`` does **not** subtract
the mean: both profiles write *centred* features, ``(x - mean) @ components.T``,
what ``PcaModel.transform`` computes on the saved model.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from typing import Any

import pandas as pd

from fruitdask import io, source, tables
from fruitdask.cancel import StopToken
from fruitdask.config import RunConfig, absolute
from fruitdask.errors import FruitdaskError, JobError, OutputExistsError, one_line, retrying
from fruitdask.output import OutputDir, RunState, library_versions, new_run_id, recordable_options
from fruitdask.pca import PcaModel
from fruitdask.pipeline import RunSummary, Timer, settings_of
from spark_parity.reading import READERS, Source, choose_reader, open_source, relative
from spark_parity.seed import run_seed
from spark_parity.session import quiet_pandas_warning
from spark_parity.stages import recorded_error, write_extracted
from spark_parity.tuned import run_tuned

__all__ = ["PROFILES", "READERS", "preflight", "run"]

PROFILES = ("tuned", "seed")


def preflight(
    cfg: RunConfig,
    native_s3: bool = False,
    reader: str | None = None,
    stop: StopToken | None = None,
    environment: Callable[[], None] | None = None,
) -> tuple[pd.DataFrame | None, OutputDir]:
    """Check the input and the output, and lock the output, before Spark starts
    (a typo costs no JVM start-up). ``environment`` (pyspark and Java present)
    is called after the paths' own checks and the listing (a wrong path is the
    likelier mistake), before the output is locked.

    Returns
    -------
    The driver's listing (None with ``native_s3``, where only Spark lists the
    input) and the locked :class:`OutputDir`.

    Raises
    ------
    fruitdask.errors.FruitdaskError
    """
    choose_reader(cfg, native_s3, reader)
    io.check_reachable(cfg.input, cfg.storage_options)
    out = OutputDir(cfg.output, cfg.out_storage_options)
    state = out.check("overwrite", {"input": (cfg.input, cfg.storage_options)})
    if state != "empty" and not cfg.overwrite:  # this job does not resume: one way out
        raise OutputExistsError(
            f"{cfg.output}: output already exists (use --overwrite to replace it)"
        )
    listing = None if native_s3 else retrying(source.list_input)(cfg.input, cfg.storage_options)
    if environment is not None:
        environment()
    out.lock(new_run_id(), stop=stop)
    return listing, out


def run(
    cfg: RunConfig,
    spark,
    out: OutputDir,
    listing: pd.DataFrame | None = None,
    profile: str = "tuned",
    native_s3: bool = False,
    reader: str | None = None,
    progress: Callable[[str, int, int, int], None] | None = None,
    stop: StopToken | None = None,
    timer: Timer | None = None,
) -> RunSummary:
    """Run the whole job on a SparkSession; the output is ``fruitdask run``'s.

    Parameters
    ----------
    cfg : RunConfig
        The Dask job's settings. Used here: input, output, storage options, ORB,
        ``partition_size`` (tuned), ``n_components``, ``pca_sample`` (0 = fit on
        every descriptor; Spark's fit is exact either way), ``write_descriptors``.
    out, listing
        :func:`preflight`'s.
    profile : {"tuned", "seed"}
    reader : {"binaryfile", "fsspec"}, optional
        How to read the input (:mod:`.reading`).
    stop : StopToken, optional
        A stop request cancels Spark's jobs; the run raises ``Cancelled``.
    """
    stop = stop or StopToken()
    timer = timer or Timer()
    stop.on_stop(spark.sparkContext.cancelAllJobs)
    cores = int(spark.sparkContext.defaultParallelism)
    assert out.lease is not None, "preflight() locks the output first"
    run_state = out.start(out.lease.run_id, settings_of(cfg), [], listing)
    try:
        with timer("listing"):
            src = open_source(spark, cfg, choose_reader(cfg, native_s3, reader), cores,
                              listing, profile == "tuned")  # fmt: skip
        res = _profile(spark, cfg, src, out, run_state, cores, profile, timer, progress, stop)
        _extract_unscanned(cfg, src, run_state, res, timer)
        with timer("publish"):
            summary = _summary(cfg, run_state, res)
            run_state.write_bytes(summary.files["model"][0], res["model"].to_json().encode())
            summary.timings = timer.rounded()
            manifest = _manifest(cfg, summary, res["counts"], spark, profile, src, cores)
            out.publish(run_state, manifest, stop=stop)
        summary.timings = timer.rounded()
        return summary
    finally:
        with contextlib.suppress(Exception):  # a dead JVM: the run's own error stands
            spark.sparkContext.setJobGroup("fruitdask-idle", "")
        out.release()


def _profile(spark, cfg, src, out, run_state, cores, profile, timer, progress, stop) -> dict:
    """The profile's stages; a failed Spark job becomes one typed line."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    try:
        with quiet_pandas_warning():
            if profile == "tuned":
                return run_tuned(spark, cfg, src, out, run_state, cores, timer, progress)
            return run_seed(spark, cfg, src, out, run_state, timer, progress)
    except FruitdaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - Py4J's error: its typed cause, or one line
        stop.check()
        recorded = recorded_error(run_state)
        if recorded is not None:
            raise recorded from None
        raise JobError(f"Spark job failed: {_spark_message(exc)}") from None


def _spark_message(exc: BaseException) -> str:
    """The last line of a Py4J error, where the JVM puts the cause."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else one_line(exc)


def _extract_unscanned(cfg: RunConfig, src: Source, run_state: RunState, res, timer) -> None:
    """One more partition, extracted here: the listed files Spark's file scan
    left out. Hadoop file sources skip empty files and never list names
    starting with ``_`` or ``.``; the Dask job gives every listed file an
    ``images/`` row (an empty file is an error row)."""
    counts = res["counts"]
    expected = len(src.listing) if src.listing is not None else src.n_images
    if src.reader != "binaryfile" or counts["images"] >= expected:
        return
    with timer("extract"):
        rows = _unscanned(cfg, src, run_state, res["parts"])
        if not len(rows):
            return
        index = res["parts"]
        data = source.iter_images(cfg.input, rows, cfg.storage_options, cfg.orb.max_pixels)
        images, desc, kp = tables.extract_partition(rows, data, cfg.orb)
        rows, kp, desc = write_extracted(index, [(rows, images, desc, kp)], run_state,
                                         cfg.write_descriptors)  # fmt: skip
        model: PcaModel = res["model"]
        proj = model.transform(desc)
        run_state.write_table(run_state.part("features", index),
                              tables.features_table(rows, kp, proj))  # fmt: skip
        for k, v in tables.status_counts(images).items():
            counts[k] += v
        counts["descriptors"] += len(desc)
        counts["labels"] |= {str(x) for x in images.column("label").to_pylist()}
        res["parts"] += 1


def _unscanned(cfg: RunConfig, src: Source, run_state: RunState, n_parts: int) -> pd.DataFrame:
    done: set[str] = set()
    for i in range(n_parts):
        t = io.read_table(run_state.url_of(run_state.part("images", i)),
                          run_state.storage_options, ["path"])  # fmt: skip
        done.update(t.column("path").to_pylist())
    if src.listing is not None:
        return src.listing[~src.listing["path"].isin(done)].reset_index(drop=True)
    from urllib.parse import unquote

    rels = sorted({relative(unquote(u), str(src.root_uri)) for u in src.files._jdf.inputFiles()})
    rels = [r for r in rels if r not in done]
    ls = [io.label_split(r) for r in rels]
    return pd.DataFrame(
        {
            "path": pd.array(rels, dtype="string"),
            "label": pd.array([x[0] for x in ls], dtype="string"),
            "split": pd.array([x[1] for x in ls], dtype="string"),
            "size": pd.array([0] * len(rels), dtype="int64"),  # the scan skips only empty files
        }
    )


def _summary(cfg: RunConfig, run_state: RunState, res: dict[str, Any]) -> RunSummary:
    counts, n = res["counts"], res["parts"]
    files = {t: [run_state.part(t, i) for i in range(n)] for t in tables.TABLES}
    if not cfg.write_descriptors:
        files.pop("descriptors")
    files["model"] = [f"model/pca-{run_state.run_id}.json"]
    return RunSummary(
        output=cfg.output,
        run_id=run_state.run_id,
        images=counts["images"],
        images_ok=counts["ok"],
        images_no_keypoints=counts["no_keypoints"],
        images_error=counts["error"],
        descriptors=counts["descriptors"],
        partitions=n,
        pca=res["pca"],
        files=files,
    )


def _versions(spark) -> dict[str, str]:
    import pyspark

    try:
        java = str(spark.sparkContext._jvm.System.getProperty("java.version"))
    except Exception:  # noqa: BLE001 - informational only
        java = "unknown"
    versions = library_versions()
    versions.update({"pyspark": pyspark.__version__, "java": java,
                     "python": platform.python_version()})  # fmt: skip
    return versions


def _manifest(cfg, s: RunSummary, counts, spark, profile, src: Source, cores) -> dict[str, Any]:
    from spark_parity.session import ui_url

    # folders the driver's listing could not read (none known when Spark lists)
    unlisted = (src.listing.attrs.get("unlisted") if src.listing is not None else None) or []
    work = sum(v for k, v in s.timings.items() if k != "startup")
    sc = spark.sparkContext
    try:
        executors = int(sc._jsc.sc().getExecutorMemoryStatus().size())
    except Exception:  # noqa: BLE001 - informational only
        executors = None
    return {
        "engine": "spark",
        "input": absolute(cfg.input),
        "config": cfg.public_dict(),
        "storage_options": recordable_options(cfg.storage_options),
        "cluster": {"workers": executors, "threads": cores, "master": sc.master,
                    "profile": profile, "reader": src.reader, "ui": ui_url(spark)},
        "counts": {
            "images": s.images,
            "ok": s.images_ok,
            "no_keypoints": s.images_no_keypoints,
            "error": s.images_error,
            "descriptors": s.descriptors,
            "partitions": s.partitions,
            "partitions_resumed": 0,
            "labels": len(counts["labels"]),
            "folders_not_listed": len(unlisted),
        },
        "not_listed": [{"path": p, "reason": r} for p, r in unlisted[:100]],
        "timings": s.timings,
        "throughput": {
            "images_per_s": round(s.images / work, 1) if work else None,
            "images_per_s_per_core": round(s.images / work / cores, 1) if work else None,
        },
        "pca": s.pca,
        "files": s.files,
        "versions": _versions(spark),
    }  # fmt: skip
