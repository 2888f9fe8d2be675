"""The Spark job against the Dask job on the same files: real PySpark (local mode), real SeaweedFS.

One SparkSession for the module (start-up is ~10 s); each engine runs once per
input and the tests compare what they wrote, the way a reader reads it
(``_SUCCESS`` -> manifest -> file list: :func:`fruitdask.testing.committed_tables`).
The command-line tests start ``python -m spark_parity`` through the shared
``cli`` fixture; the ones that stop a run mid-way take the S3 server away
(``s3.stop()``) to hold the run where they want it, so they wait on events,
never on time.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest

from fruitdask import io, pack, pipeline
from fruitdask.config import RunConfig
from fruitdask.errors import (
    InputError,
    LockedError,
    NotFoundError,
    OutputExistsError,
    StorageError,
)
from fruitdask.output import OutputDir
from fruitdask.partition import plan_partitions
from fruitdask.pca import PcaModel, exact_pca, moments, principal_angles
from fruitdask.testing import committed_tables, result_signature

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[1]
TABLES = ("images", "descriptors", "features")


# ---------------------------------------------------------------- readers
def _committed(out: str, so=None) -> dict:
    snap = committed_tables(out, so)
    assert snap is not None, f"nothing committed at {out}"
    return snap


def _manifest(out: str, so=None) -> dict:
    return _committed(out, so)["manifest"]


def _read(out: str, table: str, so=None) -> pa.Table:
    """A table as a careful reader reads it: the committed run's files, in manifest order."""
    return pa.concat_tables(_committed(out, so)["tables"][table])


def _model(out: str, so=None) -> PcaModel:
    name = _manifest(out, so)["files"]["model"][0]
    return PcaModel.from_json(io.read_bytes(io.join(out, name), so))


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
    return [t.schema.remove_metadata() for t in _committed(out, so)["tables"][table]]


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


def _state_files(out: str, so=None) -> list[str]:
    """What the output's ``_fruitdask/`` holds besides committed manifests (run
    states, a lock), as relative paths."""
    fs, root = io.filesystem(out, so)
    found = fs.find(f"{root}/_fruitdask") if fs.exists(f"{root}/_fruitdask") else []
    rel = [p[len(root) + 1 :] for p in found]
    return [p for p in rel if not p.startswith("_fruitdask/manifests/")]


# ---------------------------------------------------------------- running the job in-process
def _spark_run(spark, cfg: RunConfig, profile="tuned", reader=None, native_s3=False):
    """The driver's two steps, as the CLI calls them: preflight (list, check, lock), run."""
    from spark_parity import job

    listing, out = job.preflight(cfg, native_s3, reader)
    try:
        return job.run(cfg, spark, out, listing, profile, native_s3, reader)
    finally:
        out.release()


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
    base = tmp_path_factory.mktemp("parity")
    outs = {name: str(base / name) for name in ("dask", "dask_exact", "spark", "fsspec")}
    pipeline.run(RunConfig(input=str(sample_dir), output=outs["dask"]), dask_client)
    pipeline.run(
        RunConfig(input=str(sample_dir), output=outs["dask_exact"], pca_method="exact"),
        dask_client,
    )
    cfg = RunConfig(input=str(sample_dir), output=outs["spark"], partition_size=30)
    summary = _spark_run(spark, cfg)
    fsspec_summary = _spark_run(spark, cfg.with_(output=outs["fsspec"]), reader="fsspec")
    return outs, summary, fsspec_summary


# ---------------------------------------------------------------- local folder
def test_local_tuned_matches_dask(local_runs, sample_dir):
    outs, summary, _ = local_runs
    dask, spark_out = outs["dask"], outs["spark"]
    assert _manifest(spark_out)["cluster"]["reader"] == "binaryfile"
    assert _image_rows(spark_out) == _image_rows(dask)
    assert len(_image_rows(spark_out)) == summary.images == 6 * (12 + 4)
    spark_desc = _descriptor_multiset(spark_out)
    assert spark_desc == _descriptor_multiset(dask)
    assert summary.descriptors == sum(spark_desc.values())
    # partition_size 30 over 96 images on 2 cores: 4 partitions, one file each per table
    assert summary.partitions == 4
    files = _manifest(spark_out)["files"]
    assert {t: len(files[t]) for t in TABLES} == dict.fromkeys(TABLES, 4)
    assert result_signature(spark_out) == result_signature(dask)


