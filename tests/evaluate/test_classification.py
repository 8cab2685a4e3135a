"""classification_report against scikit-learn on fixed predictions; the tables and the confusion-matrix PNG."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.metrics import classification_report as sk_report
from sklearn.metrics import confusion_matrix as sk_confusion

from gptforge.evaluate.classification import (
    classification_report,
    format_confusion_matrix,
    format_report,
    format_side_by_side,
    plot_confusion_matrix,
)

LABELS = ["negative", "neutral", "positive", "sarcastic"]
Y_TRUE = ["negative", "negative", "neutral", "positive", "positive", "positive", "neutral", "negative",
          "positive", "neutral", "negative", "positive"]
CASES = {
    "mixed": ["negative", "neutral", "neutral", "positive", "negative", "positive", "positive", "negative",
              "positive", "neutral", "positive", "positive"],
    # "neutral" is never predicted (precision 0/0) and "sarcastic" never occurs (recall 0/0) nor is predicted
    "missing_classes": ["negative", "negative", "positive", "positive", "positive", "positive", "negative",
                        "negative", "positive", "negative", "negative", "positive"],
    # a predicted class that never occurs: its precision is 0, its support 0, and it still counts in macro
    "spurious_class": ["sarcastic", "negative", "neutral", "positive", "sarcastic", "positive", "neutral",
                       "negative", "positive", "neutral", "negative", "sarcastic"],
    "all_wrong": ["positive", "positive", "negative", "negative", "neutral", "neutral", "positive", "positive",
                  "negative", "negative", "neutral", "negative"],
}


def _compare(mine: dict, expected: dict) -> None:
    assert set(mine) == {"precision", "recall", "f1", "support"}
    assert mine["precision"] == pytest.approx(expected["precision"], abs=1e-12)
    assert mine["recall"] == pytest.approx(expected["recall"], abs=1e-12)
    assert mine["f1"] == pytest.approx(expected["f1-score"], abs=1e-12)
    assert mine["support"] == expected["support"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_sklearn(case):
    y_pred = CASES[case]
    report = classification_report(Y_TRUE, y_pred, LABELS)
    expected = sk_report(Y_TRUE, y_pred, labels=LABELS, output_dict=True, zero_division=0)
    assert report["labels"] == LABELS
    for label in LABELS:
        _compare(report["per_class"][label], expected[label])
    _compare(report["macro"], expected["macro avg"])
    _compare(report["weighted"], expected["weighted avg"])
    assert report["accuracy"] == pytest.approx(np.mean([t == p for t, p in zip(Y_TRUE, y_pred)]))
    assert report["support"] == len(Y_TRUE)
    assert report["confusion_matrix"] == sk_confusion(Y_TRUE, y_pred, labels=LABELS).tolist()


def test_integer_indices_equal_names_and_report_is_json():
    y_pred = CASES["mixed"]
    by_name = classification_report(Y_TRUE, y_pred, LABELS)
    by_index = classification_report([LABELS.index(y) for y in Y_TRUE], np.array([LABELS.index(y) for y in y_pred]),
                                     LABELS)
    assert by_index == by_name
    assert json.loads(json.dumps(by_name)) == by_name


def test_confusion_matrix_rows_are_true_labels():
    report = classification_report(["a", "a", "b"], ["b", "b", "b"], ["a", "b"])
    assert report["confusion_matrix"] == [[0, 2], [0, 1]]
    assert report["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["per_class"]["b"]["precision"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("y_true, y_pred, labels, message", [
    (["a"], ["a", "b"], ["a", "b"], "1 true labels but 2 predictions"),
    ([], [], ["a"], "no examples"),
    (["a"], ["c"], ["a", "b"], "y_pred[0] = 'c' is not one of the labels"),
    ([2], [0], ["a", "b"], "y_true[0] = 2 is not a class index"),
    (["a"], ["a"], ["a", "a"], "labels must be distinct"),
])
def test_bad_arguments(y_true, y_pred, labels, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        classification_report(y_true, y_pred, labels)


def test_format_report_rows_and_numbers():
    report = classification_report(Y_TRUE, CASES["mixed"], LABELS)
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    row = {line.split()[0]: line.split()[1:] for line in lines[2:6]}
    assert row["positive"] == [f"{report['per_class']['positive'][k]:.2f}" for k in ("precision", "recall", "f1")] \
        + [str(report["per_class"]["positive"]["support"])]
    accuracy = next(line for line in lines if line.strip().startswith("accuracy")).split()
    assert accuracy == ["accuracy", f"{report['accuracy']:.2f}", "12"]
    assert any(line.strip().startswith("macro avg") for line in lines)
    assert any(line.strip().startswith("weighted avg") for line in lines)
    assert "0.1234" not in text and f"{report['macro']['f1']:.3f}" in format_report(report, digits=3)


def test_side_by_side_shows_both_and_the_change():
    before = classification_report(Y_TRUE, CASES["all_wrong"], LABELS)
    after = classification_report(Y_TRUE, CASES["mixed"], LABELS)
    lines = format_side_by_side(before, after).splitlines()
    assert "before" in lines[0] and "after" in lines[0]
    positive = next(line for line in lines if line.strip().startswith("positive")).split()
    b, a = before["per_class"]["positive"], after["per_class"]["positive"]
    assert positive[1:4] == [f"{b[k]:.2f}" for k in ("precision", "recall", "f1")]
    assert positive[4:7] == [f"{a[k]:.2f}" for k in ("precision", "recall", "f1")]
    assert positive[7] == f"{a['f1'] - b['f1']:+.2f}" and positive[8] == "5"
    accuracy = next(line for line in lines if line.strip().startswith("accuracy")).split()
    assert accuracy[1:] == [f"{before['accuracy']:.2f}", f"{after['accuracy']:.2f}",
                            f"{after['accuracy'] - before['accuracy']:+.2f}", "12"]


def test_confusion_matrix_text_and_png(tmp_path):
    report = classification_report(["a", "a", "b"], ["b", "a", "b"], ["a", "b"])
    assert format_confusion_matrix(report).splitlines()[1:] == ["          a   1   1", "          b   0   1"]
    path = plot_confusion_matrix(report, tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_confusion_matrix(report, tmp_path / "norm.png", normalize=True, title="after")
    assert (tmp_path / "norm.png").stat().st_size > 1000
