"""``fruitdask report OUT``: (re)write the HTML report of a committed output."""

from __future__ import annotations

import argparse
import time

from fruitdask.cli._common import (
    add_storage_arguments,
    display_url,
    storage_options_from_args,
    term,
)
from fruitdask.errors import FruitdaskError

__all__ = ["register", "write_report_quietly"]


def register(sub: argparse._SubParsersAction) -> None:
    from fruitdask.report import REPORT_FILE, ReportLimits

    p = sub.add_parser(
        "report",
        help="write the HTML report of a finished run, train or evaluate output",
        description="Build OUT/report.html from a committed output (local or S3): stage "
        "timeline, images by status and class, keypoints, the PCA, sample images with their "
        "keypoints, errors, configuration; train and evaluate outputs add their sections. "
        "Self-contained: no network, no JavaScript, images embedded.",
    )
    p.add_argument("output", metavar="OUT", help="a committed run, train or evaluate output")
    p.add_argument(
        "--to", metavar="URL", help=f"write the report here (default: OUT/{REPORT_FILE})"
    )
    p.add_argument(
        "--input-storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for reading the run's input images (default: the output's options)",
    )
    p.add_argument("--sample-classes", type=int, default=ReportLimits.sample_classes,
                   help="classes shown in the image grid and the PCA scatter")  # fmt: skip
    p.add_argument("--images-per-class", type=int, default=ReportLimits.images_per_class,
                   help="example images per class")  # fmt: skip
    add_storage_arguments(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from fruitdask.cli._common import positive
    from fruitdask.report import ReportLimits, write_report

    positive("--sample-classes", args.sample_classes + 1)
    positive("--images-per-class", args.images_per_class + 1)
    so = storage_options_from_args(args)
    input_so = None
    if args.input_storage_option:
        ns = argparse.Namespace(storage_option=args.input_storage_option, endpoint_url=None,
                                anon=False)  # fmt: skip
        input_so = storage_options_from_args(ns)
    limits = ReportLimits(sample_classes=args.sample_classes,
                          images_per_class=args.images_per_class)  # fmt: skip
    t = time.perf_counter()
    url = write_report(args.output, so, input_so, limits, to=args.to)
    term.result(f"report: {display_url(url)} ({time.perf_counter() - t:.1f}s)")
    return 0


def write_report_quietly(output: str, so: dict, input_so: dict | None = None) -> str | None:
    """After a commit: write ``OUT/report.html``; a failure is a note, not the
    command's failure (the result is committed). Returns where, or None."""
    from fruitdask.report import write_report

    t = time.perf_counter()
    try:
        url = write_report(output, so, input_so)
    except FruitdaskError as exc:
        term.say(f"note: no report written ({exc})")
        return None
    term.say(f"report written in {time.perf_counter() - t:.1f}s")
    return url