def test_local_fsspec_reader_matches_dask(local_runs):
    """The driver's listing, bytes fetched in the executors: the same result, partitioned
    as the Dask job partitions (plan_partitions)."""
    outs, _, s = local_runs
    assert _manifest(outs["fsspec"])["cluster"]["reader"] == "fsspec"
    assert _image_rows(outs["fsspec"]) == _image_rows(outs["dask"])
    assert _descriptor_multiset(outs["fsspec"]) == _descriptor_multiset(outs["dask"])
    assert s.partitions == len(plan_partitions(s.images, 30, 2))
    np.testing.assert_allclose(
        _model(outs["fsspec"]).explained_variance, _model(outs["spark"]).explained_variance,
        rtol=1e-6,
    )  # fmt: skip


def test_local_same_layout_and_schemas(local_runs):
    outs, _, _ = local_runs
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
    assert set(os.listdir(spark_out)) == set(os.listdir(dask))
    # the commit left its manifest and the manifest.json copy; no run state, no lock
    assert _state_files(spark_out) == []
    assert os.listdir(Path(spark_out) / "_fruitdask" / "manifests") == [f"{s['run_id']}.json"]
    assert json.loads((Path(spark_out) / "manifest.json").read_text()) == s
    run_id = s["run_id"]
    assert (Path(spark_out) / "_SUCCESS").read_text().strip() == run_id
    assert all(run_id in f for fs in s["files"].values() for f in fs)
    assert _model(spark_out).method == "spark"
    assert s["versions"]["pyspark"] and s["versions"]["java"].startswith(("17", "21", "2"))


def test_features_are_the_saved_model_applied_and_centred(local_runs):
    outs, _, _ = local_runs
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
    outs, _, _ = local_runs
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
    # the subspace captures the exact variance
    np.testing.assert_allclose(
        spark_model.explained_variance_ratio.sum(), reference.explained_variance_ratio.sum(),
        rtol=1e-9,
    )  # fmt: skip
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
    cfg = RunConfig(input=str(sample_dir), output=str(tmp_path / "o"), pca_sample=800)
    s = _spark_run(spark, cfg)
    assert s.pca["sampled"] and s.pca["fitted_on_rows"] < s.descriptors
    manifest = _manifest(str(tmp_path / "o"))
    assert (
        manifest["pca"]["max_principal_angle_to_exact_deg"]
        == s.pca["max_principal_angle_to_exact_deg"]
    )
    assert 0 < s.pca["explained_variance_ratio"] <= s.pca["exact_explained_variance_ratio"] + 1e-9
    assert max(s.pca["principal_angles_to_exact_deg"][:5]) < 10


def test_seed_profile_gives_the_same_descriptors(spark, local_runs, sample_dir, tmp_path):
    outs, _, _ = local_runs
    out = str(tmp_path / "seed")
    s = _spark_run(spark, RunConfig(input=str(sample_dir), output=out), profile="seed")
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
    assert np.abs(feats.mean(axis=0)).max() < 1e-2 * feats.std(axis=0).max()
    assert principal_angles(model.components, _model(outs["dask_exact"]).components).max() < 0.01
    assert _state_files(out) == []


def test_packed_input_matches_the_loose_files(spark, local_runs, dask_client, sample_dir, tmp_path):
    """A pack is read like the tree it came from: the listing is the pack's index,
    the executors read whole row groups of the shards."""
    outs, _, _ = local_runs
    packed = str(tmp_path / "packed")
    pack.pack(str(sample_dir), packed, dask_client, shard_size=40, row_group_size=10)
    out = str(tmp_path / "s")
    s = _spark_run(spark, RunConfig(input=packed, output=out, partition_size=25))
    assert _manifest(out)["cluster"]["reader"] == "fsspec"
    assert _image_rows(out) == _image_rows(outs["dask"])
    assert _descriptor_multiset(out) == _descriptor_multiset(outs["dask"])
    assert s.images == 96 and s.partitions >= 4
    # the seed profile reads loose files only; binaryFile cannot read a pack
    with pytest.raises(InputError, match="--profile tuned"):
        _spark_run(spark, RunConfig(input=packed, output=str(tmp_path / "seed")), "seed")
    with pytest.raises(InputError, match="binaryfile"):
        _spark_run(spark, RunConfig(input=packed, output=str(tmp_path / "b")), reader="binaryfile")
    assert committed_tables(str(tmp_path / "seed")) is None
    assert not (tmp_path / "seed" / "_fruitdask" / "lock.json").exists()  # released


