"""fruitdask.encode: the Dask stages of the bag of words against a plain loop
over the same kernels (and predict's single-image Encoder)."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pyarrow.dataset as ds
import pytest

from fruitdask import bovw, encode, features, io, pipeline
from fruitdask.config import RunConfig
from fruitdask.pca import PcaModel


@pytest.fixture(scope="module")
def features_run(sample_dir, dask_client, tmp_path_factory):
    """The feature pipeline on the Training split of a sample with one blank image."""
    root = tmp_path_factory.mktemp("bovw") / "fruits"
    shutil.copytree(sample_dir, root)
    blank = root / "Training" / sorted(p.name for p in (root / "Training").iterdir())[0]
    cv2.imwrite(str(blank / "blank.png"), np.full((100, 100, 3), 255, np.uint8))
    listing = io.list_files(str(root))
    train = listing[listing["split"] == "Training"].reset_index(drop=True)
    out = root.parent / "run"
    cfg = RunConfig(input=str(root), output=str(out), partition_size=20)
    pipeline.run(cfg, dask_client, listing=train)
    manifest = json.loads((out / "manifest.json").read_text())
    return root, out, manifest, train


def test_histograms_match_a_plain_loop(features_run, dask_client, tmp_path):
    root, out, manifest, train = features_run
    parts = encode.load_training_features(dask_client, str(out), manifest)
    assert parts.n_images == len(train)
    assert parts.n_keypoints == sum(parts.rows) > 0
    voc = bovw.fit_vocabulary(parts.sample_array(dask_client, 0), 12, seed=0)
    colors = encode.color_parts(dask_client, parts, str(root), train, None, 40_000_000)
    files = [f"histograms/part-{i:05d}-r1.parquet" for i in range(len(parts.parts))]
    results = encode.histogram_parts(
        dask_client, parts, voc.centers, str(tmp_path), files, colors=colors
    )
    table = ds.dataset([str(tmp_path / f) for f in files]).to_table().to_pandas()
    assert len(table) == len(train) and set(table["split"]) == {"Training"}
    # what the stage returns is what it wrote, part by part, in order
    assert table["path"].tolist() == [p for r in results for p in r["path"]]
    np.testing.assert_array_equal(
        np.stack(table["histogram"]), np.concatenate([r["histograms"] for r in results])
    )
    np.testing.assert_array_equal(
        np.stack(table["color"]), np.concatenate([r["colors"] for r in results])
    )
    assert sum(r["sq_dist_sum"] for r in results) == pytest.approx(
        bovw.inertia(
            np.concatenate([dask_client.gather(f)["x"] for f in parts.parts]), voc.centers
        ),
        rel=1e-9,
    )

    pca = PcaModel.from_json((out / manifest["files"]["model"][0]).read_text())
    assert parts.d == pca.n_components
    enc = bovw.Encoder(features.OrbParams(), pca, voc.centers)
    for row in table.itertuples():
        f = features.extract((root / row.path).read_bytes())
        h = np.asarray(row.histogram, np.float32)
        if len(f.descriptors) == 0:
            assert not row.has_keypoints and row.n_keypoints == 0 and not h.any()
            assert row.path.endswith("blank.png")
            continue
        words, _ = bovw.assign_words(pca.transform(f.descriptors), voc.centers)
        ref = np.bincount(words, minlength=12) / len(words)
        np.testing.assert_allclose(h, ref, rtol=1e-6)
        assert row.has_keypoints and row.n_keypoints == len(f.descriptors)
        # predict's fast path sees exactly what training saw
        np.testing.assert_array_equal(enc.encode([(root / row.path).read_bytes()]).histograms[0], h)
        ref_color = bovw.color_histogram(cv2.imread(str(root / row.path), cv2.IMREAD_COLOR))
        np.testing.assert_array_equal(np.asarray(row.color, np.float32), ref_color)
    assert (~table["has_keypoints"]).sum() == 1


def test_encode_listing_matches_the_encoder(features_run, dask_client):
    root, out, manifest, train = features_run
    pca = PcaModel.from_json((out / manifest["files"]["model"][0]).read_text())
    centers = np.random.default_rng(0).normal(0, 100, (9, pca.n_components)).astype(np.float32)
    enc = bovw.Encoder(features.OrbParams(), pca, centers, color=True)
    listing = io.list_files(str(root))
    rows = listing[listing["split"] == "Test"].reset_index(drop=True)
    got = encode.encode_listing(dask_client, str(root), rows, enc, partition_size=5)
    ref = enc.encode([(root / p).read_bytes() for p in rows["path"]])
    np.testing.assert_array_equal(got.histograms, ref.histograms)
    assert got.colors is not None and ref.colors is not None
    np.testing.assert_array_equal(got.colors, ref.colors)
    assert got.status == ref.status
