"""Accuracy of ORB + PCA + bag of visual words at several K, with and without colour.

    python benchmarks/bovw_accuracy.py [--classes 40] [--per-class 50] [--seed 99]
                                       [--words 50,100,200,400] [--workers 2] [--out DIR]

Setup (not timed): a generated Fruits-360-like set with ``--seed`` (99 by
default; the defaults of ``fruitdask train`` -- classifier, C, KMeans
iterations -- were chosen on seed 11, the tests use seed 5), then the feature
pipeline once on its Training split. Each row of the table is then a real
``classify.train`` (reusing those features: vocabulary fit, histograms,
classifier) and ``classify.evaluate`` on the Test split, on one local cluster.
Finally the ``predict`` fast path is timed per image, in a warm process and as
a cold command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMBOS = (
    ("logreg", False),
    ("logreg-hellinger", False),
    ("logreg", True),
    ("logreg-hellinger", True),
)


def _predict_latency(model_dir: Path, images: list[Path]) -> dict[str, float]:
    from fruitdask import classify

    t = time.perf_counter()
    model = classify.load_model(str(model_dir))
    load_ms = (time.perf_counter() - t) * 1e3
    orb = model.encoder.orb.create()
    blobs = [p.read_bytes() for p in images]
    for b in blobs[:20]:  # warm caches and lazy imports
        model.predict_bytes(b, orb=orb)
    lat = sorted(model.predict_bytes(b, orb=orb).latency_ms for b in blobs)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cold = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fruitdask", "predict", "-m", str(model_dir), str(images[0])],
            env=env,
            capture_output=True,
            check=True,
        )
        cold.append(time.perf_counter() - t)
    return {
        "images": len(lat),
        "median_ms": statistics.median(lat),
        "p90_ms": lat[int(0.9 * (len(lat) - 1))],
        "max_ms": lat[-1],
        "model_load_ms": load_ms,
        "cold_command_s": min(cold),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--words", default="50,100,200,400")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--combos", default="all", help="all, or e.g. logreg-hellinger:0,logreg:1")
    ap.add_argument("--out", default=None, help="folder for results (default: a temp folder)")
    args = ap.parse_args()

    from fruitdask import classify, pipeline, sample
    from fruitdask.cluster import connect
    from fruitdask.config import ClusterSpec, RunConfig

    work = Path(args.out or tempfile.mkdtemp(prefix="bovw-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.gettempdir()) / (
        f"fruitdask-bovw-c{args.classes}-n{args.per_class}-s{args.seed}"
    )
    s = sample.generate(data, classes=args.classes, per_class=args.per_class, seed=args.seed)
    print(f"data: {data} ({s.training} Training, {s.test} Test, {s.classes} classes)", flush=True)
    combos = (
        COMBOS
        if args.combos == "all"
        else tuple((c.split(":")[0], c.split(":")[1] == "1") for c in args.combos.split(","))
    )
    words = [int(k) for k in args.words.split(",")]
    model_dir = work / "model"
    listing = pipeline.list_input(RunConfig(input=str(data)))
    rows = []
    with connect(ClusterSpec(workers=args.workers, dashboard_address="127.0.0.1:0")) as (
        client,
        _,
    ):
        cfg = RunConfig.from_config(input=str(data), output=str(model_dir), write_descriptors=False)
        for k in words:
            for kind, color in combos:
                opts = classify.TrainOptions(words=k, classifier=kind, color=color)
                tr = classify.train(cfg, client, opts, classify.training_rows(listing))
                ev_dir = work / f"eval-k{k}-{kind}-{'color' if color else 'orb'}"
                ev = classify.evaluate(
                    classify.load_model(str(model_dir)), str(data), str(ev_dir), client,
                    rows=classify.evaluation_rows(listing),
                )  # fmt: skip
                row = {
                    "words": k,
                    "classifier": kind,
                    "color": color,
                    "accuracy": ev.accuracy,
                    "top3": ev.metrics["top3_accuracy"],
                    "macro_f1": ev.metrics["macro_f1"],
                    "baseline": ev.baseline_accuracy,
                    "train_accuracy": tr.train_accuracy,
                    "features_s": tr.timings["features"],
                    "vocabulary_s": tr.timings["vocabulary"],
                    "kmeans_iter": tr.vocabulary["n_iter"],
                    "classifier_s": tr.timings["classifier"],
                    "evaluate_encode_s": ev.timings["encode"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    test_images = sorted((data / "Test").rglob("*.jpg"))
    latency = _predict_latency(model_dir, test_images)

    lines = [
        f"ORB + PCA(20) + BoVW on a generated set: {args.classes} classes, seed {args.seed}, "
        f"{s.training} Training / {s.test} Test images; "
        f"majority-class baseline {rows[0]['baseline']:.3f}.",
        "",
        "| K | classifier | colour | accuracy | top-3 | macro F1 | train acc. "
        "| KMeans s (iter) | classifier s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['words']} | {r['classifier']} | {'yes' if r['color'] else 'no'} "
            f"| {r['accuracy']:.3f} | {r['top3']:.3f} | {r['macro_f1']:.3f} "
            f"| {r['train_accuracy']:.3f} | {r['vocabulary_s']:.1f} ({r['kmeans_iter']}) "
            f"| {r['classifier_s']:.1f} |"
        )
    lines += [
        "",
        f"predict (last model, K={rows[-1]['words']}, in-process, warm, {latency['images']} "
        f"images): median {latency['median_ms']:.2f} ms, p90 {latency['p90_ms']:.2f} ms, "
        f"max {latency['max_ms']:.2f} ms per image; model load {latency['model_load_ms']:.0f} ms; "
        f"a cold `python -m fruitdask predict` of one image {latency['cold_command_s']:.2f} s.",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    (work / "bovw_accuracy.md").write_text(table + "\n")
    (work / "bovw_accuracy.json").write_text(
        json.dumps({"rows": rows, "predict": latency, "args": vars(args)}, indent=1)
    )
    print(f"\nresults: {work}")


if __name__ == "__main__":
    main()