def test_overwrite_and_refusal(spark, sample_dir, tmp_path):
    from spark_parity import job

    out = str(tmp_path / "o")
    first = _spark_run(spark, RunConfig(input=str(sample_dir), output=out))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        job.preflight(RunConfig(input=str(sample_dir), output=out))
    second = _spark_run(spark, RunConfig(input=str(sample_dir), output=out, overwrite=True))
    assert second.run_id != first.run_id
    assert _manifest(out)["run_id"] == second.run_id
    names = [n for t in TABLES for n in os.listdir(Path(out) / t)]
    assert names and all(second.run_id in n for n in names)  # the old run's files are gone
    assert os.listdir(Path(out) / "model") == [f"pca-{second.run_id}.json"]
    assert os.listdir(Path(out) / "_fruitdask" / "manifests") == [f"{second.run_id}.json"]
    assert _state_files(out) == []


def test_input_errors(spark, tmp_path):
    from spark_parity import job

    with pytest.raises(NotFoundError, match="not found"):
        job.preflight(RunConfig(input=str(tmp_path / "missing"), output=str(tmp_path / "o")))
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "notes.txt").write_text("no images")
    with pytest.raises(InputError, match="no image files found"):
        _spark_run(spark, RunConfig(input=str(empty), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_bad_files_get_error_rows(spark, dask_client, tmp_path):
    """Corrupt and empty files: an images/ row with status error, as in the Dask job
    (binaryFile skips empty files: the driver extracts what the scan left out)."""
    from fruitdask import sample

    root = tmp_path / "in"
    sample.generate(root, classes=2, per_class=8, seed=3)
    (root / "Training" / "Apple Braeburn" / "bad.jpg").write_bytes(b"not a jpeg")
    (root / "Training" / "Apple Braeburn" / "empty.png").write_bytes(b"")
    dask_out = str(tmp_path / "d")
    pipeline.run(RunConfig(input=str(root), output=dask_out), dask_client)
    for reader in ("binaryfile", "fsspec"):
        spark_out = str(tmp_path / reader)
        _spark_run(spark, RunConfig(input=str(root), output=spark_out), reader=reader)
        rows = _image_rows(spark_out)
        assert rows == _image_rows(dask_out), reader
        assert rows["Training/Apple Braeburn/bad.jpg"][6] == "error"
        assert rows["Training/Apple Braeburn/empty.png"][6] == "error"
        assert _descriptor_multiset(spark_out) == _descriptor_multiset(dask_out)


# ---------------------------------------------------------------- S3 (SeaweedFS)
@pytest.fixture(scope="module")
def s3_runs(spark, s3, dask_client, sample_dir, tmp_path_factory):
    """The sample tree in a bucket, through Dask (to a local folder) and Spark tuned (to S3)."""
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/fruits")
    so = s3.storage_options
    base = tmp_path_factory.mktemp("s3parity")
    inp = f"{bucket}/fruits"
    dask_out = str(base / "dask")
    cfg = RunConfig(input=inp, output=dask_out, storage_options=so, output_storage_options={})
    pipeline.run(cfg, dask_client)
    spark_out = f"{bucket}/spark-out"
    summary = _spark_run(spark, RunConfig(input=inp, output=spark_out, storage_options=so))
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
    assert s.partitions == len(plan_partitions(s.images, 1000, 2))
    angles = principal_angles(_model(spark_out, so).components, _model(dask_out).components)
    assert angles.max() < 0.5
    # the run's state and lock are gone; the manifest stays, credentials redacted
    assert _state_files(spark_out, so) == []
    assert _manifest(spark_out, so)["storage_options"]["secret"] == "***"


@pytest.mark.s3
def test_s3_seed_profile_and_native_s3_error(spark, s3_runs, tmp_path):
    r = s3_runs
    out = str(tmp_path / "seed")
    cfg = RunConfig(
        input=r["input"], output=out, storage_options=r["so"], output_storage_options={}
    )
    _spark_run(spark, cfg, profile="seed")
    assert _descriptor_multiset(out) == _descriptor_multiset(r["dask"])
    assert _image_rows(out) == _image_rows(r["dask"])
    # No EMRFS or hadoop-aws here: --native-s3 fails with one line naming the way out.
    with pytest.raises(StorageError, match="native-s3") as err:
        _spark_run(spark, cfg.with_(output=str(tmp_path / "n")), native_s3=True)
    assert "\n" not in str(err.value)
    assert committed_tables(str(tmp_path / "n")) is None
    assert not (tmp_path / "n" / "_fruitdask" / "lock.json").exists()  # released


# ---------------------------------------------------------------- the command line
def _poll(what: str, found, proc: subprocess.Popen | None = None, limit: float = 600):
    """Wait for an event (``found()`` true) while ``proc`` lives; a hang guard, not a timing."""
    deadline = time.monotonic() + limit
    while True:
        value = found()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {limit:.0f}s")
        time.sleep(0.05)


def _await_line(proc: subprocess.Popen, prefix: str, seen: list[str]) -> str:
    """Read the run's stderr up to the first line starting with ``prefix``."""
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line: {''.join(seen)[-3000:]}")


def _no_survivors(cli) -> None:
    """Every process the runs started has exited (waits on their exit)."""
    _, alive = psutil.wait_procs(cli.processes(), timeout=60)
    left = []
    for p in alive:  # leave nothing behind, then fail
        with contextlib.suppress(psutil.Error):
            left.append((p.pid, " ".join(p.cmdline())[:200]))
            p.kill()
    assert not alive, left


def _creds(s3) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3.storage_options["key"],
            "AWS_SECRET_ACCESS_KEY": s3.storage_options["secret"]}  # fmt: skip


def test_missing_java_is_one_line(cli, sample_dir, tmp_path):
    out = str(tmp_path / "o")
    args = ("run", "--input", str(sample_dir), "--output", out)
    r = cli.run(*args, module="spark_parity", JAVA_HOME=str(tmp_path / "no-such-jdk"))
    line = cli.one_line(r, "Java 17+", code=2)
    assert line.startswith("spark_parity: error: JAVA_HOME=")

    # no JAVA_HOME and no java on the PATH (only the interpreter's folder)
    r = cli.run(*args, module="spark_parity", JAVA_HOME="", PATH=str(Path(sys.executable).parent))
    assert cli.one_line(r, code=2) == (
        "spark_parity: error: java not found (JAVA_HOME unset, none on PATH); Spark needs "
        "Java 17+ (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
    )
    assert committed_tables(out) is None
    assert not Path(out).exists() or not list(Path(out).rglob("*"))  # no lock left behind


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


def test_cli_usage_errors_before_spark_starts(cli, sample_dir, tmp_path):
    nojava = {"JAVA_HOME": str(tmp_path / "no-such-jdk")}
    o = str(tmp_path / "o")
    # input checked before Java: the message is about the input
    r = cli.run("run", "--input", str(tmp_path / "missing"), "--output", o,
                module="spark_parity", **nojava)  # fmt: skip
    cli.one_line(r, "spark_parity: error: ", "not found", code=2)
    r = cli.run("run", "--input", str(sample_dir), "--output", o, "--master", "local[x]",
                module="spark_parity", **nojava)  # fmt: skip
    cli.one_line(r, "master", code=2)
    r = cli.run("run", "--input", str(sample_dir), "--output", o, "--native-s3",
                module="spark_parity", **nojava)  # fmt: skip
    cli.one_line(r, "--native-s3 applies to s3://", code=2)
    r = cli.run("run", "--input", str(sample_dir), "--output", str(sample_dir / "Training"),
                module="spark_parity", **nojava)  # fmt: skip
    cli.one_line(r, "inside the input", code=2)
    assert not Path(o).exists()


def test_second_writer_to_a_locked_output_exits_2(cli, spark, sample_dir, tmp_path):
    """A writer holds the output's lease: another run is refused before Spark
    starts, naming the holder and the lock, and the committed result stays."""
    out = str(tmp_path / "o")
    first = _spark_run(spark, RunConfig(input=str(sample_dir), output=out))
    before = result_signature(out)
    holder = OutputDir(out)
    holder.lock("holder01")
    try:
        with pytest.raises(LockedError, match="holder01"):
            _spark_run(spark, RunConfig(input=str(sample_dir), output=out, overwrite=True))
        r = cli.run("run", "--input", str(sample_dir), "--output", out, "--overwrite",
                    module="spark_parity")  # fmt: skip
        line = cli.one_line(r, "locked by run holder01", f"pid {os.getpid()}",
                            "_fruitdask/lock.json", code=2)  # fmt: skip
        assert line.startswith("spark_parity: error: ")
    finally:
        holder.release()
    assert _manifest(out)["run_id"] == first.run_id and result_signature(out) == before
    assert _state_files(out) == []


@pytest.mark.s3
def test_json_result_and_killed_overwrite_keeps_the_old_result(cli, s3, spark, sample_dir):
    """stdout is one JSON document; then an overwrite killed (SIGKILL, the whole
    process group) after it wrote new files beside the old ones leaves the old
    run committed and readable; the next overwrite takes the dead run's lock
    over and deletes what it left."""
    from spark_parity import job

    so = s3.storage_options
    out = f"{s3.make_bucket()}/out"
    # many small partitions on two cores: after the first one is written, the
    # rest of the run (more partitions, the fit, the features) is still ahead
    args = ["run", "--input", str(sample_dir), "--output", out, "--endpoint-url",
            s3.endpoint_url, "--master", "local[2]", "--partition-size", "2"]  # fmt: skip
    r = cli.run(*args, "--json", module="spark_parity", **_creds(s3))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)  # exactly one JSON document: json.load(sys.stdin) holds
    assert doc["engine"] == "spark" and doc["images"] == 96 and doc["partitions"] >= 24
    notes = r.stderr.splitlines()
    assert any(x.startswith("input: ") for x in notes) and "{" not in r.stderr  # notes only
    old = result_signature(out, so)
    assert old is not None and _manifest(out, so)["run_id"] == doc["run_id"]

    runs = io.join(out, "_fruitdask", "runs")

    def new_run_done():  # a partition of the new run is written beside the old files
        for rid in io.ls(runs, so):
            if rid != doc["run_id"] and io.ls(io.join(runs, rid, "done"), so):
                return rid
        return None

    proc = cli.start(*args, "--overwrite", module="spark_parity", **_creds(s3))
    try:
        killed = _poll("a partition of the new run", new_run_done, proc)
        s3.stop()  # from here on the run can write nothing, its commit included
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        _no_survivors(cli)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        s3.restart()
    assert proc.returncode == -signal.SIGKILL
    snap = committed_tables(out, so)
    assert snap is not None and snap["run_id"] == doc["run_id"]
    assert result_signature(out, so) == old
    assert any(killed in n for n in io.ls(io.join(out, "images"), so))  # beside the old ones
    assert io.exists(io.join(out, "_fruitdask", "lock.json"), so)  # the dead run's lease

    # the next overwrite: a dead holder's lock is taken over; what the killed run left goes
    cfg = RunConfig(input=str(sample_dir), output=out, output_storage_options=so, overwrite=True)
    with pytest.raises(OutputExistsError, match="--overwrite") as err:  # no --resume here
        job.preflight(cfg.with_(overwrite=False))
    assert "--resume" not in str(err.value)
    third = _spark_run(spark, cfg)
    assert result_signature(out, so) == old and _manifest(out, so)["run_id"] == third.run_id
    names = [n for t in TABLES for n in io.ls(io.join(out, t), so)]
    assert names and all(third.run_id in n for n in names)
    assert _state_files(out, so) == []


