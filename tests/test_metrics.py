"""fruitdask.metrics against scikit-learn: accuracy, per-class scores, the
confusion matrix, top-k accuracy and the majority baseline; the report."""

from __future__ import annotations

import numpy as np
import pytest

from fruitdask import metrics


def test_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(2)
    labels = ["a", "b", "c", "d"]
    y_true = list(rng.choice(labels, 200))
    y_pred = [t if rng.random() < 0.6 else str(rng.choice(labels)) for t in y_true]
    m = metrics.compute_metrics(y_true, y_pred, labels)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, lab in enumerate(labels):
        got = m["per_class"][lab]
        assert (got["precision"], got["recall"], got["support"]) == pytest.approx(
            (p[i], r[i], s[i])
        )
        assert got["f1"] == pytest.approx(f[i])
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert m["accuracy"] == pytest.approx(np.mean(np.array(y_true) == np.array(y_pred)))
    assert m["macro_f1"] == pytest.approx(np.mean(f))
    # an image that could not be classified counts as wrong, and lowers its class's recall
    m2 = metrics.compute_metrics(["a", "a"], ["a", None], ["a", "b"])
    assert m2["accuracy"] == 0.5 and m2["per_class"]["a"]["recall"] == 0.5
    assert m2["classified"] == 1 and m2["not_classified"] == {"a": 1}
    assert m2["accuracy_classified"] == 1.0


def test_top_k_accuracy_matches_sklearn():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(7)
    classes = ["a", "b", "c", "d", "e"]
    y_true = list(rng.choice(classes, 300))
    proba = rng.dirichlet(np.ones(5), 300)
    ok = np.ones(300, bool)
    for k in (1, 3):
        ref = top_k_accuracy_score(y_true, proba, k=k, labels=classes)
        assert metrics.top_k_accuracy(y_true, proba, classes, ok, k) == pytest.approx(ref)
    ok[:10] = False  # not classified: wrong whatever the probabilities say
    hits = [
        t in {classes[i] for i in np.argsort(-p)[:3]} for t, p in zip(y_true, proba, strict=True)
    ]
    want = np.mean([h and o for h, o in zip(hits, ok, strict=True)])
    assert metrics.top_k_accuracy(y_true, proba, classes, ok, 3) == pytest.approx(want)
    assert metrics.top_k_accuracy([], np.zeros((0, 5)), classes, ok[:0], 3) == 0.0


def test_baseline_is_the_training_majority():
    # the majority of the training counts, ties broken by name; scored on the test labels
    assert metrics.baseline({"b": 5, "a": 5, "c": 1}, ["a", "a", "b", "c"], "z") == ("a", 0.5)
    assert metrics.baseline({}, ["z", "y"], "z") == ("z", 0.5)
    assert metrics.baseline({"a": 1}, [], "a") == ("a", 0.0)


def test_report_and_picture():
    m = metrics.compute_metrics(["a", "b", "x"], ["a", "a", None], ["a", "b", "x"])
    model = {"run_id": "r1", "kind": "logreg", "C": 1.0, "k": 10, "color": False,
             "images_used": 4, "input": "in", "classes": ["a", "b"]}  # fmt: skip
    text = metrics.evaluation_markdown(model, "in", "Test", m, ("a", 1 / 3), {"encode": 1.5},
                                       "confusion.png", 0.5)  # fmt: skip
    assert "majority-class baseline" in text and f"{m['accuracy']:.3f}" in text
    assert "![confusion matrix](confusion.png)" in text
    assert "Labels the model was not trained on (always wrong): x." in text
    png = metrics.confusion_png(np.asarray(m["confusion"]), ["a", "b", "x"], "t")
    pytest.importorskip("matplotlib")
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
