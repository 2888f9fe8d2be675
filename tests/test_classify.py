"""train -> evaluate -> predict through the command line, in subprocesses (the
conftest ``Cli``), on a generated set; the committed files of each output."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fruitdask import classify, sample
from fruitdask.model import FORMAT

# Seed 5 of the generator: the words, classifier and C defaults were chosen on
# seed 11 (benchmarks/bovw_accuracy.py reports on another seed again).
SEED = 5
CLASSES = 8
PER_CLASS = 30


def summary(r) -> dict:
    """The ``--json`` document of a run that succeeded (and printed no traceback)."""
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def work(module_cli) -> Path:
    return module_cli.home


@pytest.fixture(scope="module")
def data(work) -> Path:
    root = work / "fruits"
    sample.generate(root, classes=CLASSES, per_class=PER_CLASS, seed=SEED)
    # one training image without keypoints: an all-zero histogram, left out of the fit
    first = sorted((root / "Training").iterdir())[0]
    cv2.imwrite(str(first / "blank.png"), np.full((100, 100, 3), 255, np.uint8))
    return root


@pytest.fixture(scope="module")
def trained(module_cli, data) -> tuple[Path, dict]:
    out = module_cli.home / "model"
    r = module_cli.run(
        "train", "-i", str(data), "-o", str(out), "--words", "100", "--workers", "2", "--json", "-q"
    )
    return out, summary(r)


@pytest.fixture(scope="module")
def evaluated(module_cli, data, trained) -> tuple[Path, dict]:
    out = module_cli.home / "evaluation"
    r = module_cli.run(
        "evaluate", "-m", str(trained[0]), "-i", str(data), "-o", str(out),
        "--workers", "2", "--json", "-q",
    )  # fmt: skip
    return out, summary(r)


# ---------------------------------------------------------------- train
def test_train_writes_one_model_file_and_a_manifest(trained):
    out, s = trained
    train_images = CLASSES * PER_CLASS + 1
    assert s["images"] == train_images and s["classes"] == CLASSES
    assert s["images_used"] == train_images - 1 and s["no_keypoints"] == 1
    assert not s["features_reused"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "_SUCCESS").read_text().strip() == manifest["run_id"] == s["run_id"]
    # the model under its run's name (listed), and the copy in force
    assert manifest["files"]["model"] == [f"models/fruitdask-model-{s['run_id']}.zip"]
    model_bytes = (out / classify.MODEL_FILE).read_bytes()
    assert (out / manifest["files"]["model"][0]).read_bytes() == model_bytes
    with zipfile.ZipFile(out / classify.MODEL_FILE) as z:
        assert sorted(z.namelist()) == ["arrays.npz", "model.json", "pca.json"]
        doc = json.loads(z.read("model.json"))
    assert doc["format"] == FORMAT
    assert doc["vocabulary"]["k"] == 100 and len(doc["classifier"]["classes"]) == CLASSES
    assert doc["meta"]["versions"]["scikit-learn"] and doc["meta"]["run_id"] == s["run_id"]

    for stage in ("startup", "features", "vocabulary", "histograms", "classifier", "publish"):
        assert manifest["timings"][stage] >= 0
    assert manifest["features"]["timings"]["extract"] > 0  # the pipeline's own stages
    hist = ds.dataset([str(out / f) for f in manifest["files"]["histograms"]]).to_table()
    assert hist.num_rows == train_images
    h = np.stack(hist.column("histogram").to_numpy(zero_copy_only=False))
    assert h.shape == (train_images, 100)
    np.testing.assert_allclose(h.sum(1), hist.column("has_keypoints").to_numpy(), rtol=1e-5)
    assert set(hist.column("split").to_pylist()) == {"Training"}  # Test never touched
    df = hist.to_pandas()
    assert df.loc[~df["has_keypoints"], "path"].tolist() == [
        f"Training/{sample.CLASS_NAMES[0]}/blank.png"
    ]


def test_train_refuses_a_foreign_output_before_starting(cli, data):
    out = cli.home / "not-ours"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli.run("train", "-i", str(data), "-o", str(out), timeout=120)
    cli.one_line(r, "error:", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_retrain_reuses_the_features(module_cli, data, trained):
    out = module_cli.home / "retrained"
    shutil.copytree(trained[0], out)
    old_hist = sorted((out / "histograms").iterdir())
    old_model = json.loads((out / "manifest.json").read_text())["files"]["model"][0]
    r = module_cli.run(
        "train", "-i", str(data), "-o", str(out), "--words", "40", "--color",
        "--classifier", "logreg", "--kmeans-max-iter", "10", "--workers", "2", "--json", "-q",
    )  # fmt: skip
    s = summary(r)
    assert s["features_reused"] and s["vocabulary"]["k"] == 40
    assert s["classifier"]["kind"] == "logreg" and s["classifier"]["color"]
    new_hist = sorted((out / "histograms").iterdir())
    assert new_hist and not set(old_hist) & set(new_hist)  # the old run's parts are gone
    assert not (out / old_model).exists() and len(list((out / "models").iterdir())) == 1
    model = classify.load_model(str(out))
    assert model.encoder.color and model.encoder.k == 40
    img = next((data / "Test").rglob("*.jpg"))
    p = model.predict_bytes(img.read_bytes(), top_k=2)
    assert p.status == "ok" and len(p.top) == 2


def test_train_runs_print_no_traceback(cli, sample_dir):
    """1 run in 8 printed distributed's ``assert ts.who_wants`` (stimulus_cancel: a
    cancel of the parts reaching a dependent no client wanted) and exited 0."""
    logs = cli.home / "cache" / "fruitdask" / "logs"
    for i in range(5):
        r = cli.run(
            "train", "-i", str(sample_dir), "-o", str(cli.home / f"model-{i}"), "--words", "20",
            "--workers", "2", "--json",
        )  # fmt: skip
        s = summary(r)
        assert s["vocabulary"]["fitted_on"] == "client" and s["vocabulary"]["n_iter"] >= 1
        assert "vocabulary: 20 words" in r.stderr
        # ... nor in the log (where the scheduler's handler failure went); the
        # cluster's teardown logs closed comms there, harmlessly
        for log in logs.iterdir():
            text = log.read_text(errors="replace")
            for bad in ("AssertionError", "Exception while handling op", "stimulus_cancel"):
                assert bad not in text, (log, text[-3000:])


# ---------------------------------------------------------------- evaluate
def test_evaluate_beats_the_majority_baseline(evaluated):
    out, s = evaluated
    assert s["images"] == CLASSES * round(PER_CLASS / 3)
    assert s["baseline_accuracy"] == pytest.approx(1 / CLASSES)
    # 8 classes: chance is 0.125; ORB + BoVW gets ~0.8-0.9 on this generator
    assert s["accuracy"] >= s["baseline_accuracy"] + 0.45, s
    assert s["top3_accuracy"] >= s["accuracy"]
    report = (out / "report.md").read_text()
    assert "majority-class baseline" in report and f"{s['accuracy']:.3f}" in report
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"encode", "classify", "write"} <= set(manifest["timings"])
    assert len(manifest["per_class"]) == CLASSES
    assert pq.read_table(out / "predictions.parquet").num_rows == s["images"]
    # every stable file is the copy of the run's own, which the manifest lists
    listed = manifest["files"]["evaluation"]
    for name in ("report.md", "predictions.parquet", "confusion.png", "confusion.csv",
                 "per_class.csv"):  # fmt: skip
        stem, ext = name.rsplit(".", 1)
        own = f"{stem}-{s['run_id']}.{ext}"
        assert own in listed and (out / own).read_bytes() == (out / name).read_bytes()


# ---------------------------------------------------------------- predict
def _predict_json(cli, model: Path, images: list[str]) -> dict:
    return summary(cli.run("predict", "-m", str(model), *images, "--top-k", "3", "--json"))


def test_saved_model_predicts_the_same_in_fresh_processes(module_cli, data, trained, evaluated):
    images = sorted(str(p) for p in (data / "Test").rglob("*.jpg"))[::9]
    a = _predict_json(module_cli, trained[0], images)
    b = _predict_json(module_cli, trained[0] / classify.MODEL_FILE, images)
    strip = [{k: v for k, v in p.items() if k != "latency_ms"} for p in a["predictions"]]
    assert strip == [{k: v for k, v in p.items() if k != "latency_ms"} for p in b["predictions"]]
    assert all(p["status"] == "ok" and len(p["top"]) == 3 for p in a["predictions"])
    # the latency path: every image timed, the model load apart
    assert a["median_latency_ms"] > 0 and a["model_load_ms"] > 0
    assert all(p["latency_ms"] > 0 for p in a["predictions"])

    # ... and the same as evaluate's answers, computed on the Dask workers
    preds = pq.read_table(evaluated[0] / "predictions.parquet").to_pandas().set_index("path")
    for img, p in zip(images, a["predictions"], strict=True):
        row = preds.loc[Path(img).relative_to(data).as_posix()]
        assert row["predicted"] == p["top"][0]["label"]
        assert row["probability"] == pytest.approx(p["top"][0]["probability"], abs=1e-6)


def test_predict_blank_image_answers_no_keypoints(cli, trained):
    blank = cli.home / "white.png"
    cv2.imwrite(str(blank), np.full((100, 100, 3), 255, np.uint8))
    r = cli.run("predict", "-m", str(trained[0]), str(blank))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{blank}: no keypoints: cannot classify")
    assert "Traceback" not in r.stderr


def test_bad_model_or_image_is_one_line_exit_2(cli, trained, data):
    img = str(next((data / "Test").rglob("*.jpg")))
    cli.one_line(cli.run("predict", "-m", str(cli.home / "missing"), img), "missing", "not found")
    junk = cli.home / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    cli.one_line(cli.run("predict", "-m", str(junk), img), "error:", "not a fruitdask model")
    r = cli.run("predict", "-m", str(trained[0]), str(cli.home / "nope.jpg"))
    cli.one_line(r, "error:", "nope.jpg")


# ---------------------------------------------------------------- S3
@pytest.mark.s3
def test_train_and_predict_on_s3(s3, cli, sample_dir):
    """Input, train output and model all on S3; predict reads the model and an image by URL."""
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/in")
    opts = ["--endpoint-url", s3.endpoint_url]
    opts += ["--storage-option", f"key={s3.storage_options['key']}"]
    opts += ["--storage-option", f"secret={s3.storage_options['secret']}"]
    r = cli.run(
        "train", "-i", f"{bucket}/in", "-o", f"{bucket}/model", "--words", "20",
        "--kmeans-max-iter", "10", "--workers", "2", "--json", "-q", *opts,
    )  # fmt: skip
    assert summary(r)["images"] == 6 * 12
    fs = s3.fs()
    local_model = cli.home / "from-s3.zip"
    local_model.write_bytes(fs.cat(f"{bucket[5:]}/model/{classify.MODEL_FILE}"))
    assert fs.exists(f"{bucket[5:]}/model/_SUCCESS")

    img = sorted((sample_dir / "Test").rglob("*.jpg"))[0]
    url = f"{bucket}/in/{img.relative_to(sample_dir).as_posix()}"
    got = summary(cli.run("predict", "-m", f"{bucket}/model", url, "--json", *opts))
    local = _predict_json(cli, local_model, [str(img)])
    assert got["predictions"][0]["top"] == local["predictions"][0]["top"]
