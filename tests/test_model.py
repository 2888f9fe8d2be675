"""fruitdask.model: the classifier against scikit-learn, and the one-file
``fruitdask-model/1`` format (round trip and refusals, in this process; hostile
files through ``fruitdask predict`` are in test_model_hostile.py)."""

from __future__ import annotations

import io as _io
import json
import zipfile

import numpy as np
import pytest

from fruitdask import model as fm
from fruitdask.errors import InputError, ModelError
from fruitdask.model import Model


@pytest.mark.parametrize("n_classes", [2, 5])
def test_linear_classifier_matches_sklearn(n_classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(n_classes)
    x = rng.random((120, 9))
    y = np.array([f"c{i % n_classes}" for i in range(120)], dtype=object)
    ours, info = fm.fit_classifier(x, y, c=3.0)
    ref = LogisticRegression(C=3.0, max_iter=2000, random_state=0).fit(x, y)
    assert list(ours.classes) == list(ref.classes_)
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x), rtol=1e-10)
    assert info["converged"]


def test_one_label_is_refused():
    with pytest.raises(ModelError, match="at least 2 labels"):
        fm.fit_classifier(np.ones((4, 2)), ["a"] * 4, c=1.0)
    assert issubclass(ModelError, InputError) and ModelError("x").exit_code == 2


def test_feature_maps():
    h = np.array([[0.25, 0.75, 0.0]], np.float32)
    np.testing.assert_allclose(fm.design_matrix(h, None, "sqrt"), np.sqrt(h))
    x = fm.design_matrix(h, np.array([[1.0, 0.0]]), "identity")
    assert x.shape == (1, 5) and x.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(fm.feature_map(h, "sqrt"), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ModelError, match="unknown feature map"):
        fm.feature_map(h, "cube")


def _rewrite(data: bytes, **members: bytes) -> bytes:
    src = zipfile.ZipFile(_io.BytesIO(data))
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in src.namelist():
            z.writestr(name, members.get(name.replace(".", "_"), src.read(name)))
    return buf.getvalue()


def test_model_file_round_trip(tiny_model):
    m = tiny_model
    data = m.to_bytes()
    with zipfile.ZipFile(_io.BytesIO(data)) as z:
        assert sorted(z.namelist()) == ["arrays.npz", "model.json", "pca.json"]
        assert json.loads(z.read("model.json"))["format"] == fm.FORMAT
    back = Model.from_bytes(data)
    np.testing.assert_array_equal(back.encoder.centers, m.encoder.centers)
    np.testing.assert_array_equal(back.classifier.coef, m.classifier.coef)
    np.testing.assert_array_equal(back.encoder.pca.components, m.encoder.pca.components)
    assert back.encoder.orb == m.encoder.orb and back.classes == ("a", "b", "c")
    assert back.kind == m.kind and back.meta == m.meta
    x = np.random.default_rng(1).random((4, 6))
    np.testing.assert_array_equal(back.classifier.predict_proba(x), m.classifier.predict_proba(x))


def test_model_file_refusals(tiny_model):
    data = tiny_model.to_bytes()
    doc = json.loads(zipfile.ZipFile(_io.BytesIO(data)).read("model.json"))
    doc["format"] = "fruitdask-model/2"
    with pytest.raises(ModelError, match="not supported"):
        Model.from_bytes(_rewrite(data, model_json=json.dumps(doc).encode()))
    # arrays that would need pickle to load are refused, not unpickled
    evil = _io.BytesIO()
    np.savez(evil, centers=np.array([object()], dtype=object), coef=np.zeros(1), intercept=[0])
    with pytest.raises(ModelError, match="damaged"):
        Model.from_bytes(_rewrite(data, arrays_npz=evil.getvalue()))
    with pytest.raises(ModelError, match="not a fruitdask model"):
        Model.from_bytes(b"PK\x03\x04 truncated")


def test_the_model_cannot_raise_the_bomb_guard(tiny_model):
    from dataclasses import replace

    from fruitdask.features import DEFAULT_MAX_PIXELS, MAX_PIXELS_CAP

    enc = replace(
        tiny_model.encoder, orb=replace(tiny_model.encoder.orb, max_pixels=MAX_PIXELS_CAP)
    )
    data = replace(tiny_model, encoder=enc).to_bytes()
    assert Model.from_bytes(data).encoder.orb.max_pixels == DEFAULT_MAX_PIXELS
    assert Model.from_bytes(data, max_pixels=1000).encoder.orb.max_pixels == 1000
    # a model may lower it
    enc = replace(enc, orb=replace(enc.orb, max_pixels=500))
    assert (
        Model.from_bytes(replace(tiny_model, encoder=enc).to_bytes()).encoder.orb.max_pixels == 500
    )
