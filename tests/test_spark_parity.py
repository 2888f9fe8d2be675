"""The Spark job against the Dask job on the same files: real PySpark (local mode), real SeaweedFS.

One SparkSession for the module (start-up is ~10 s); each engine runs once per
input and the tests compare what they wrote, the way a reader would read it.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fruitdask import io, pipeline
from fruitdask.config import RunConfig
from fruitdask.pca import PcaModel, exact_pca, moments, principal_angles

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[1]
TABLES = ("images", "descriptors", "features")


# ---------------------------------------------------------------- helpers
def _manifest(out: str, so=None) -> dict:
    fs, root = io.filesystem(out, so)
    return json.loads(fs.cat_file(f"{root}/manifest.json"))


def _read(out: str, table: str, so=None):
    """A table as a careful reader reads it: the manifest's files, after checking _SUCCESS."""
    fs, root = io.filesystem(out, so)
    manifest = _manifest(out, so)
    assert fs.cat_file(f"{root}/_SUCCESS").decode().strip() == manifest["run_id"]
    files = [f"{root}/{f}" for f in manifest["files"][table]]
    return ds.dataset(files, format="parquet", filesystem=fs).to_table()


def _model(out: str, so=None) -> PcaModel:
    fs, root = io.filesystem(out, so)
    return PcaModel.from_json(fs.cat_file(f"{root}/{_manifest(out, so)['files']['model'][0]}"))


def _descriptor_multiset(out: str, so=None) -> collections.Counter:
    t = _read(out, "descriptors", so)
    return collections.Counter(
        zip(t.column("path").to_pylist(), t.column("descriptor").to_pylist(), strict=True)
    )


def _image_rows(out: str, so=None) -> dict:
    t = _read(out, "images", so)
    cols = ["label", "split", "size", "width", "height", "n_keypoints", "status", "error"]
    return {
        row["path"]: tuple(row[c] for c in cols) for row in t.select(["path", *cols]).to_pylist()
    }


def _schemas(out: str, table: str, so=None) -> list:
    fs, root = io.filesystem(out, so)
    out_schemas = []
    for f in _manifest(out, so)["files"][table]:
        with fs.open(f"{root}/{f}", "rb") as fh:
            out_schemas.append(pq.read_schema(fh).remove_metadata())
    return out_schemas


def _features_by_key(out: str, so=None) -> dict:
    t = _read(out, "features", so)
    return {
        (p, k): v
        for p, k, v in zip(
            t.column("path").to_pylist(),
            t.column("keypoint").to_pylist(),
            t.column("pca").to_pylist(),
            strict=True,
        )
    }


def _descriptors_array(out: str, so=None) -> np.ndarray:
    t = _read(out, "descriptors", so)
    return np.frombuffer(b"".join(t.column("descriptor").to_pylist()), np.uint8).reshape(-1, 32)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def spark():
    from spark_parity import session

    # as the CLI's tuned profile starts it (the archive is used only if built)
    spec = session.SparkSpec(master="local[2]", fast_start=True, cds=True)
    with session.start(spec) as (s, _):
        yield s


@pytest.fixture(scope="module")
def local_runs(spark, dask_client, sample_dir, tmp_path_factory):
    """The sample folder through Dask (incremental and exact PCA) and Spark (tuned)."""
    from spark_parity import job

    base = tmp_path_factory.mktemp("parity")
    outs = {name: str(base / name) for name in ("dask", "dask_exact", "spark")}
    pipeline.run(RunConfig(input=str(sample_dir), output=outs["dask"]), dask_client)
    pipeline.run(
        RunConfig(input=str(sample_dir), output=outs["dask_exact"], pca_method="exact"),
        dask_client,
    )
    cfg = RunConfig(input=str(sample_dir), output=outs["spark"], partition_size=30)
    summary = job.run(cfg, spark)
    return outs, summary


# ---------------------------------------------------------------- local folder
def test_local_tuned_matches_dask(local_runs, sample_dir):
    outs, summary = local_runs
    dask, spark_out = outs["dask"], outs["spark"]
    assert _image_rows(spark_out) == _image_rows(dask)
    assert len(_image_rows(spark_out)) == summary.images == 6 * (12 + 4)
    spark_desc = _descriptor_multiset(spark_out)
    assert spark_desc == _descriptor_multiset(dask)
    assert summary.descriptors == sum(spark_desc.values())
    # partition_size 30 over 96 images on 2 cores: 4 partitions, one file each per table
    assert summary.partitions == 4
    files = _manifest(spark_out)["files"]
    assert {t: len(files[t]) for t in TABLES} == dict.fromkeys(TABLES, 4)


