"""``fruitdask run``, ``pack``, ``sample`` and ``config``: parsing and printing only."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Any

from fruitdask.cli._common import (
    ProgressPrinter,
    Supervisor,
    add_cluster_arguments,
    add_orb_arguments,
    add_run_settings,
    add_storage_arguments,
    build_run_config,
    cluster_spec,
    contacting,
    display_url,
    ensure_default_sample,
    open_cluster,
    positive,
    show_dashboard,
    storage_options_from_args,
    term,
)
from fruitdask.cli.report import write_report_quietly
from fruitdask.errors import InputError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, ``pack``, ``sample`` and ``config``."""
    r = sub.add_parser(
        "run",
        help="images -> ORB descriptors -> PCA -> Parquet",
        description="Extract ORB descriptors from every image under INPUT, fit PCA, write "
        "Parquet to OUTPUT. With no INPUT, a generated sample data set is used.",
    )
    r.add_argument("--input", "-i", help="folder or URL of images (default: generated sample)")
    r.add_argument(
        "--output", "-o", help="folder or URL for the result (default: ./fruitdask-output)"
    )
    mode = r.add_mutually_exclusive_group()
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (the old result stays readable until the new one "
        "is committed)",
    )
    mode.add_argument("--resume", action="store_true", help="finish an interrupted run")
    add_run_settings(r)
    r.add_argument(
        "--no-descriptors", action="store_true", help="do not keep the raw descriptors/ table"
    )
    r.add_argument("--no-report", action="store_true", help="do not write OUT/report.html")
    r.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(r)
    add_orb_arguments(r)
    add_cluster_arguments(r)
    r.set_defaults(func=cmd_run, resume_hint="use --resume to finish")

    pk = sub.add_parser(
        "pack",
        help="pack a tree of small images into Parquet shards of image bytes",
        description="Pack the images under SRC into a few Parquet shards under DST (local or "
        "S3, S3 to S3 included). `run --input DST` reads the shards like the tree. An "
        "interrupted pack resumes when run again.",
    )
    pk.add_argument("src", help="folder or URL of images")
    pk.add_argument("dst", help="folder or URL for the shards")
    pk.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    pk.add_argument("--row-group-size", type=int, default=250, help="images per row group")
    pk.add_argument("--overwrite", action="store_true", help="replace a pack at DST")
    pk.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    pk.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(pk)
    add_cluster_arguments(pk)
    pk.set_defaults(func=cmd_pack, resume_hint="run it again to resume")

    s = sub.add_parser(
        "sample",
        help="generate a Fruits-360-like sample data set",
        description="Generate 100x100 JPEGs of generated fruit in Fruits-360's layout "
        "(OUT_DIR/Training/<class>/, OUT_DIR/Test/<class>/).",
    )
    s.add_argument("out_dir", help="folder to create")
    s.add_argument("--classes", type=int, default=None, help="classes, 1-131 (default: 131)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--per-class", type=int, default=None, help="Training images per class (40)")
    g.add_argument("--total", type=int, default=None, help="total images, split like Fruits-360")
    s.add_argument("--seed", type=int, default=None, help="random seed (0)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: the cores)")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser(
        "config",
        help="print every setting with its effective value, as YAML",
        description="The settings fruitdask reads through dask.config, with the values in "
        "force (packaged defaults, then ~/.config/dask/*.yaml, then DASK_FRUITDASK__* "
        "variables). Copy lines into ~/.config/dask/fruitdask.yaml to change a default.",
    )
    c.set_defaults(func=cmd_config)


# ---------------------------------------------------------------- run
def _summary_json(summary) -> dict[str, Any]:
    return {
        "output": summary.output,
        "run_id": summary.run_id,
        "images": summary.images,
        "ok": summary.images_ok,
        "no_keypoints": summary.images_no_keypoints,
        "error": summary.images_error,
        "descriptors": summary.descriptors,
        "partitions": summary.partitions,
        "partitions_resumed": summary.partitions_resumed,
        "timings": summary.timings,
        "images_per_s": round(summary.images_per_s, 1),
        "pca": summary.pca,
        "report": summary.report,
    }


def _summary_text(summary) -> str:
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in summary.timings.items())
    p = summary.pca
    resumed = f" ({summary.partitions_resumed} resumed)" if summary.partitions_resumed else ""
    return (
        f"images: {summary.images:,} ({summary.images_ok:,} ok, "
        f"{summary.images_no_keypoints:,} no keypoints, {summary.images_error:,} failed)\n"
        f"descriptors: {summary.descriptors:,} in {summary.partitions} partitions{resumed}\n"
        f"stages: {stages}\n"
        f"throughput: {summary.images_per_s:,.0f} images/s (start-up excluded)\n"
        f"pca: {p.get('method')}, {p.get('n_components')} components fitted on "
        f"{p.get('fitted_on_rows', 0):,} descriptors, explained variance "
        f"{p.get('explained_variance_ratio', 0):.4f} of all descriptors "
        f"(exact {p.get('exact_explained_variance_ratio', 0):.4f}, "
        f"max angle to exact {p.get('max_principal_angle_to_exact_deg', 0):.2f} deg)\n"
        f"output: {display_url(summary.output)}"
        + (f"\nreport: {display_url(summary.report)}" if summary.report else "")
    )


def check_report_path(path: str | None) -> None:
    """An unwritable ``--report`` is refused before anything starts."""
    if not path:
        return
    from fruitdask.io import check_writable

    try:
        check_writable(os.path.dirname(os.path.abspath(path)))
    except InputError as exc:
        raise InputError(f"--report {path}: {exc}") from None


