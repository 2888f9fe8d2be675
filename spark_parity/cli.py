"""``python -m spark_parity``: argument parsing and printing only; the job is in :mod:`.job`.

Takes ``fruitdask run``'s input, output, storage, ORB and PCA options (the same
argument helpers), plus the Spark ones. Exit codes as ``fruitdask``: 0 success,
2 bad arguments or input, or no usable Spark (one line on stderr), 1 a Spark job
failed, 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from fruitdask.cli import (
    UsageError,
    add_orb_arguments,
    add_storage_arguments,
    build_run_config,
    ensure_default_sample,
)

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
PROG = "spark_parity"


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so the SparkSession is stopped."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The fruitdask job in PySpark (parity and benchmarks).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    r = sub.add_parser(
        "run",
        help="images -> ORB descriptors -> PCA -> Parquet, on Spark",
        description="The job of `fruitdask run` on Spark: same kernels, same output layout "
        "and schemas (manifest engine: spark). Needs pyspark (pip install fruitdask[spark]) "
        "and Java 17+.",
    )
    r.add_argument("--input", "-i", help="folder or URL of images (default: generated sample)")
    r.add_argument(
        "--output", "-o", default="fruitdask-spark-output", help="folder or URL for the result"
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing output")
    r.add_argument(
        "--master", help="Spark master: local[N] (default: one core each), spark://..., yarn"
    )
    r.add_argument(
        "--profile",
        choices=("tuned", "seed"),
        default="tuned",
        help="tuned: Arrow batches, sized partitions (default); seed: the original job's "
        "row UDFs, explode, VectorUDT and default partitioning",
    )
    r.add_argument(
        "--reader",
        choices=("binaryfile", "fsspec"),
        help="binaryfile: Spark's binaryFile source (default for a local folder); fsspec: "
        "fruitdask's listing on the driver, bytes fetched in the executors (default otherwise)",
    )
    r.add_argument(
        "--native-s3",
        action="store_true",
        help="read s3:// with Spark's binaryFile source (EMRFS on EMR) instead of "
        "listing on the driver and fetching through fsspec in the executors",
    )
    r.add_argument("--partition-size", type=int, help="images per task, tuned (default 1000)")
    r.add_argument("--n-components", type=int, help="PCA components, 1-32 (default 20)")
    r.add_argument(
        "--pca-sample",
        type=int,
        help="tuned: fit Spark's PCA on a uniform sample of about N descriptors "
        "(0 = all; default 131072, as fruitdask run); seed fits on all",
    )
    r.add_argument(
        "--no-descriptors", action="store_true", help="do not keep the raw descriptors/ table"
    )
    g = r.add_argument_group("spark")
    g.add_argument("--driver-memory", help="spark.driver.memory, e.g. 2g (local executors too)")
    g.add_argument(
        "--conf", action="append", metavar="KEY=VALUE", help="extra Spark setting (repeatable)"
    )
    g.add_argument(
        "--event-log", metavar="DIR", help="keep Spark's event log for the history server"
    )
    g.add_argument(
        "--java-option", action="append", metavar="OPTION", help="extra driver JVM option"
    )
    g.add_argument(
        "--no-cds",
        action="store_true",
        help="tuned: do not use the class-data-sharing archive (see `spark_parity cds`)",
    )
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(r)
    add_orb_arguments(r)
    # build_run_config reads these `fruitdask run` options: Spark's PCA is exact,
    # has no batches and cannot resume.
    r.set_defaults(func=cmd_run, pca="exact", pca_batch_size=None, resume=False)

    c = sub.add_parser(
        "cds",
        help="build the JVM class-data-sharing archive that halves the tuned start-up",
        description="Run the tuned job once on a few generated images with a JVM that "
        "dumps the classes it loads into an archive (~200 MB, in ~/.cache/fruitdask/"
        "spark-cds/), which later tuned runs map instead of reading Spark's jars. Once per "
        "pyspark and Java version; takes ~30 s.",
    )
    c.set_defaults(func=cmd_cds)
    return parser


def _spark_conf(items: list[str] | None) -> dict[str, str]:
    conf = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--conf expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        conf[k.strip()] = v.strip()
    return conf


class _Progress:
    """A line per stage every few seconds (tasks done), and one when it ends."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int, items: int) -> None:
        elapsed = time.perf_counter() - self.t0
        line = f"{stage}: {done}/{total} tasks"
        if items:
            unit = "images" if stage == "extract" else "descriptors"
            line += f", {items:,} {unit} ({items / max(elapsed, 1e-9):,.0f}/s)"
        self.stream.write(line + "\n")
        self.stream.flush()
        if done == total and items:
            self.t0 = time.perf_counter()


