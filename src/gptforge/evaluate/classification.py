"""Classification metrics: accuracy, per-class precision / recall / F1, averages and the confusion matrix.

:func:`classification_report` gives a JSON-serialisable dict; the numbers agree with scikit-learn's
``classification_report(..., labels=labels, zero_division=0)`` and ``confusion_matrix``: a ratio whose
denominator is zero counts as 0, and the macro average is taken over every label given, including labels
that never occur. :func:`format_report` prints it as a table like scikit-learn's,
:func:`format_side_by_side` puts two reports (before and after fine-tuning) next to each other, and
:func:`plot_confusion_matrix` draws the matrix to a PNG.

Report layout (the NER report of :mod:`.ner` shares it, with ``micro`` in place of ``accuracy``)::

    {"labels": [...], "per_class": {label: {"precision", "recall", "f1", "support"}},
     "accuracy": float, "macro": {...}, "weighted": {...}, "support": int,
     "confusion_matrix": [[...], ...]}   # rows = true label, columns = predicted label
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

AVERAGES = ("micro", "macro", "weighted")
"""Average rows a report may have, in the order they are printed."""

_ROW_NAMES = {"micro": "micro avg", "macro": "macro avg", "weighted": "weighted avg"}


def _indices(values: Sequence[Any], labels: Sequence[str], what: str) -> np.ndarray:
    """Class indices of ``values``: label names, or integer indices into ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.empty(len(values), dtype=np.int64)
    for n, value in enumerate(values):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= value < len(labels):
                raise ValueError(f"{what}[{n}] = {value} is not a class index (there are {len(labels)} labels)")
            out[n] = value
        elif value in index:
            out[n] = index[value]
        else:
            raise ValueError(f"{what}[{n}] = {value!r} is not one of the labels {list(labels)}")
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = numerator.astype(np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def scores(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from true positives, predicted counts and true counts."""
    precision = _ratio(tp, n_pred)
    recall = _ratio(tp, n_true)
    # 2·tp / (predicted + true) is the harmonic mean of P and R without its 0/0 at P = R = 0.
    f1 = _ratio(2 * tp, n_pred + n_true)
    return precision, recall, f1


def averaged(precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
             support: np.ndarray) -> dict[str, dict[str, float | int]]:
    """Macro (plain mean over classes) and weighted (by support) averages."""
    total = int(support.sum())
    weights = support / total if total else np.zeros_like(precision)
    return {
        "macro": {"precision": float(precision.mean()) if len(precision) else 0.0,
                  "recall": float(recall.mean()) if len(recall) else 0.0,
                  "f1": float(f1.mean()) if len(f1) else 0.0, "support": total},
        "weighted": {"precision": float(precision @ weights), "recall": float(recall @ weights),
                     "f1": float(f1 @ weights), "support": total},
    }


def per_class(labels: Sequence[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
              support: np.ndarray) -> dict[str, dict[str, float | int]]:
    return {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)}


def classification_report(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 / support, macro and weighted averages, confusion matrix.

    ``y_true`` and ``y_pred`` hold label names or integer indices into ``labels``; ``labels`` fixes the
    order of the classes in the report and the matrix.
    """
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not len(y_true):
        raise ValueError("there are no examples to score")
    true = _indices(y_true, labels, "y_true")
    pred = _indices(y_pred, labels, "y_pred")
    k = len(labels)
    matrix = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    precision, recall, f1 = scores(tp, matrix.sum(axis=0), support)
    return {
        "labels": labels,
        "per_class": per_class(labels, precision, recall, f1, support),
        "accuracy": float(tp.sum() / len(true)),
        **averaged(precision, recall, f1, support),
        "support": len(true),
        "confusion_matrix": matrix.tolist(),
    }


# --------------------------------------------------------------------------------------------------
# Text
def _name_width(names: Sequence[str]) -> int:
    return max([len(name) for name in names] + [len("weighted avg")])


def format_report(report: Mapping[str, Any], digits: int = 2) -> str:
    """The report as a table: one row per class, then accuracy and the averages (like scikit-learn's)."""
    width = _name_width(report["labels"])
    col = max(9, digits + 6)
    lines = [f"{'':>{width}} {'precision':>{col}} {'recall':>{col}} {'f1-score':>{col}} {'support':>{col}}", ""]

    def row(name: str, m: Mapping[str, Any]) -> str:
        return (f"{name:>{width}} {m['precision']:>{col}.{digits}f} {m['recall']:>{col}.{digits}f} "
                f"{m['f1']:>{col}.{digits}f} {m['support']:>{col}}")

    lines += [row(label, report["per_class"][label]) for label in report["labels"]]
    lines.append("")
    if "accuracy" in report:
        lines.append(f"{'accuracy':>{width}} {'':>{col}} {'':>{col}} {report['accuracy']:>{col}.{digits}f} "
                     f"{report['support']:>{col}}")
    lines += [row(_ROW_NAMES[name], report[name]) for name in AVERAGES if name in report]
    return "\n".join(lines)


def format_confusion_matrix(report: Mapping[str, Any]) -> str:
    """The confusion matrix as text: rows are true labels, columns predicted ones."""
    labels = [str(label) for label in report["labels"]]
    matrix = report["confusion_matrix"]
    corner = "true \\ pred"
    width = max([len(label) for label in labels] + [len(corner)])
    col = max([len(label) for label in labels] + [len(str(v)) for r in matrix for v in r] + [3])
    lines = [f"{corner:>{width}} " + " ".join(f"{label:>{col}}" for label in labels)]
    lines += [f"{label:>{width}} " + " ".join(f"{v:>{col}}" for v in r) for label, r in zip(labels, matrix)]
    return "\n".join(lines)


def format_side_by_side(before: Mapping[str, Any], after: Mapping[str, Any], digits: int = 2) -> str:
    """Two reports of the same data next to each other, with the change in F1 (or accuracy) per row.

    Classes present in only one report (an entity type only one model predicted) show ``-`` on the other.
    """
    names = list(before["labels"]) + [label for label in after["labels"] if label not in before["labels"]]
    width = _name_width(names)
    col = digits + 4
    blank = "-"

    def cells(report: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> str:
        if metrics is None:
            return " ".join(f"{blank:>{col}}" for _ in range(3))
        return " ".join(f"{metrics[key]:>{col}.{digits}f}" for key in ("precision", "recall", "f1"))

    def delta(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str:
        return f"{blank:>{col + 1}}" if a is None or b is None else f"{b['f1'] - a['f1']:>+{col + 1}.{digits}f}"

    group = 3 * col + 2
    lines = [
        f"{'':>{width}} {'before':^{group}}   {'after':^{group}}",
        f"{'':>{width}} " + "   ".join(" ".join(f"{h:>{col}}" for h in ("prec", "rec", "f1")) for _ in range(2))
        + f" {'Δf1':>{col + 1}} {'support':>8}",
        "",
    ]

    def row(name: str, a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str:
        support = (b or a)["support"]
        return f"{name:>{width}} {cells(before, a)}   {cells(after, b)} {delta(a, b)} {support:>8}"

    for label in names:
        lines.append(row(label, before["per_class"].get(label), after["per_class"].get(label)))
    lines.append("")
    if "accuracy" in before and "accuracy" in after:
        pad = " ".join(f"{'':>{col}}" for _ in range(2))
        change = after["accuracy"] - before["accuracy"]
        lines.append(f"{'accuracy':>{width}} {pad} {before['accuracy']:>{col}.{digits}f}   {pad} "
                     f"{after['accuracy']:>{col}.{digits}f} {change:>+{col + 1}.{digits}f} {after['support']:>8}")
    for name in AVERAGES:
        if name in before and name in after:
            lines.append(row(_ROW_NAMES[name], before[name], after[name]))
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------
# Picture
def plot_confusion_matrix(report: Mapping[str, Any], path: str | Path, *, normalize: bool = False,
                          title: str | None = None) -> Path:
    """Draw the report's confusion matrix to a PNG (counts in each cell; ``normalize`` divides each row).

    Uses matplotlib's object API with the Agg canvas, so it needs no display and leaves pyplot's global
    state alone.
    """
    from matplotlib.figure import Figure

    labels = [str(label) for label in report["labels"]]
    counts = np.asarray(report["confusion_matrix"], dtype=np.float64)
    shown = _ratio(counts, counts.sum(axis=1, keepdims=True)) if normalize else counts
    k = len(labels)
    size = max(4.0, 0.6 * k + 2.5)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=max(shown.max(), 1e-9))
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalized)" if normalize else "confusion matrix"))
    if k <= 30:  # beyond that the numbers would overlap
        threshold = shown.max() / 2
        for i in range(k):
            for j in range(k):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if shown[i, j] > threshold else "black")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
