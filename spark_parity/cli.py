"""``python -m spark_parity``: parsing and printing only; the job is in :mod:`.job`.

Takes ``fruitdask run``'s input, output, storage, ORB and PCA options (the same
argument builders), plus the Spark ones. Exit codes as ``fruitdask``'s: 0
success, 2 bad arguments or input, or no usable Spark (one line on stderr), 1
a Spark job failed, 130/143 stopped by SIGINT/SIGTERM before the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from fruitdask.cli import (
    Parser,
    ProgressPrinter,
    Supervisor,
    add_orb_arguments,
    add_run_settings,
    add_storage_arguments,
    build_run_config,
    ensure_default_sample,
    log_file,
    report_failure,
    term,
)
from fruitdask.errors import InputError

__all__ = ["build_parser", "console_main", "main"]

PROG = "spark_parity"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="The fruitdask job in PySpark (parity and benchmarks).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    r = sub.add_parser(
        "run",
        help="images -> ORB descriptors -> PCA -> Parquet, on Spark",
        description="The job of `fruitdask run` on Spark: same kernels, same output layout, "
        "schemas and commit (manifest engine: spark). Needs pyspark "
        "(pip install fruitdask[spark]) and Java 17+.",
    )
    r.add_argument("--input", "-i", help="folder or URL of images (default: generated sample)")
    r.add_argument("--output", "-o", default="fruitdask-spark-output", help="folder or URL")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output")
    r.add_argument("--master", help="local[N] (default: one per core), spark://..., yarn")
    r.add_argument(
        "--profile",
        choices=("tuned", "seed"),
        default="tuned",
        help="tuned: Arrow batches, sized partitions; seed: the original job's row UDFs, "
        "explode, VectorUDT and default partitioning",
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
        help="read s3:// with Spark's binaryFile source (EMRFS on EMR)",
    )
    add_run_settings(r, ("partition_size", "n_components", "pca_sample"))
    r.add_argument(
        "--no-descriptors", action="store_true", help="do not keep the raw descriptors/ table"
    )
    g = r.add_argument_group("spark")
    g.add_argument("--driver-memory", help="spark.driver.memory, e.g. 2g (local executors too)")
    g.add_argument(
        "--conf", action="append", metavar="KEY=VALUE", help="extra Spark setting (repeatable)"
    )
    g.add_argument("--event-log", metavar="DIR", help="keep Spark's event log (history server)")
    g.add_argument("--java-option", action="append", metavar="OPTION", help="extra JVM option")
    g.add_argument(
        "--no-cds",
        action="store_true",
        help="tuned: do not use the class-data-sharing archive (see `spark_parity cds`)",
    )
    r.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(r)
    add_orb_arguments(r)
    # Spark's PCA is exact and has no batches; the job does not resume.
    r.set_defaults(func=cmd_run, pca_method="exact", resume_hint="run it again with --overwrite")

    c = sub.add_parser(
        "cds",
        help="build the JVM class-data-sharing archive that halves the tuned start-up",
        description="Run the tuned job once on a few generated images with a JVM that "
        "dumps the classes it loads into an archive (~200 MB, in ~/.cache/fruitdask/"
        "spark-cds/), which later tuned runs map instead of reading Spark's jars. Once per "
        "pyspark and Java installation (rebuilt when either changes); takes ~30 s.",
    )
    c.set_defaults(func=cmd_cds)
    return parser


def _spark_conf(items: list[str] | None) -> dict[str, str]:
    conf = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--conf expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        conf[k.strip()] = v.strip()
    return conf


def _summary(summary, args, ui: str | None) -> str:
    p = summary.pca
    if args.json:
        out: dict[str, Any] = {
            "engine": "spark", "profile": args.profile, "output": summary.output,
            "run_id": summary.run_id, "images": summary.images, "ok": summary.images_ok,
            "no_keypoints": summary.images_no_keypoints, "error": summary.images_error,
            "descriptors": summary.descriptors, "partitions": summary.partitions,
            "timings": summary.timings, "images_per_s": round(summary.images_per_s, 1),
            "pca": p, "spark_ui": ui,
        }  # fmt: skip
        return json.dumps(out)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary.timings.items())
    out_url = summary.output if "://" in summary.output else os.path.abspath(summary.output)
    return (
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
    from fruitdask.pipeline import Timer
    from spark_parity import job, session

    if args.input is None:
        args.input = ensure_default_sample(args.quiet)
    cfg = build_run_config(args)
    try:
        session.parse_master(args.master or "local")
    except ValueError as exc:
        raise InputError(f"--master: {exc}") from None
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
    ui: list[str | None] = [None]
    progress = None if args.quiet else ProgressPrinter()
    timer = Timer(progress.stage if progress else None, startup=0.0)

    def environment() -> None:  # no usable pyspark or Java: one line, before listing
        session.import_pyspark()
        session.find_java()

    def body(stop):
        with timer("listing"):
            listing, out = job.preflight(cfg, args.native_s3, args.reader, stop, environment)
        try:
            if not args.quiet:
                what = f"{len(listing):,} images" if listing is not None else "listed by Spark"
                term.say(f"input: {cfg.input} ({what})")
            with session.start(spec, stop) as (spark, startup):
                timer.record("startup", startup)
                stop.check()
                ui[0] = session.ui_url(spark)
                if ui[0] and not args.quiet:
                    term.say(f"Spark UI: {ui[0]}")
                return job.run(cfg, spark, out, listing, args.profile, args.native_s3,
                               args.reader, progress, stop, timer)  # fmt: skip
        finally:
            out.release()

    summary = Supervisor().run(body)
    term.result(_summary(summary, args, ui[0]))
    return 0


def cmd_cds(args: argparse.Namespace) -> int:
    from spark_parity import session

    t = time.perf_counter()
    existed = session.cds_archive_path().exists()
    path = session.build_cds_archive()
    size = path.stat().st_size / 2**20
    what = "already there" if existed else f"built in {time.perf_counter() - t:.0f}s"
    term.result(f"{path} ({size:,.0f} MiB, {what})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line
        return report_failure(PROG, exc, getattr(args, "resume_hint", ""))


def console_main() -> NoReturn:
    """``python -m spark_parity``: :func:`main` with the JVM's and the libraries'
    output in a log file (see :func:`fruitdask.cli.console_main`)."""
    term.redirect(log_file())
    code = main()
    logging.shutdown()
    for stream in (term.out, term.err, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