def _print_summary(summary, args, ui: str | None) -> None:
    if args.json:
        out: dict[str, Any] = {
            "engine": "spark",
            "profile": args.profile,
            "output": summary.output,
            "run_id": summary.run_id,
            "images": summary.images,
            "ok": summary.images_ok,
            "no_keypoints": summary.images_no_keypoints,
            "error": summary.images_error,
            "descriptors": summary.descriptors,
            "partitions": summary.partitions,
            "timings": summary.timings,
            "images_per_s": round(summary.images_per_s, 1),
            "pca": summary.pca,
            "spark_ui": ui,
        }
        print(json.dumps(out))
        return
    t = summary.timings
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
    p = summary.pca
    out_url = summary.output if "://" in summary.output else os.path.abspath(summary.output)
    print(
        f"images: {summary.images:,} ({summary.images_ok:,} ok, "
        f"{summary.images_no_keypoints:,} no keypoints, {summary.images_error:,} failed)\n"
        f"descriptors: {summary.descriptors:,} in {summary.partitions} partitions\n"
        f"stages: {stages}\n"
        f"throughput: {summary.images_per_s:,.0f} images/s (start-up excluded)\n"
        f"pca: spark ({args.profile}), {p.get('n_components')} components fitted on "
        f"{p.get('fitted_on_rows', 0):,} descriptors, explained variance "
        f"{p.get('explained_variance_ratio', 0):.4f}; features centred\n"
        f"output: {out_url}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from spark_parity import job, session

    for name in ("partition_size", "n_components"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.input is None:
        args.input = ensure_default_sample(args.quiet)
    cfg = build_run_config(args)
    try:
        session.parse_master(args.master or "local")
        # Validate input and output before starting a JVM: a typo costs no start-up.
        t = time.perf_counter()
        listing = job.preflight(cfg, args.native_s3, args.reader)
        listing_s = time.perf_counter() - t
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not args.quiet:
        if listing is not None:
            labels = listing["label"].nunique()
            print(f"input: {cfg.input} ({len(listing):,} images, {labels} labels)", flush=True)
        else:
            print(f"input: {cfg.input} (listed by Spark)", flush=True)
    tuned = args.profile == "tuned"
    spec = session.SparkSpec(
        master=args.master,
        driver_memory=args.driver_memory,
        conf=_spark_conf(args.conf),
        event_log=args.event_log,
        java_options=tuple(args.java_option or ()),
        # the seed profile runs on the JVM as it comes, as the original job did
        fast_start=tuned,
        cds=tuned and not args.no_cds,
    )
    with session.start(spec) as (spark, startup):
        ui = session.ui_url(spark)
        if ui and not args.quiet:
            print(f"Spark UI: {ui}", flush=True)
        summary = job.run(
            cfg,
            spark,
            profile=args.profile,
            native_s3=args.native_s3,
            reader=args.reader,
            progress=None if args.quiet else _Progress(),
            startup_seconds=startup,
            listing=listing,
            listing_seconds=listing_s if listing is not None else 0.0,
        )
    _print_summary(summary, args, ui)
    return 0


def cmd_cds(args: argparse.Namespace) -> int:
    from spark_parity import session

    t = time.perf_counter()
    existed = session.cds_archive_path().exists()
    path = session.build_cds_archive()
    size = path.stat().st_size / 2**20
    what = "already there" if existed else f"built in {time.perf_counter() - t:.0f}s"
    print(f"{path} ({size:,.0f} MiB, {what})")
    return 0


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fruitdask.io import StorageError
    from fruitdask.pipeline import OutputExistsError
    from spark_parity.job import SparkJobError
    from spark_parity.session import SparkUnavailable

    known = (UsageError, StorageError, OutputExistsError, SparkUnavailable, FileExistsError)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except known as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SparkJobError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no _SUCCESS written", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated; no _SUCCESS written", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
