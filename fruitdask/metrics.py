"""Scoring a classifier: metrics, the confusion matrix as a picture, the report.

Pure: label sequences and arrays in, numbers, PNG bytes and Markdown out.
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["baseline", "compute_metrics", "confusion_png", "evaluation_markdown", "top_k_accuracy"]


def compute_metrics(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix.

    Parameters
    ----------
    y_true : sequence of str
    y_pred : sequence of str or None
        None = not classified (no keypoints): counted as wrong.
    labels : sequence of str
        Row/column order of the confusion matrix (every true and predicted label).

    Returns
    -------
    dict
        ``accuracy``, ``classified``, ``accuracy_classified``, ``macro_precision``,
        ``macro_recall``, ``macro_f1``, ``per_class`` (label -> precision, recall,
        f1, support), ``confusion`` (list of lists, rows = true labels) and
        ``not_classified`` (per true label).
    """
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    n = len(labels)
    cm = np.zeros((n, n), np.int64)
    missing = np.zeros(n, np.int64)
    correct = 0
    classified = 0
    for t, p in zip(y_true, y_pred, strict=True):
        if p is None:
            missing[index[t]] += 1
            continue
        classified += 1
        cm[index[t], index[p]] += 1
        correct += int(t == p)
    support = cm.sum(1) + missing
    predicted = cm.sum(0)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    total = len(y_true)
    return {
        "images": total,
        "accuracy": correct / total if total else 0.0,
        "classified": classified,
        "accuracy_classified": correct / classified if classified else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            lab: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, lab in enumerate(labels)
        },
        "confusion": cm.tolist(),
        "not_classified": {lab: int(missing[i]) for i, lab in enumerate(labels) if missing[i]},
    }


def confusion_png(cm: np.ndarray, labels: Sequence[str], title: str) -> bytes | None:
    """A row-normalised confusion matrix as PNG bytes; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    n = len(labels)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, np.maximum(rows, 1), dtype=np.float64)
    size = min(40.0, max(6.0, 0.28 * n + 3))
    # Figure + Agg canvas, not pyplot: no global state, no GUI backend in a library.
    fig = Figure(figsize=(size, size * 0.9), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fs = max(4.0, min(9.0, 300.0 / max(n, 1)))
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=fs)
    ax.set_yticklabels(labels, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=fs,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def evaluation_markdown(
    model: dict[str, Any],
    input_url: str,
    split: str,
    m: dict[str, Any],
    baseline: tuple[str, float],
    timings: dict[str, float],
    png: str | None,
    top3: float,
) -> str:
    """The evaluation report in Markdown.

    Parameters
    ----------
    model : dict
        ``run_id``, ``kind``, ``C``, ``k``, ``color``, ``images_used``, ``input``, ``classes``.
    png : str or None
        The confusion matrix picture's file name, None without matplotlib.
    """
    classes = set(model.get("classes", ()))
    lines = [
        "# fruitdask evaluation",
        "",
        f"- model: {model.get('run_id', '?')} ({model.get('kind')}, C={model.get('C')}, "
        f"{model.get('k')} visual words, colour features {'on' if model.get('color') else 'off'}), "
        f"trained on {model.get('images_used', '?')} images of {model.get('input', '?')}",
        f"- evaluated on: {input_url} ({split}), {m['images']} images, "
        f"{m['images'] - m['classified']} without keypoints (counted as wrong)",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| this model | **{_fmt(m['accuracy'])}** |",
        f'| majority-class baseline (always "{baseline[0]}") | {_fmt(baseline[1])} |',
        f"| this model, top-3 | {_fmt(top3)} |",
        f"| this model, images with keypoints only | {_fmt(m['accuracy_classified'])} |",
        "",
        f"Macro precision {_fmt(m['macro_precision'])}, macro recall {_fmt(m['macro_recall'])}, "
        f"macro F1 {_fmt(m['macro_f1'])}.",
        "",
    ]
    if png:
        lines += [f"![confusion matrix]({png})", ""]
    else:
        lines += ["(confusion.png needs matplotlib: `pip install fruitdask[plot]`)", ""]
    lines += [
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for lab, r in m["per_class"].items():
        if r["support"] == 0 and lab not in classes:
            continue
        lines.append(
            f"| {lab} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} "
            f"| {r['support']} |"
        )
    unknown = [lab for lab, r in m["per_class"].items() if r["support"] and lab not in classes]
    if unknown:
        lines += ["", f"Labels the model was not trained on (always wrong): {', '.join(unknown)}."]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def baseline(
    class_counts: dict[str, int], y_true: Sequence[str], fallback: str
) -> tuple[str, float]:
    """The majority class of the training counts, and the accuracy of always answering it."""
    majority = (
        max(sorted(class_counts), key=lambda k: class_counts[k]) if class_counts else fallback
    )
    return majority, float(np.mean([t == majority for t in y_true])) if len(y_true) else 0.0


def top_k_accuracy(
    y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str], ok: np.ndarray, k: int = 3
) -> float:
    """Fraction of images whose true label is among the ``k`` most probable
    classes (images not classified count as wrong)."""
    if not len(y_true):
        return 0.0
    names = np.asarray(classes, dtype=object)
    top = np.argsort(-proba, axis=1)[:, :k]
    hits = [bool(o) and t in set(names[i]) for t, i, o in zip(y_true, top, ok, strict=True)]
    return float(np.mean(hits))