@pytest.mark.s3
def test_storage_outage_in_the_executors_is_one_typed_line(cli, s3, sample_dir, tmp_path):
    """The store goes away after the input was listed: each executor retries
    (RETRY_WAITS), then raises TransientError; the driver raises the same type
    from the run's record of it, one line, exit 2, and nothing is committed."""
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/fruits")
    out = tmp_path / "o"
    proc = cli.start("run", "--input", f"{bucket}/fruits", "--output", str(out), "--quiet",
                     "--endpoint-url", s3.endpoint_url, module="spark_parity",
                     **_creds(s3))  # fmt: skip
    try:
        # the lock is taken after the listing and before Spark starts
        _poll("the output's lock", (out / "_fruitdask" / "lock.json").exists, proc)
        s3.stop()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        s3.restart()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = cli.one_line(r, "cannot reach the storage endpoint", "still failing after 6 attempts",
                        code=2)  # fmt: skip
    assert line.startswith("spark_parity: error: ")
    assert f"{bucket.removeprefix('s3://')}/fruits/" in line  # names the object it could not read
    assert stdout == ""
    _no_survivors(cli)
    # the executor's record of the error, which the driver raised again
    records = list(out.glob("_fruitdask/runs/*/errors/*.json"))
    assert records and {json.loads(p.read_text())["type"] for p in records} == {"TransientError"}
    assert committed_tables(str(out)) is None
    assert not (out / "_fruitdask" / "lock.json").exists()