def test_local_same_layout_and_schemas(local_runs):
    outs, _ = local_runs
    dask, spark_out = outs["dask"], outs["spark"]
    for table in TABLES:
        expected = _schemas(dask, table)[0]
        assert all(s.equals(expected) for s in _schemas(spark_out, table)), table
    d, s = _manifest(dask), _manifest(spark_out)
    assert (d["engine"], s["engine"]) == ("dask", "spark")
    assert set(s) == set(d)
    assert set(s["counts"]) == set(d["counts"])
    assert s["counts"] == {**d["counts"], "partitions": s["counts"]["partitions"]}
    assert set(s["pca"]) == set(d["pca"])
    assert set(s["files"]) == set(d["files"])
    assert set(os.listdir(spark_out)) == set(os.listdir(dask))  # no _fruitdask/ left
    run_id = s["run_id"]
    assert all(run_id in f for fs in s["files"].values() for f in fs)
    assert _model(spark_out).method == "spark"
    assert s["versions"]["pyspark"] and s["versions"]["java"].startswith(("17", "21", "2"))


def test_features_are_the_saved_model_applied_and_centred(local_runs):
    outs, _ = local_runs
    spark_out = outs["spark"]
    desc = _read(spark_out, "descriptors")
    feats = _read(spark_out, "features")
    # row for row, like the Dask job's files
    assert feats.column("path").to_pylist() == desc.column("path").to_pylist()
    assert feats.column("keypoint").to_pylist() == desc.column("keypoint").to_pylist()
    model = _model(spark_out)
    x = _descriptors_array(spark_out)
    got = np.asarray(feats.column("pca").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, model.transform(x), rtol=1e-4, atol=1e-2)
    # Spark's PCAModel.transform alone would leave the projected mean in (~100s)
    assert np.abs(got.mean(axis=0)).max() < 1e-2 * got.std(axis=0).max()
    np.testing.assert_allclose(model.mean, x.astype(np.float64).mean(axis=0), rtol=1e-9)


def test_principal_angles_spark_vs_dask_models(local_runs):
    outs, _ = local_runs
    spark_model = _model(outs["spark"])
    exact = _model(outs["dask_exact"])
    incremental = _model(outs["dask"])
    reference = exact_pca(moments(_descriptors_array(outs["dask"])), 20)
    # Spark's fit is exact too: only rounding separates the two subspaces
    assert principal_angles(spark_model.components, exact.components).max() < 0.01
    assert principal_angles(spark_model.components, reference.components).max() < 0.01
    # dask-ml IncrementalPCA (full SVD, every descriptor of this small set)
    assert principal_angles(spark_model.components, incremental.components).max() < 0.5
    np.testing.assert_allclose(spark_model.explained_variance, exact.explained_variance, rtol=1e-6)
    # same sign convention: component by component, not only the subspace
    lead = np.abs(np.sum(spark_model.components[:10] * exact.components[:10], axis=1))
    assert (lead > 0.9999).all()
    assert (np.sum(spark_model.components[:10] * exact.components[:10], axis=1) > 0).all()

    # features are comparable with Dask's exact-model features on the leading axes
    spark_f = _features_by_key(outs["spark"])
    dask_f = _features_by_key(outs["dask_exact"])
    assert spark_f.keys() == dask_f.keys()
    keys = sorted(spark_f)
    a = np.asarray([spark_f[k][:10] for k in keys])
    b = np.asarray([dask_f[k][:10] for k in keys])
    np.testing.assert_allclose(a, b, atol=1e-2 * float(np.abs(b).max()))


def test_sampled_fit_reports_angles_to_exact(spark, sample_dir, tmp_path):
    from spark_parity import job

    cfg = RunConfig(input=str(sample_dir), output=str(tmp_path / "o"), pca_sample=800)
    s = job.run(cfg, spark)
    assert s.pca["sampled"] and s.pca["fitted_on_rows"] < s.descriptors
    manifest = _manifest(str(tmp_path / "o"))
    assert (
        manifest["pca"]["max_principal_angle_to_exact_deg"]
        == s.pca["max_principal_angle_to_exact_deg"]
    )
    assert 0 < s.pca["explained_variance_ratio"] <= s.pca["exact_explained_variance_ratio"] + 1e-9
    assert max(s.pca["principal_angles_to_exact_deg"][:5]) < 10


