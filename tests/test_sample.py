"""The sample generator: layout, determinism, caching, ORB-friendliness."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from fruitdask import sample
from fruitdask.errors import OutputExistsError
from fruitdask.features import OrbParams, extract


def _digest(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def test_layout_and_determinism(tmp_path):
    a = sample.generate(tmp_path / "a", classes=3, per_class=6, seed=5, workers=2)
    sample.generate(tmp_path / "b", classes=3, per_class=6, seed=5, workers=1)
    sample.generate(tmp_path / "c", classes=3, per_class=6, seed=6, workers=1)
    assert (a.training, a.test, a.classes) == (18, 6, 3)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db  # same seed, same bytes, whatever the process count
    assert set(da) == set(dc) and da != dc  # same files, other instances
    assert "Training/Apple Braeburn/0_100.jpg" in da
    assert "Test/Apple Crimson Snow/1_100.jpg" in da
    img = cv2.imread(str(tmp_path / "a" / "Training" / "Apple Golden 1" / "3_100.jpg"))
    assert img.shape == (100, 100, 3)
    assert (img[0, 0] > 240).all()  # white background


def test_cache_and_refusals(tmp_path):
    root = tmp_path / "s"
    sample.generate(root, classes=2, per_class=3, seed=0)
    again = sample.generate(root, classes=2, per_class=3, seed=0)
    assert again.cached and again.training == 6
    with pytest.raises(OutputExistsError, match="other parameters"):
        sample.generate(root, classes=2, per_class=4, seed=0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("do not delete")
    with pytest.raises(OutputExistsError, match="not empty"):
        sample.generate(foreign, classes=2, per_class=3)
    assert (foreign / "thesis.txt").read_text() == "do not delete"
    with pytest.raises(ValueError, match="classes"):
        sample.generate(tmp_path / "x", classes=132)


def test_generate_total_is_exact(tmp_path):
    s = sample.generate_total(tmp_path / "t", 307, classes=131, seed=2)
    assert s.training + s.test == 307
    assert len(list((tmp_path / "t").rglob("*.jpg"))) == 307
    assert len(list((tmp_path / "t" / "Training").iterdir())) == 131


def test_class_names_are_fruits360():
    assert len(sample.CLASS_NAMES) == len(set(sample.CLASS_NAMES)) == 131
    assert sample.class_names(2) == ["Apple Braeburn", "Apple Crimson Snow"]


def test_keypoints_like_fruits360_and_classes_differ():
    """Typical images give 10-60 ORB keypoints; texture separates classes."""
    orb = OrbParams()
    counts = []
    means = {}
    for ci in range(0, 131, 3):
        feats = []
        for i in range(4):
            ok, buf = cv2.imencode(".jpg", sample.render(ci, i, seed=11))
            f = extract(buf.tobytes(), orb)
            counts.append(len(f.descriptors))
            feats.append(
                np.unpackbits(f.descriptors, axis=1).mean(0) if len(f.descriptors) else None
            )
        means[ci] = [x for x in feats if x is not None]
    assert 10 <= np.median(counts) <= 60
    assert np.mean(np.array(counts) == 0) < 0.05
    # nearest-class-mean on mean descriptor bits beats chance by far
    centroids = {ci: np.mean(v[:2], 0) for ci, v in means.items() if len(v) >= 3}
    hits = total = 0
    for ci, v in means.items():
        if ci not in centroids:
            continue
        for x in v[2:]:
            pred = min(centroids, key=lambda k: np.abs(centroids[k] - x).sum())
            hits += pred == ci
            total += 1
    assert hits / total > 5 / len(centroids)