@pytest.mark.s3
def test_sigterm_mid_run_exits_143_and_leaves_no_process(cli, s3, sample_dir, tmp_path):
    """SIGTERM while the executors are extracting (held there by a store outage):
    exit 143, "no _SUCCESS written", every process gone, the lock released.
    While it runs, a second writer to the same output is refused, naming it."""
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/fruits")
    out = tmp_path / "o"
    proc = cli.start("run", "--input", f"{bucket}/fruits", "--output", str(out),
                     "--endpoint-url", s3.endpoint_url, module="spark_parity",
                     **_creds(s3))  # fmt: skip
    seen: list[str] = []
    try:
        _await_line(proc, "input: ", seen)  # listed and locked; Spark starts next
        s3.stop()
        _await_line(proc, "extract: ", seen)  # Spark's extraction job is running
        run_id = json.loads((out / "_fruitdask" / "lock.json").read_text())["run_id"]
        second = cli.run("run", "--input", str(sample_dir), "--output", str(out), "--overwrite",
                         module="spark_parity")  # fmt: skip
        cli.one_line(second, f"locked by run {run_id}", f"pid {proc.pid}", code=2)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        s3.restart()
    _stopped_by_sigterm(cli, proc, "".join(seen) + rest, out)


def _stopped_by_sigterm(cli, proc, stderr: str, out) -> None:
    """Exit 143 with one last line that says so, no traceback, no process
    left, nothing committed and the lock released."""
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("spark_parity: stopped by SIGTERM") and "no _SUCCESS written" in last
    _no_survivors(cli)
    assert committed_tables(str(out)) is None
    assert not (out / "_fruitdask" / "lock.json").exists()