def test_seed_profile_gives_the_same_descriptors(spark, local_runs, sample_dir, tmp_path):
    from spark_parity import job

    outs, _ = local_runs
    out = str(tmp_path / "seed")
    s = job.run(RunConfig(input=str(sample_dir), output=out), spark, profile="seed")
    assert _image_rows(out) == _image_rows(outs["dask"])
    assert _descriptor_multiset(out) == _descriptor_multiset(outs["dask"])
    for table in TABLES:
        expected = _schemas(outs["dask"], table)[0]
        assert all(sch.equals(expected) for sch in _schemas(out, table)), table
    # Spark's default file packing (4 MB per file): ~32 small images a partition
    assert s.partitions >= 3
    assert _manifest(out)["cluster"]["profile"] == "seed"
    # centred (StandardScaler withMean) and equal to the saved model applied
    model = _model(out)
    feats = np.asarray(_read(out, "features").column("pca").to_pylist(), np.float32)
    np.testing.assert_allclose(feats, model.transform(_descriptors_array(out)), atol=1e-2)
    assert principal_angles(model.components, _model(outs["dask_exact"]).components).max() < 0.01


def test_overwrite_and_refusal(spark, sample_dir, tmp_path):
    from spark_parity import job

    out = str(tmp_path / "o")
    first = job.run(RunConfig(input=str(sample_dir), output=out), spark)
    with pytest.raises(pipeline.OutputExistsError, match="--overwrite"):
        job.preflight(RunConfig(input=str(sample_dir), output=out))
    second = job.run(RunConfig(input=str(sample_dir), output=out, overwrite=True), spark)
    assert second.run_id != first.run_id
    names = [n for t in TABLES for n in os.listdir(Path(out) / t)]
    assert names and all(second.run_id in n for n in names)  # the old run's files are gone


def test_input_errors_are_one_line(spark, tmp_path):
    from spark_parity import job

    with pytest.raises(io.StorageError, match="not found"):
        job.preflight(RunConfig(input=str(tmp_path / "missing"), output=str(tmp_path / "o")))
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "notes.txt").write_text("no images")
    with pytest.raises(io.StorageError, match="no image files found"):
        job.run(RunConfig(input=str(empty), output=str(tmp_path / "o")), spark)
    assert not (tmp_path / "o").exists()


def test_bad_files_get_error_rows(spark, dask_client, tmp_path):
    """Corrupt and empty files: an images/ row with status error, as in the Dask job."""
    from fruitdask import sample
    from spark_parity import job

    root = tmp_path / "in"
    sample.generate(root, classes=2, per_class=8, seed=3)
    (root / "Training" / "Apple Braeburn" / "bad.jpg").write_bytes(b"not a jpeg")
    (root / "Training" / "Apple Braeburn" / "empty.png").write_bytes(b"")
    spark_out, dask_out = str(tmp_path / "s"), str(tmp_path / "d")
    job.run(RunConfig(input=str(root), output=spark_out), spark)
    pipeline.run(RunConfig(input=str(root), output=dask_out), dask_client)
    rows = _image_rows(spark_out)
    assert rows == _image_rows(dask_out)
    assert rows["Training/Apple Braeburn/bad.jpg"][6] == "error"
    assert _descriptor_multiset(spark_out) == _descriptor_multiset(dask_out)


# ---------------------------------------------------------------- S3 (SeaweedFS)
@pytest.fixture(scope="module")
def s3_runs(spark, s3, dask_client, sample_dir, tmp_path_factory):
    """The sample tree in a bucket, through Dask (to a local folder) and Spark tuned (to S3)."""
    from spark_parity import job

    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/fruits")
    so = s3.storage_options
    base = tmp_path_factory.mktemp("s3parity")
    inp = f"{bucket}/fruits"
    dask_out = str(base / "dask")
    cfg = RunConfig(input=inp, output=dask_out, storage_options=so, output_storage_options={})
    pipeline.run(cfg, dask_client)
    spark_out = f"{bucket}/spark-out"
    summary = job.run(RunConfig(input=inp, output=spark_out, storage_options=so), spark)
    return {"input": inp, "dask": dask_out, "spark": spark_out, "so": so, "summary": summary}


