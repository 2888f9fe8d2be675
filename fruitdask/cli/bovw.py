"""``fruitdask train | evaluate | predict``: parsing and printing only.

The work is in :mod:`fruitdask.classify`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
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
    show_dashboard,
    storage_options_from_args,
    term,
)
from fruitdask.cli.report import write_report_quietly
from fruitdask.errors import InputError

__all__ = ["register"]

# Kept here (not imported from fruitdask.model) so that building the parser,
# which every command does, does not import NumPy and the model code.
_CLASSIFIERS = ("logreg-hellinger", "logreg")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``evaluate`` and ``predict`` sub-commands."""
    _register_train(sub)
    _register_evaluate(sub)
    _register_predict(sub)


def _register_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="fit visual words + a classifier on the Training split",
        description="Run (or reuse) the feature pipeline on the Training split of INPUT, fit "
        "K visual words with dask-ml KMeans on the PCA features, build one histogram per "
        "image and train a classifier. Commits OUTPUT/fruitdask-model.zip (the whole model, "
        "one file), OUTPUT/histograms/ and a manifest with per-stage timings; a previous "
        "train output there is replaced.",
    )
    t.add_argument("--input", "-i", help="folder or URL of images (default: generated sample)")
    t.add_argument("--output", "-o", default="fruitdask-model", help="folder or URL")
    t.add_argument("--words", "-k", type=int, default=200, help="visual words K")
    t.add_argument(
        "--classifier",
        choices=_CLASSIFIERS,
        default=_CLASSIFIERS[0],
        help="logreg-hellinger: logistic regression on square-rooted histograms; "
        "logreg: on the plain L1 histograms (the original plan)",
    )
    t.add_argument("--C", dest="c", type=float, help="inverse regularisation (per classifier)")
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
        help="Lloyd iterations at most (accuracy stops improving after ~20)",
    )
    add_run_settings(t, ("partition_size", "n_components", "pca_method"))
    t.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(t)
    add_orb_arguments(t)
    add_cluster_arguments(t)
    t.set_defaults(func=cmd_train, resume_hint="run it again")


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate",
        help="accuracy, per-class precision/recall and a confusion matrix on the Test split",
        description="Classify every image of the Test split of INPUT (every labelled image "
        "when INPUT has no Training/Test folders) and commit report.md, confusion.png, "
        "confusion.csv, per_class.csv, predictions.parquet and manifest.json to OUTPUT.",
    )
    e.add_argument("--model", "-m", required=True, help="a train output or its .zip model file")
    e.add_argument(
        "--input", "-i", help="folder or URL of labelled images (default: generated sample)"
    )
    e.add_argument("--output", "-o", default="fruitdask-evaluation", help="folder or URL")
    e.add_argument("--partition-size", type=int, default=1000, help="images per task")
    e.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb guard; caps the model's own (default: the local one)")  # fmt: skip
    e.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(e)
    add_cluster_arguments(e)
    e.set_defaults(func=cmd_evaluate, resume_hint="run it again")


def _register_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-k classes for images (local files or URLs), without a cluster",
        description="Classify each IMAGE in this process (no Dask): decode, ORB, PCA, "
        "visual words, classifier. Images without keypoints get the answer 'no keypoints: "
        "cannot classify'. Exit 2 when an image cannot be read or decoded.",
    )
    p.add_argument("--model", "-m", required=True, help="a train output or its .zip model file")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_URL")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb guard; caps the model's own (default: the local one)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON document")
    add_storage_arguments(p)
    p.set_defaults(func=cmd_predict)


def _stage_line(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())


def _max_pixels(args: argparse.Namespace) -> int:
    from fruitdask.config import RunConfig

    return RunConfig.from_config(input="-", max_pixels=args.max_pixels).orb.max_pixels


