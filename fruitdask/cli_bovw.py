"""``fruitdask train | evaluate | predict``: argument parsing and printing only.

Registered by :func:`fruitdask.cli.build_parser` through ``register(subparsers)``;
the work is in :mod:`fruitdask.classify` and :mod:`fruitdask.bovw`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Any

from fruitdask.cli import (
    UsageError,
    _display_url,
    _positive,
    _ProgressPrinter,
    add_cluster_arguments,
    add_orb_arguments,
    add_storage_arguments,
    build_run_config,
    cluster_spec,
    ensure_default_sample,
    storage_options_from_args,
)

__all__ = ["register"]

# Kept here (not imported from classify) so that building the parser, which
# every command does, does not import NumPy and the model code.
_CLASSIFIERS = ("logreg-hellinger", "logreg")


def register(subparsers) -> None:
    """Add the ``train``, ``evaluate`` and ``predict`` sub-commands."""
    t = subparsers.add_parser(
        "train",
        help="fit visual words + a classifier on the Training split",
        description="Run (or reuse) the feature pipeline on the Training split of INPUT, fit "
        "K visual words with dask-ml KMeans on the PCA features, build one histogram per "
        "image and train a classifier. Writes OUTPUT/fruitdask-model.zip (the whole model, "
        "one file), OUTPUT/histograms/ and a manifest with per-stage timings.",
    )
    t.add_argument("--input", "-i", help="folder or URL of images (default: generated sample)")
    t.add_argument("--output", "-o", default="fruitdask-model", help="(default ./fruitdask-model)")
    t.add_argument("--words", "-k", type=int, default=200, help="visual words K (default 200)")
    t.add_argument(
        "--classifier",
        choices=_CLASSIFIERS,
        default=_CLASSIFIERS[0],
        help="logreg-hellinger (default): logistic regression on square-rooted histograms; "
        "logreg: on the plain L1 histograms (the original plan)",
    )
    t.add_argument(
        "--C", dest="c", type=float, help="inverse regularisation (default per classifier)"
    )
    t.add_argument(
        "--color", action="store_true", help="add a 52-bin colour histogram of the fruit"
    )
    t.add_argument("--seed", type=int, default=0, help="k-means|| and classifier seed")
    t.add_argument(
        "--kmeans-sample",
        type=int,
        default=0,
        help="fit the vocabulary on a uniform sample of this many keypoints (0 = all)",
    )
    t.add_argument(
        "--kmeans-max-iter",
        type=int,
        default=30,
        help="Lloyd iterations at most (30: accuracy stops improving after ~20)",
    )
    t.add_argument("--partition-size", type=int, help="images per task (default 1000)")
    t.add_argument("--n-components", type=int, help="PCA components, 1-32 (default 20)")
    t.add_argument("--pca", choices=("incremental", "exact"), help="PCA fit (default incremental)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(t)
    add_orb_arguments(t)
    add_cluster_arguments(t)
    # what build_run_config reads and train does not offer
    t.set_defaults(
        func=cmd_train,
        pca_batch_size=None,
        pca_sample=None,
        no_descriptors=True,
        overwrite=False,
        resume=False,
    )

    e = subparsers.add_parser(
        "evaluate",
        help="accuracy, per-class precision/recall and a confusion matrix on the Test split",
        description="Classify every image of the Test split of INPUT (every labelled image "
        "when INPUT has no Training/Test folders) and write report.md, confusion.png, "
        "confusion.csv, per_class.csv, predictions.parquet and manifest.json to OUTPUT.",
    )
    e.add_argument("--model", "-m", required=True, help="a train output or its .zip model file")
    e.add_argument(
        "--input", "-i", help="folder or URL of labelled images (default: generated sample)"
    )
    e.add_argument(
        "--output", "-o", default="fruitdask-evaluation", help="(default ./fruitdask-evaluation)"
    )
    e.add_argument("--partition-size", type=int, default=1000, help="images per task (1000)")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(e)
    add_cluster_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "predict",
        help="top-k classes for images (local files or URLs), without a cluster",
        description="Classify each IMAGE in this process (no Dask): decode, ORB, PCA, "
        "visual words, classifier. Images without keypoints get the answer 'no keypoints: "
        "cannot classify'. Exit 2 when an image cannot be read or decoded.",
    )
    p.add_argument("--model", "-m", required=True, help="a train output or its .zip model file")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_URL")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (3)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_predict)


def _model_errors():
    from fruitdask.classify import ModelError

    return ModelError


@contextlib.contextmanager
def _translated():
    """ModelError (bad options, data or model file) -> the CLI's one-line exit 2."""
    err = _model_errors()
    try:
        yield
    except err as exc:
        raise UsageError(str(exc)) from None


def _report(args) -> contextlib.AbstractContextManager[Any]:
    if getattr(args, "report", None):
        from distributed import performance_report

        return performance_report(filename=args.report)
    return contextlib.nullcontext()


def _stage_line(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())