@pytest.mark.s3
def test_s3_tuned_matches_dask(s3_runs):
    """Listed on the driver, fetched by the executors through fsspec; output to S3 too."""
    r = s3_runs
    so, spark_out, dask_out, s = r["so"], r["spark"], r["dask"], r["summary"]
    assert _manifest(spark_out, so)["cluster"]["reader"] == "fsspec"
    assert _image_rows(spark_out, so) == _image_rows(dask_out)
    assert _descriptor_multiset(spark_out, so) == _descriptor_multiset(dask_out)
    assert s.descriptors == sum(_descriptor_multiset(dask_out).values())
    for table in TABLES:
        expected = _schemas(dask_out, table)[0]
        assert all(x.equals(expected) for x in _schemas(spark_out, table, so)), table
    # the driver listing is partitioned like the Dask job's (plan_partitions)
    assert s.partitions == len(pipeline.plan_partitions(s.images, 1000, 2))
    angles = principal_angles(_model(spark_out, so).components, _model(dask_out).components)
    assert angles.max() < 0.5
    fs, root = io.filesystem(spark_out, so)
    # the run's state is gone (SeaweedFS may keep an empty folder entry)
    assert not [p for p in fs.find(f"{root}/_fruitdask") if p.endswith(".json")]


@pytest.mark.s3
def test_s3_seed_profile_and_native_s3_error(spark, s3_runs, tmp_path):
    from spark_parity import job

    r = s3_runs
    out = str(tmp_path / "seed")
    cfg = RunConfig(
        input=r["input"], output=out, storage_options=r["so"], output_storage_options={}
    )
    job.run(cfg, spark, profile="seed")
    assert _descriptor_multiset(out) == _descriptor_multiset(r["dask"])
    assert _image_rows(out) == _image_rows(r["dask"])
    # No EMRFS or hadoop-aws here: --native-s3 fails with one line naming the way out.
    with pytest.raises(io.StorageError, match="native-s3") as err:
        job.run(cfg.with_(output=str(tmp_path / "n")), spark, native_s3=True)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- no Java, the CLI
def _cli(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "spark_parity", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_missing_java_is_one_line(sample_dir, tmp_path):
    out = str(tmp_path / "o")
    env = dict(os.environ, JAVA_HOME=str(tmp_path / "no-such-jdk"))
    r = _cli(["run", "--input", str(sample_dir), "--output", out], env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("spark_parity: error: JAVA_HOME=")
    assert "Java 17+" in lines[0] and "Traceback" not in r.stderr

    # no JAVA_HOME and no java on the PATH (only the interpreter's folder)
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(Path(sys.executable).parent)
    r = _cli(["run", "--input", str(sample_dir), "--output", out], env)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "spark_parity: error: java not found (JAVA_HOME unset, none on PATH); Spark needs "
        "Java 17+ (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
    )
    assert not Path(out).exists()


def test_java_version_parsing():
    from spark_parity.session import java_major, parse_master

    assert java_major('openjdk version "17.0.15" 2025-04-15') == 17
    assert java_major('java version "1.8.0_292"') == 8
    assert java_major('openjdk version "21" 2023-09-19') == 21
    assert java_major("garbage") is None
    assert parse_master("local[3]") == 3
    assert parse_master("local") == 1
    assert parse_master("spark://h:7077") is None
    with pytest.raises(ValueError):
        parse_master("local[two]")


def test_cli_usage_errors_before_spark_starts(sample_dir, tmp_path):
    env = dict(os.environ, JAVA_HOME=str(tmp_path / "no-such-jdk"))
    # input checked before Java: the message is about the input
    r = _cli(["run", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], env)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("spark_parity: error: ") and "not found" in r.stderr
    o = str(tmp_path / "o")
    r = _cli(["run", "--input", str(sample_dir), "--output", o, "--master", "local[x]"], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "master" in r.stderr
    r = _cli(["run", "--input", str(sample_dir), "--output", o, "--native-s3"], env)
    assert r.returncode == 2 and "--native-s3 applies to s3://" in r.stderr


# ---------------------------------------------------------------- benchmarks/compare.py
def test_compare_end_to_end(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare.py"), "--images", "60",
         "--repeat", "1", "--cores", "2", "--out", str(out), "--data-dir", str(tmp_path / "data"),
         "--engines", "dask,spark-tuned", "--no-cds"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "parity: OK" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["images"] == 60
    assert set(res["engines"]) == {"dask", "spark-tuned"}
    assert res["parity"]["ok"] and res["parity"]["spark-tuned"]["problems"] == []
    assert res["rounds"][0]["spark-tuned"]["peak_rss_java_bytes"] > 0
    for engine in ("dask", "spark-tuned"):
        raw = res["engines"][engine]["raw"]
        assert raw["cpu_s"][0] > 0 and raw["peak_rss_gib"][0] > 0
        for stage in ("startup", "listing", "extract", "pca_fit", "transform_write"):
            assert len(raw["stages_s"][stage]) == 1
    assert (out / "results.md").read_text().startswith("| engine |")
    assert (out / "results.png").stat().st_size > 0