# ---------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from fruitdask import classify, pipeline

    opts = classify.TrainOptions(
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
    cfg = build_run_config(args, write_descriptors=False)

    progress = None if args.quiet else ProgressPrinter()
    timer = pipeline.Timer(progress.stage if progress else None, startup=0.0)

    def body(stop):
        with timer("listing"), contacting(cfg.input, cfg.storage_options):
            listing = pipeline.list_input(cfg)
            rows = classify.training_rows(listing)
            classify.check_training(cfg.input, rows)
            out = classify.prepare_output(cfg.output, cfg.out_storage_options,
                                          classify.TRAIN_FORMAT,
                                          {"input": (cfg.input, cfg.storage_options)}, stop)  # fmt: skip
        try:
            if not args.quiet:
                term.say(f"input: {cfg.input} ({len(listing):,} images, "
                         f"{rows['label'].nunique()} labels in the training rows)")  # fmt: skip
            pipeline.preload("incremental", wait=False)
            with open_cluster(spec, stop, progress) as (client, startup):
                timer.record("startup", startup)
                show_dashboard(client, spec, args.quiet)
                summary = classify.train(cfg, client, opts, rows, out, progress,
                                         None if args.quiet else term.say, stop, timer)  # fmt: skip
        finally:
            out.release()
        write_report_quietly(cfg.output, cfg.out_storage_options, cfg.storage_options)
        return summary

    s = Supervisor().run(body)
    if args.json:
        term.result(json.dumps({
            "output": s.output, "model": s.model_url, "run_id": s.run_id,
            "features_reused": s.features_reused, "images": s.images,
            "images_used": s.images_used, "no_keypoints": s.images_no_keypoints,
            "keypoints": s.keypoints, "classes": s.classes, "train_accuracy": s.train_accuracy,
            "vocabulary": s.vocabulary, "classifier": s.classifier, "timings": s.timings,
        }))  # fmt: skip
        return 0
    term.result(
        f"trained on {s.images_used:,} of {s.images:,} Training images "
        f"({s.images_no_keypoints:,} without keypoints), {s.classes} classes, "
        f"{s.keypoints:,} keypoints\n"
        f"features: {'reused' if s.features_reused else 'computed'}\n"
        f"stages: {_stage_line(s.timings)}\n"
        f"model: {display_url(s.model_url)}"
    )
    return 0


# ---------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from fruitdask import classify, pipeline
    from fruitdask.config import RunConfig

    RunConfig.from_config(input="-", partition_size=args.partition_size)  # validates it
    so = storage_options_from_args(args)
    spec = cluster_spec(args)
    model = classify.load_model(args.model, so, _max_pixels(args))
    if args.input is None:
        args.input = ensure_default_sample(args.quiet)

    progress = None if args.quiet else ProgressPrinter()
    timer = pipeline.Timer(progress.stage if progress else None, startup=0.0)

    def body(stop):
        with timer("listing"), contacting(args.input, so):
            listing = pipeline.list_input(RunConfig(input=args.input, storage_options=so))
            rows = classify.evaluation_rows(listing)
            classify.check_evaluation(args.input, rows)
            out = classify.prepare_output(args.output, so, classify.EVAL_FORMAT,
                                          {"input": (args.input, so)}, stop)  # fmt: skip
        try:
            with open_cluster(spec, stop, progress) as (client, startup):
                timer.record("startup", startup)
                show_dashboard(client, spec, args.quiet)
                summary = classify.evaluate(model, args.input, args.output, client, so, rows, out,
                                            args.partition_size, progress, stop, timer)  # fmt: skip
        finally:
            out.release()
        write_report_quietly(args.output, so, so)
        return summary

    s = Supervisor().run(body)
    m = s.metrics
    if args.json:
        term.result(json.dumps({
            "output": s.output, "run_id": s.run_id, "images": s.images,
            "classified": m["classified"], "accuracy": s.accuracy,
            "top3_accuracy": m["top3_accuracy"], "baseline_accuracy": s.baseline_accuracy,
            "baseline_label": s.baseline_label, "macro_precision": m["macro_precision"],
            "macro_recall": m["macro_recall"], "timings": s.timings, "files": s.files,
        }))  # fmt: skip
        return 0
    from fruitdask.io import join

    term.result(
        f"accuracy: {s.accuracy:.3f} on {s.images:,} images "
        f"(majority-class baseline {s.baseline_accuracy:.3f}; top-3 {m['top3_accuracy']:.3f}; "
        f"{s.images - m['classified']} without keypoints)\n"
        f"macro precision {m['macro_precision']:.3f}, macro recall {m['macro_recall']:.3f}\n"
        f"stages: {_stage_line(s.timings)}\n"
        f"report: {display_url(join(s.output, 'report.md'))}"
    )
    return 0


# ---------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    from fruitdask import classify

    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    so = storage_options_from_args(args)
    t = time.perf_counter()
    model = classify.load_model(args.model, so, _max_pixels(args))
    load_ms = (time.perf_counter() - t) * 1e3
    results = classify.predict_sources(model, args.images, so, args.top_k)
    failed: list[str] = []
    latencies = []
    docs: list[dict[str, Any]] = []
    for src, r in zip(args.images, results, strict=True):
        if isinstance(r, Exception):
            failed.append(str(r))
            docs.append({"image": src, "status": "error", "top": [], "message": str(r)})
            if not args.json:
                term.result(f"{src}: error: {r}")
            continue
        if r.status == "error":
            failed.append(f"{src}: {r.message}")
        else:  # the time of a refusal is not a prediction's
            latencies.append(r.latency_ms)
        docs.append(r.to_dict())
        if args.json:
            continue
        if r.status == "ok":
            top = ", ".join(f"{lab} {p:.3f}" for lab, p in r.top)
            term.result(f"{src}: {top} ({r.n_keypoints} keypoints, {r.latency_ms:.2f} ms)")
        elif r.status == "no_keypoints":
            term.result(f"{src}: {r.message} ({r.latency_ms:.2f} ms)")
        else:
            term.result(f"{src}: error: {r.message}")
    median = statistics.median(latencies) if latencies else None
    if args.json:
        term.result(json.dumps({
            "model": args.model, "model_load_ms": round(load_ms, 3),
            "median_latency_ms": round(median, 3) if median is not None else None,
            "predictions": docs,
        }))  # fmt: skip
    elif median is not None and not failed:  # a failure is one line on stderr
        term.say(f"latency: median {median:.2f} ms per image over {len(latencies)} "
                 f"(model loaded in {load_ms:.0f} ms)")  # fmt: skip
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise InputError(f"{failed[0]}{more}")
    return 0