@contextlib.contextmanager
def performance_report(path: str | None):
    """Dask's performance report of what runs inside, with bokeh inlined (offline)."""
    if not path:
        yield
        return
    from distributed import performance_report as report

    with report(filename=path, mode="inline"):
        yield


def cmd_run(args: argparse.Namespace) -> int:
    from fruitdask import pipeline

    spec = cluster_spec(args)
    if spec.kind == "ec2" and spec.extra.get("ec2_dry_run"):
        from fruitdask.aws.ec2 import describe_plan  # fruitdask[aws]

        term.result(describe_plan(spec))  # what would be created; no AWS call
        return 0
    if args.input is None:
        args.input = ensure_default_sample(args.quiet)
    cfg = build_run_config(args)
    check_report_path(args.report)
    if spec.kind == "ec2":
        from fruitdask.aws.ec2 import preflight

        spec = preflight(spec, term.say)  # credentials, image: before the output is locked

    progress = None if args.quiet else ProgressPrinter()
    timer = pipeline.Timer(progress.stage if progress else None, startup=0.0)

    def body(stop):
        with timer("listing"), contacting(cfg.input, cfg.storage_options):
            listing, out = pipeline.preflight(cfg, stop)
        try:
            if not args.quiet:
                labels = listing["label"].nunique()
                term.say(f"input: {cfg.input} ({len(listing):,} images, {labels} labels)")
            pipeline.preload(cfg.pca_method, wait=False)  # overlaps the cluster start
            with open_cluster(spec, stop, progress) as (client, startup):
                timer.record("startup", startup)
                show_dashboard(client, spec, args.quiet)
                with performance_report(args.report):
                    summary = pipeline.run(cfg, client, progress, stop, listing, out, timer)
        finally:
            out.release()
        if not summary.already_complete and not args.no_report:
            summary.report = write_report_quietly(
                cfg.output, cfg.out_storage_options, cfg.storage_options
            )
        return summary

    summary = Supervisor().run(body)
    if summary.already_complete:
        term.say(f"{cfg.output}: already complete, nothing to resume")
        if args.json:
            term.result(json.dumps({"output": cfg.output, "already_complete": True}))
        return 0
    text = _summary_text(summary)
    if args.report:
        text += f"\nperformance report: {display_url(args.report)}"
    term.result(json.dumps(_summary_json(summary)) if args.json else text)
    return 0


# ---------------------------------------------------------------- pack
def cmd_pack(args: argparse.Namespace) -> int:
    from fruitdask import pack

    positive("--shard-size", args.shard_size)
    positive("--row-group-size", args.row_group_size)
    so = storage_options_from_args(args)
    spec = cluster_spec(args)
    if spec.kind == "ec2":
        from fruitdask.aws.ec2 import preflight

        spec = preflight(spec, term.say)  # credentials, image: before the output is locked

    def body(stop):
        job = pack.preflight(args.src, args.dst, so, None, args.shard_size, args.row_group_size,
                             args.overwrite, stop)  # fmt: skip
        try:
            if job.already_complete:
                return job.summary
            progress = None if args.quiet else ProgressPrinter()
            with open_cluster(spec, stop, progress) as (client, _):
                show_dashboard(client, spec, args.quiet)
                return pack.run_pack(job, client, args.shard_size, args.row_group_size,
                                     progress, stop)  # fmt: skip
        finally:
            job.out.release()

    s = Supervisor().run(body)
    if args.json:
        term.result(json.dumps(s.to_dict()))
        return 0
    if s.already_complete:
        term.result(f"{args.dst}: already a pack of {args.src}, nothing to do")
        return 0
    term.result(
        f"packed {s.images:,} images into {s.shards} shards ({s.bytes / 1e6:,.1f} MB"
        + (f", {s.shards_resumed} resumed" if s.shards_resumed else "")
        + (f", {s.unreadable} unreadable" if s.unreadable else "")
        + f") in {s.seconds:.1f}s: {display_url(args.dst)}"
    )
    return 0


# ---------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:
    from fruitdask import sample
    from fruitdask.config import SampleSpec

    positive("--classes", args.classes)
    positive("--per-class", args.per_class)
    positive("--total", args.total)
    classes = args.classes if args.classes is not None else len(sample.CLASS_NAMES)
    spec = SampleSpec.from_config(classes=classes, per_class=args.per_class, seed=args.seed)
    try:
        if args.total is not None:
            s = sample.generate_total(
                args.out_dir, args.total, classes=spec.classes, seed=spec.seed,
                workers=args.workers,
            )  # fmt: skip
        else:
            s = sample.generate(args.out_dir, classes=spec.classes, per_class=spec.per_class,
                                seed=spec.seed, workers=args.workers)  # fmt: skip
    except ValueError as exc:
        raise InputError(str(exc)) from None
    term.result(
        f"{s.root}: {s.training + s.test:,} images ({s.training:,} Training, {s.test:,} Test) "
        f"in {s.classes} classes, {s.seconds:.1f}s"
    )
    return 0


# ---------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    import dask.config
    import yaml

    def dashed(d):  # DASK_FRUITDASK__PARTITION_SIZE arrives as partition_size
        return {str(k).replace("_", "-"): dashed(v) if isinstance(v, dict) else v
                for k, v in d.items()}  # fmt: skip

    term.result(yaml.safe_dump({"fruitdask": dashed(dask.config.get("fruitdask"))},
                               sort_keys=False))  # fmt: skip
    return 0
