"""The Dask pipeline end to end against a plain loop over the same files, locally and on S3."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fruitdask import features, io, pipeline
from fruitdask.config import RunConfig
from fruitdask.errors import OutputExistsError
from fruitdask.output import STATE_DIR
from fruitdask.pca import PcaModel, exact_pca, moments, principal_angles
from fruitdask.testing import committed_tables


def _read(out: str | Path, table: str, so=None):
    """Read a table the way a careful reader does: _SUCCESS -> manifest -> its files."""
    snap = committed_tables(str(out), so)
    assert snap is not None, f"{out}: nothing committed"
    return pa.concat_tables(snap["tables"][table])


def _no_run_state(out: str, so=None) -> None:
    """After a commit: no run state, no lock (only the committed manifest stays)."""
    fs, root = io.filesystem(io.join(out, STATE_DIR), so)
    fs.invalidate_cache()
    left = [p for p in fs.find(root) if "/manifests/" not in p]
    assert left == [], left  # (SeaweedFS may keep empty "folders": find lists objects)


def _reference(root: Path, params=None):
    """The job as a plain loop: direct kernel calls, no Dask."""
    rows, descs = {}, []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or not p.name.lower().endswith(io.IMAGE_EXTENSIONS):
            continue
        f = features.extract(p.read_bytes(), params)
        rel = p.relative_to(root).as_posix()
        rows[rel] = (f.status, len(f.descriptors))
        descs.extend((rel, d.tobytes()) for d in f.descriptors)
    return rows, descs


def _descriptor_multiset(table):
    return collections.Counter(
        zip(table.column("path").to_pylist(), table.column("descriptor").to_pylist(), strict=True)
    )


def test_local_run_matches_plain_loop(dask_client, sample_dir, tmp_path):
    out = tmp_path / "out"
    cfg = RunConfig(input=str(sample_dir), output=str(out), partition_size=17)
    s = pipeline.run(cfg, dask_client)

    ref_rows, ref_desc = _reference(sample_dir)
    images = _read(out, "images")
    assert images.num_rows == len(ref_rows) == s.images
    got_rows = {
        p: (st, n)
        for p, st, n in zip(
            images.column("path").to_pylist(),
            images.column("status").to_pylist(),
            images.column("n_keypoints").to_pylist(),
            strict=True,
        )
    }
    assert got_rows == ref_rows
    labels = set(images.column("label").to_pylist())
    assert labels == {p.name for p in (sample_dir / "Training").iterdir()}
    assert set(images.column("split").to_pylist()) == {"Training", "Test"}

    desc = _read(out, "descriptors")
    assert _descriptor_multiset(desc) == collections.Counter(ref_desc)
    assert s.descriptors == desc.num_rows == len(ref_desc)

    # features = the saved model applied to the descriptors, row for row
    feats = _read(out, "features")
    assert feats.num_rows == desc.num_rows
    assert feats.column("path").to_pylist() == desc.column("path").to_pylist()
    assert feats.column("keypoint").to_pylist() == desc.column("keypoint").to_pylist()
    manifest = json.loads((out / "manifest.json").read_text())
    model = PcaModel.from_json((out / manifest["files"]["model"][0]).read_text())
    raw = np.frombuffer(b"".join(desc.column("descriptor").to_pylist()), np.uint8).reshape(-1, 32)
    pca = np.array(feats.column("pca").to_pylist(), dtype=np.float32)
    assert pca.shape == (len(raw), 20)
    np.testing.assert_allclose(pca, model.transform(raw), atol=1e-3)

    # the incremental fit is close to the exact one on the same descriptors
    exact = exact_pca(moments(raw), 20)
    assert principal_angles(model.components[:5], exact.components[:5]).max() < 1.0
    assert abs(model.explained_variance_ratio.sum() - exact.explained_variance_ratio.sum()) < 1e-3
    assert manifest["counts"]["images"] == len(ref_rows)
    assert manifest["engine"] == "dask"
    assert set(manifest["timings"]) >= {"listing", "extract", "pca_fit", "transform_write"}
    _no_run_state(str(out))


def test_exact_pca_option(dask_client, sample_dir, tmp_path):
    out = tmp_path / "out"
    pipeline.run(
        RunConfig(input=str(sample_dir), output=str(out), pca_method="exact", n_components=8),
        dask_client,
    )
    desc = _read(out, "descriptors")
    raw = np.frombuffer(b"".join(desc.column("descriptor").to_pylist()), np.uint8).reshape(-1, 32)
    from sklearn.decomposition import PCA

    ref = PCA(8, svd_solver="full").fit(raw.astype(np.float64))
    manifest = json.loads((out / "manifest.json").read_text())
    model = PcaModel.from_json((out / manifest["files"]["model"][0]).read_text())
    assert model.method == "exact"
    assert principal_angles(model.components, ref.components_).max() < 0.01
    pca = np.array(_read(out, "features").column("pca").to_pylist())
    assert pca.shape[1] == 8


def test_output_readable_without_fruitdask(dask_client, sample_dir, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "out"
    pipeline.run(
        RunConfig(input=str(sample_dir), output=str(out), write_descriptors=False), dask_client
    )
    assert not (out / "descriptors").exists() or not list((out / "descriptors").iterdir())
    con = duckdb.connect()
    n_img, n_ok = con.execute(
        f"select count(*), count(*) filter (where status = 'ok') from '{out}/images/*.parquet'"
    ).fetchone()
    n_feat, dim = con.execute(
        f"select count(*), max(len(pca)) from '{out}/features/*.parquet'"
    ).fetchone()
    assert n_img == len(list(sample_dir.rglob("*.jpg"))) and n_ok > 0
    assert dim == 20 and n_feat > n_img
    schema = pq.read_schema(next((out / "features").glob("*.parquet")))
    assert schema.field("pca").type.value_type.bit_width == 32


def _write_corpus(root: Path) -> dict[str, str]:
    """Awkward files among good ones; returns expected status per relative path."""
    good = next(iter(sorted(root.rglob("*.jpg"))))
    data = good.read_bytes()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    d = root / "Training" / "Weird Things"
    d.mkdir(parents=True)
    cases = {
        "zero.jpg": (b"", "error"),
        "truncated.jpg": (data[:40], "error"),
        "text.jpg": (b"this is not an image\n" * 20, "error"),
        "rgba.png": (
            cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))[1].tobytes(),
            "ok",
        ),
        "sixteen.png": (
            cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)[
                1
            ].tobytes(),
            "ok",
        ),
        "gray.PNG": (
            cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))[1].tobytes(),
            "ok",
        ),
        "one.png": (cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes(), "no_keypoints"),
        "blank.jpg": (
            cv2.imencode(".jpg", np.full((100, 100, 3), 255, np.uint8))[1].tobytes(),
            "no_keypoints",
        ),
        "huge.jpg": (cv2.imencode(".jpg", cv2.resize(img, (4000, 3000)))[1].tobytes(), "error"),
    }
    out = {}
    for name, (blob, status) in cases.items():
        (d / name).write_bytes(blob)
        out[f"Training/Weird Things/{name}"] = status
    (d / "notes.txt").write_text("not listed: not an image extension")
    return out


def test_bad_files_never_stop_the_run(dask_client, sample_dir, tmp_path):
    import shutil

    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    expected = _write_corpus(src)
    out = tmp_path / "out"
    cfg = RunConfig.from_config(input=str(src), output=str(out), max_pixels=10_000_000)
    s = pipeline.run(cfg, dask_client)
    images = _read(out, "images").to_pandas().set_index("path")
    n_files = sum(1 for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png"))
    assert len(images) == n_files  # every listed file exactly one row; notes.txt not listed
    for path, status in expected.items():
        row = images.loc[path]
        assert row["status"] == status, (path, row["error"])
        if status == "error":
            assert row["error"] and "\n" not in row["error"]
        else:
            assert row["error"] is None or row["error"] != row["error"]
    assert "too large" in images.loc["Training/Weird Things/huge.jpg", "error"]
    assert s.images_error == 4
    # the good images are unaffected by their bad neighbours
    ref_rows, _ = _reference(sample_dir)
    for path, (status, n) in ref_rows.items():
        assert images.loc[path, "status"] == status and images.loc[path, "n_keypoints"] == n


def test_refuses_existing_output_and_overwrites_cleanly(dask_client, sample_dir, tmp_path):
    out = tmp_path / "out"
    cfg = RunConfig(input=str(sample_dir), output=str(out))
    first = pipeline.run(cfg, dask_client)
    with pytest.raises(OutputExistsError, match="already exists"):
        pipeline.run(cfg, dask_client)
    second = pipeline.run(cfg.with_(overwrite=True), dask_client)
    assert second.run_id != first.run_id
    assert (out / "_SUCCESS").read_text().strip() == second.run_id
    for table in ("images", "descriptors", "features"):
        names = [p.name for p in (out / table).iterdir()]
        assert names and all(second.run_id in n for n in names), names
    assert [p.name for p in (out / "model").iterdir()] == [f"pca-{second.run_id}.json"]


@pytest.mark.s3
def test_s3_to_s3_matches_local(dask_client, s3, sample_dir, tmp_path):
    bucket = s3.make_bucket()
    n = s3.upload_tree(sample_dir, f"{bucket}/fruits")
    cfg = RunConfig(
        input=f"{bucket}/fruits", output=f"{bucket}/out", storage_options=s3.storage_options
    )
    s = pipeline.run(cfg, dask_client)
    assert s.images == n
    desc = _read(f"{bucket}/out", "descriptors", s3.storage_options)
    _, ref_desc = _reference(sample_dir)
    assert _descriptor_multiset(desc) == collections.Counter(ref_desc)
    fs = s3.fs()
    assert fs.exists(f"{bucket.removeprefix('s3://')}/out/_SUCCESS")
    _no_run_state(f"{bucket}/out", s3.storage_options)
    # and an existing S3 output is refused too
    with pytest.raises(OutputExistsError):
        pipeline.run(cfg, dask_client)