def test_sigterm_during_spark_start_up(cli, sample_dir, tmp_path):
    """A stop while the JVM is being launched ends the start-up at once: exit
    143, the lock released, no JVM left (not the supervisor's grace later)."""
    out = tmp_path / "o"

    def jvm_launched():
        for p in cli.processes():
            try:
                if any("org.apache.spark" in a for a in p.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    proc = cli.start("run", "--input", str(sample_dir), "--output", str(out),
                     module="spark_parity")  # fmt: skip
    try:
        _poll("the Spark JVM's launch", jvm_launched, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    _stopped_by_sigterm(cli, proc, stderr, out)


# ---------------------------------------------------------------- benchmarks/compare.py
def test_compare_end_to_end(cli, tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare.py"), "--images", "60",
         "--repeat", "1", "--cores", "2", "--out", str(out), "--data-dir", str(tmp_path / "data"),
         "--engines", "dask,spark-tuned", "--no-cds"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=cli.env,
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


def test_cds_archive_is_built_once_then_used(cli, sample_dir, tmp_path):
    """``spark_parity cds`` builds the class-data-sharing archive in a private
    cache. The JVM writes it after the Python process has exited (when its
    gateway pipe closes), so the build must wait for that JVM: it once checked
    too early and failed with every archive written a moment later."""
    r = cli.run("cds", module="spark_parity", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(r.stdout.split(" (", 1)[0])
    assert path.is_file() and path.stat().st_size > 50 * 2**20, r.stdout
    assert str(path).startswith(str(cli.home / "cache")) and "built in" in r.stdout
    assert list(path.parent.glob("*.partial")) == []
    r = cli.run("cds", module="spark_parity")
    assert r.returncode == 0 and "already there" in r.stdout, r.stderr[-3000:]
    # a run maps it without a word from the JVM (a rejected archive warns)
    r = cli.run("run", "--input", str(sample_dir), "--output", str(tmp_path / "o"), "--quiet",
                module="spark_parity")  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