# ---------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from fruitdask import io, pipeline
    from fruitdask.cluster import connect, dashboard_link

    _positive("--kmeans-max-iter", args.kmeans_max_iter)
    with _translated():
        from fruitdask.classify import TrainOptions, train

        opts = TrainOptions(
            words=args.words,
            classifier=args.classifier,
            c=args.c,
            color=args.color,
            seed=args.seed,
            kmeans_sample=args.kmeans_sample,
            kmeans_max_iter=args.kmeans_max_iter,
        )
    spec = cluster_spec(args)
    if args.input is None:
        args.input = ensure_default_sample(args.quiet)
    cfg = build_run_config(args)
    with _translated():
        from fruitdask.classify import check_train_output

        check_train_output(cfg.output, cfg.out_storage_options)
    t = time.perf_counter()
    listing = io.list_images(cfg.input, cfg.storage_options)
    listing_s = time.perf_counter() - t
    if not args.quiet:
        print(f"input: {cfg.input} ({len(listing):,} images, {listing['label'].nunique()} labels)")
    pipeline.preload("incremental", wait=False)  # dask-ml/sklearn import during start-up
    say = None if args.quiet else (lambda msg: print(msg, flush=True))
    with connect(spec) as (client, startup):
        link = dashboard_link(client)
        if link and not args.quiet:
            print(f"Dask dashboard: {link}", flush=True)
        with _report(args), _translated():
            s = train(
                cfg,
                client,
                opts,
                listing=listing,
                progress=None if args.quiet else _ProgressPrinter(),
                log=say,
                startup_seconds=startup,
                listing_seconds=listing_s,
            )
    if args.json:
        print(
            json.dumps(
                {
                    "output": s.output,
                    "model": s.model_url,
                    "run_id": s.run_id,
                    "features_reused": s.features_reused,
                    "images": s.images,
                    "images_used": s.images_used,
                    "no_keypoints": s.images_no_keypoints,
                    "keypoints": s.keypoints,
                    "classes": s.classes,
                    "train_accuracy": s.train_accuracy,
                    "vocabulary": s.vocabulary,
                    "classifier": s.classifier,
                    "timings": s.timings,
                }
            )
        )
        return 0
    print(
        f"trained on {s.images_used:,} of {s.images:,} Training images "
        f"({s.images_no_keypoints:,} without keypoints), {s.classes} classes, "
        f"{s.keypoints:,} keypoints\n"
        f"features: {'reused' if s.features_reused else 'computed'}\n"
        f"stages: {_stage_line(s.timings)}\n"
        f"model: {_display_url(s.model_url)}"
    )
    return 0


# ---------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from fruitdask import io
    from fruitdask.cluster import connect, dashboard_link

    _positive("--partition-size", args.partition_size)
    so = storage_options_from_args(args)
    spec = cluster_spec(args)
    with _translated():
        from fruitdask.classify import check_evaluation_output, evaluate, load_model

        model = load_model(args.model, so)
        check_evaluation_output(args.output, so)
    if args.input is None:
        args.input = ensure_default_sample(args.quiet)
    t = time.perf_counter()
    listing = io.list_images(args.input, so)
    listing_s = time.perf_counter() - t
    with connect(spec) as (client, startup), _report(args), _translated():
        link = dashboard_link(client)
        if link and not args.quiet:
            print(f"Dask dashboard: {link}", flush=True)
        s = evaluate(
            model,
            args.input,
            args.output,
            client,
            so,
            listing=listing,
            partition_size=args.partition_size,
            progress=None if args.quiet else _ProgressPrinter(),
            startup_seconds=startup,
            listing_seconds=listing_s,
        )
    m = s.metrics
    if args.json:
        print(
            json.dumps(
                {
                    "output": s.output,
                    "images": s.images,
                    "classified": m["classified"],
                    "accuracy": s.accuracy,
                    "top3_accuracy": m["top3_accuracy"],
                    "baseline_accuracy": s.baseline_accuracy,
                    "baseline_label": s.baseline_label,
                    "macro_precision": m["macro_precision"],
                    "macro_recall": m["macro_recall"],
                    "timings": s.timings,
                    "files": s.files,
                }
            )
        )
        return 0
    print(
        f"accuracy: {s.accuracy:.3f} on {s.images:,} images "
        f"(majority-class baseline {s.baseline_accuracy:.3f}; top-3 {m['top3_accuracy']:.3f}; "
        f"{s.images - m['classified']} without keypoints)\n"
        f"macro precision {m['macro_precision']:.3f}, macro recall {m['macro_recall']:.3f}\n"
        f"stages: {_stage_line(s.timings)}\n"
        f"report: {_display_url(io.join(s.output, 'report.md'))}"
    )
    return 0


# ---------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    _positive("--top-k", args.top_k)
    so = storage_options_from_args(args)
    with _translated():
        from fruitdask.classify import load_model, predict_sources

        t = time.perf_counter()
        model = load_model(args.model, so)
        load_ms = (time.perf_counter() - t) * 1e3
    results = predict_sources(model, args.images, so, args.top_k)
    failed: list[str] = []
    latencies = []
    docs = []
    for src, r in zip(args.images, results, strict=True):
        if isinstance(r, Exception):
            failed.append(str(r))
            docs.append({"image": src, "status": "error", "top": [], "message": str(r)})
            if not args.json:
                print(f"{src}: error: {r}")
            continue
        latencies.append(r.latency_ms)
        if r.status == "error":
            failed.append(f"{src}: {r.message}")
        docs.append(r.to_dict())
        if args.json:
            continue
        if r.status == "ok":
            top = ", ".join(f"{lab} {p:.3f}" for lab, p in r.top)
            print(f"{src}: {top} ({r.n_keypoints} keypoints, {r.latency_ms:.2f} ms)")
        elif r.status == "no_keypoints":
            print(f"{src}: {r.message} ({r.latency_ms:.2f} ms)")
        else:
            print(f"{src}: error: {r.message}")
    median = statistics.median(latencies) if latencies else None
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "model_load_ms": round(load_ms, 3),
                    "median_latency_ms": round(median, 3) if median is not None else None,
                    "predictions": docs,
                }
            )
        )
    elif median is not None:
        print(
            f"latency: median {median:.2f} ms per image over {len(latencies)} "
            f"(model loaded in {load_ms:.0f} ms)",
            file=sys.stderr,
        )
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise UsageError(f"{failed[0]}{more}")
    return 0
