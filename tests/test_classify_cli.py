"""train -> evaluate -> predict through the CLI, in subprocesses, on a generated set;
and the classifier, model file and metrics against scikit-learn."""

from __future__ import annotations

import io as _io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fruitdask import classify, sample
from fruitdask.classify import LinearClassifier, Model, ModelError

REPO = Path(__file__).resolve().parents[1]
# Seed 5 of the generator: the words, classifier and C defaults were chosen on
# seed 11 (benchmarks/bovw_accuracy.py reports on another seed again).
SEED = 5
CLASSES = 8
PER_CLASS = 30


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DASK_FRUITDASK__CLUSTER__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    return env


def fruitdask(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fruitdask", *args],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fruitdask: error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("classify")


@pytest.fixture(scope="module")
def data(work) -> Path:
    root = work / "fruits"
    sample.generate(root, classes=CLASSES, per_class=PER_CLASS, seed=SEED)
    # one training image without keypoints: an all-zero histogram, left out of the fit
    first = sorted((root / "Training").iterdir())[0]
    cv2.imwrite(str(first / "blank.png"), np.full((100, 100, 3), 255, np.uint8))
    return root


@pytest.fixture(scope="module")
def trained(work, data) -> tuple[Path, dict]:
    out = work / "model"
    r = fruitdask(
        "train", "-i", str(data), "-o", str(out), "--words", "100", "--workers", "2",
        "--json", "-q", cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def evaluated(work, data, trained) -> tuple[Path, dict]:
    out = work / "evaluation"
    r = fruitdask(
        "evaluate", "-m", str(trained[0]), "-i", str(data), "-o", str(out),
        "--workers", "2", "--json", "-q", cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- end to end
def test_train_writes_one_model_file_and_a_manifest(trained):
    out, summary = trained
    train_images = CLASSES * PER_CLASS + 1
    assert summary["images"] == train_images and summary["classes"] == CLASSES
    assert summary["images_used"] == train_images - 1 and summary["no_keypoints"] == 1
    assert not summary["features_reused"]
    with zipfile.ZipFile(out / classify.MODEL_FILE) as z:
        assert sorted(z.namelist()) == ["arrays.npz", "model.json", "pca.json"]
        doc = json.loads(z.read("model.json"))
    assert doc["format"] == "fruitdask-model/1"
    assert doc["vocabulary"]["k"] == 100 and len(doc["classifier"]["classes"]) == CLASSES
    assert doc["meta"]["versions"]["scikit-learn"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "_SUCCESS").read_text().strip() == manifest["run_id"]
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


def test_evaluate_beats_the_majority_baseline(evaluated):
    out, s = evaluated
    assert s["images"] == CLASSES * round(PER_CLASS / 3)
    assert s["baseline_accuracy"] == pytest.approx(1 / CLASSES)
    # 8 classes: chance is 0.125; ORB + BoVW gets ~0.8-0.9 on this generator
    assert s["accuracy"] >= s["baseline_accuracy"] + 0.45, s
    report = (out / "report.md").read_text()
    assert "majority-class baseline" in report and f"{s['accuracy']:.3f}" in report
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"encode", "classify", "write"} <= set(manifest["timings"])
    assert len(manifest["per_class"]) == CLASSES
    assert pq.read_table(out / "predictions.parquet").num_rows == s["images"]


def _predict_json(model: Path, images: list[str], cwd: Path) -> dict:
    r = fruitdask("predict", "-m", str(model), *images, "--top-k", "3", "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_saved_model_predicts_the_same_in_fresh_processes(work, data, trained, evaluated):
    images = sorted(str(p) for p in (data / "Test").rglob("*.jpg"))[::9]
    a = _predict_json(trained[0], images, work)
    b = _predict_json(trained[0] / classify.MODEL_FILE, images, work)
    strip = [{k: v for k, v in p.items() if k != "latency_ms"} for p in a["predictions"]]
    assert strip == [{k: v for k, v in p.items() if k != "latency_ms"} for p in b["predictions"]]
    assert all(p["status"] == "ok" and len(p["top"]) == 3 for p in a["predictions"])
    assert a["median_latency_ms"] > 0

    # ... and the same as evaluate's answers, computed on the Dask workers
    preds = pq.read_table(evaluated[0] / "predictions.parquet").to_pandas().set_index("path")
    for img, p in zip(images, a["predictions"], strict=True):
        row = preds.loc[Path(img).relative_to(data).as_posix()]
        assert row["predicted"] == p["top"][0]["label"]
        assert row["probability"] == pytest.approx(p["top"][0]["probability"], abs=1e-6)


def test_predict_blank_image_answers_no_keypoints(work, trained):
    blank = work / "white.png"
    cv2.imwrite(str(blank), np.full((100, 100, 3), 255, np.uint8))
    r = fruitdask("predict", "-m", str(trained[0]), str(blank), cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{blank}: no keypoints: cannot classify")
    assert "Traceback" not in r.stderr


def test_bad_model_or_image_is_one_line_exit_2(work, trained, data):
    img = str(next((data / "Test").rglob("*.jpg")))
    line = _one_error_line(fruitdask("predict", "-m", str(work / "missing"), img, cwd=work))
    assert "missing" in line and "not found" in line
    junk = work / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    line = _one_error_line(fruitdask("predict", "-m", str(junk), img, cwd=work))
    assert "not a fruitdask model" in line
    r = fruitdask("predict", "-m", str(trained[0]), str(work / "nope.jpg"), cwd=work)
    assert "nope.jpg" in _one_error_line(r)


def test_train_refuses_a_foreign_output_before_starting(work, data):
    out = work / "not-ours"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = fruitdask("train", "-i", str(data), "-o", str(out), cwd=work, timeout=60)
    assert "notes.txt" in _one_error_line(r)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_retrain_reuses_the_features(work, data, trained):
    out = work / "retrained"
    shutil.copytree(trained[0], out)
    old_hist = sorted((out / "histograms").iterdir())
    r = fruitdask(
        "train", "-i", str(data), "-o", str(out), "--words", "40", "--color",
        "--classifier", "logreg", "--kmeans-max-iter", "10", "--workers", "2", "--json", "-q",
        cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["features_reused"] and s["vocabulary"]["k"] == 40
    assert s["classifier"]["kind"] == "logreg" and s["classifier"]["color"]
    new_hist = sorted((out / "histograms").iterdir())
    assert new_hist and not set(old_hist) & set(new_hist)  # the old run's parts are gone
    model = classify.load_model(str(out))
    assert model.encoder.color and model.encoder.k == 40
    img = next((data / "Test").rglob("*.jpg"))
    p = model.predict_bytes(img.read_bytes(), top_k=2)
    assert p.status == "ok" and len(p.top) == 2


@pytest.mark.s3
def test_train_and_predict_on_s3(s3, work, sample_dir):
    """Input, train output and model all on S3; predict reads the model and an image by URL."""
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/in")
    opts = ["--endpoint-url", s3.endpoint_url]
    opts += ["--storage-option", f"key={s3.storage_options['key']}"]
    opts += ["--storage-option", f"secret={s3.storage_options['secret']}"]
    r = fruitdask(
        "train", "-i", f"{bucket}/in", "-o", f"{bucket}/model", "--words", "20",
        "--kmeans-max-iter", "10", "--workers", "2", "--json", "-q", *opts, cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["images"] == 6 * 12
    fs = s3.fs()
    local_model = work / "from-s3.zip"
    local_model.write_bytes(fs.cat(f"{bucket[5:]}/model/{classify.MODEL_FILE}"))
    assert fs.exists(f"{bucket[5:]}/model/_SUCCESS")

    img = sorted((sample_dir / "Test").rglob("*.jpg"))[0]
    url = f"{bucket}/in/{img.relative_to(sample_dir).as_posix()}"
    got = fruitdask("predict", "-m", f"{bucket}/model", url, "--json", *opts, cwd=work)
    assert got.returncode == 0, got.stderr
    local = _predict_json(local_model, [str(img)], work)
    assert json.loads(got.stdout)["predictions"][0]["top"] == local["predictions"][0]["top"]


# ---------------------------------------------------------------- pieces vs scikit-learn
@pytest.mark.parametrize("n_classes", [2, 5])
def test_linear_classifier_matches_sklearn(n_classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(n_classes)
    x = rng.random((120, 9))
    y = np.array([f"c{i % n_classes}" for i in range(120)], dtype=object)
    ours, info = classify.fit_classifier(x, y, c=3.0)
    ref = LogisticRegression(C=3.0, max_iter=2000, random_state=0).fit(x, y)
    assert list(ours.classes) == list(ref.classes_)
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x), rtol=1e-10)
    assert info["converged"]


def test_one_label_is_refused():
    with pytest.raises(ModelError, match="at least 2 labels"):
        classify.fit_classifier(np.ones((4, 2)), ["a"] * 4, c=1.0)


def _tiny_model() -> Model:
    from fruitdask.bovw import Encoder
    from fruitdask.features import OrbParams
    from fruitdask.pca import PcaModel

    rng = np.random.default_rng(0)
    pca = PcaModel(
        mean=rng.random(32) * 100,
        components=np.linalg.qr(rng.standard_normal((32, 4)))[0].T,
        explained_variance=np.ones(4),
        explained_variance_ratio=np.full(4, 0.1),
        n_samples=100,
        method="exact",
    )
    enc = Encoder(OrbParams(nfeatures=100), pca, rng.standard_normal((6, 4)).astype(np.float32))
    clf = LinearClassifier(("a", "b", "c"), rng.standard_normal((3, 6)), rng.standard_normal(3))
    return Model(enc, clf, "logreg-hellinger", {"run_id": "x"})


def test_model_file_round_trip_and_refusals():
    m = _tiny_model()
    back = Model.from_bytes(m.to_bytes())
    np.testing.assert_array_equal(back.encoder.centers, m.encoder.centers)
    np.testing.assert_array_equal(back.classifier.coef, m.classifier.coef)
    np.testing.assert_array_equal(back.encoder.pca.components, m.encoder.pca.components)
    assert back.encoder.orb == m.encoder.orb and back.classes == ("a", "b", "c")
    x = np.random.default_rng(1).random((4, 6))
    np.testing.assert_array_equal(back.classifier.predict_proba(x), m.classifier.predict_proba(x))

    def rewrite(member: str, data: bytes) -> bytes:
        src = zipfile.ZipFile(_io.BytesIO(m.to_bytes()))
        buf = _io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name in src.namelist():
                z.writestr(name, data if name == member else src.read(name))
        return buf.getvalue()

    doc = json.loads(zipfile.ZipFile(_io.BytesIO(m.to_bytes())).read("model.json"))
    doc["format"] = "fruitdask-model/2"
    with pytest.raises(ModelError, match="not supported"):
        Model.from_bytes(rewrite("model.json", json.dumps(doc).encode()))
    # arrays that would need pickle to load are refused, not unpickled
    evil = _io.BytesIO()
    np.savez(evil, centers=np.array([object()], dtype=object), coef=np.zeros(1), intercept=[0])
    with pytest.raises(ModelError, match="damaged"):
        Model.from_bytes(rewrite("arrays.npz", evil.getvalue()))
    with pytest.raises(ModelError, match="not a fruitdask model"):
        Model.from_bytes(b"PK\x03\x04 truncated")


def test_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(2)
    labels = ["a", "b", "c", "d"]
    y_true = list(rng.choice(labels, 200))
    y_pred = [t if rng.random() < 0.6 else str(rng.choice(labels)) for t in y_true]
    m = classify.compute_metrics(y_true, y_pred, labels)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, lab in enumerate(labels):
        got = m["per_class"][lab]
        assert (got["precision"], got["recall"], got["support"]) == pytest.approx(
            (p[i], r[i], s[i])
        )
        assert got["f1"] == pytest.approx(f[i])
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert m["accuracy"] == pytest.approx(np.mean(np.array(y_true) == np.array(y_pred)))
    # an image that could not be classified counts as wrong, and lowers its class's recall
    m2 = classify.compute_metrics(["a", "a"], ["a", None], ["a", "b"])
    assert m2["accuracy"] == 0.5 and m2["per_class"]["a"]["recall"] == 0.5
    assert m2["classified"] == 1 and m2["not_classified"] == {"a": 1}
