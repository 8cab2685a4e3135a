"""Entity-level NER metrics against seqeval (default mode) on tag sequences that trip up naive chunkers."""

from __future__ import annotations

import random

import pytest
from seqeval.metrics import classification_report as seq_report
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

from gptforge.evaluate.classification import format_side_by_side
from gptforge.evaluate.ner import extract_entities, format_ner_report, ner_report, uses_entity_tags

# Each case: (true sequences, predicted sequences).
CASES = {
    "i_without_b": (
        [["I-PER", "I-PER", "O", "I-LOC"], ["O", "I-ORG", "I-ORG"]],
        [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]],
    ),
    "adjacent_entities": (
        [["B-PER", "B-PER", "I-PER", "B-LOC", "I-LOC"], ["B-LOC", "I-LOC", "B-LOC"]],
        [["B-PER", "I-PER", "I-PER", "B-LOC", "I-LOC"], ["B-LOC", "I-LOC", "I-LOC"]],
    ),
    "entity_at_end": (
        [["O", "O", "B-MISC", "I-MISC"], ["O", "B-PER"]],
        [["O", "O", "B-MISC", "I-MISC"], ["O", "O"]],
    ),
    "type_switch": (
        [["B-PER", "I-PER", "I-LOC", "O"], ["B-ORG", "I-PER", "I-PER"]],
        [["B-PER", "I-PER", "I-PER", "O"], ["B-ORG", "I-ORG", "I-PER"]],
    ),
    "all_o_true": (
        [["O", "O", "O"], ["O"]],
        [["O", "B-PER", "O"], ["B-LOC"]],
    ),
    "all_o_both": (
        [["O", "O"], ["O"]],
        [["O", "O"], ["O"]],
    ),
    "iobes": (
        [["S-PER", "O", "B-LOC", "E-LOC"], ["B-ORG", "I-ORG", "E-ORG"]],
        [["S-PER", "O", "B-LOC", "I-LOC"], ["B-ORG", "E-ORG", "S-ORG"]],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_seqeval(case):
    true, pred = CASES[case]
    report = ner_report(true, pred)
    assert report["micro"]["precision"] == pytest.approx(precision_score(true, pred, zero_division=0))
    assert report["micro"]["recall"] == pytest.approx(recall_score(true, pred, zero_division=0))
    assert report["micro"]["f1"] == pytest.approx(f1_score(true, pred, zero_division=0))
    if not report["labels"]:
        return  # seqeval's report has no rows at all here
    expected = seq_report(true, pred, output_dict=True, zero_division=0)
    assert report["labels"] == sorted(k for k in expected if not k.endswith(" avg"))
    rows = [(t, t) for t in report["labels"]] + [(n, f"{n} avg") for n in ("micro", "macro", "weighted")]
    for mine, theirs in rows:
        got, want = (report["per_class"][mine] if mine in report["per_class"] else report[mine]), expected[theirs]
        assert got["precision"] == pytest.approx(want["precision"]), mine
        assert got["recall"] == pytest.approx(want["recall"]), mine
        assert got["f1"] == pytest.approx(want["f1-score"]), mine
        assert got["support"] == want["support"], mine


def test_chunking_rules():
    assert extract_entities(["I-PER", "I-PER", "O"]) == {("PER", 0, 2)}  # IOB1: I- opens an entity
    assert extract_entities(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert extract_entities(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}
    assert extract_entities(["O", "B-LOC", "I-LOC"]) == {("LOC", 1, 3)}  # runs to the end
    assert extract_entities(["S-PER", "I-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert extract_entities([]) == set() and extract_entities(["O"]) == set()


def test_random_sequences_chunk_like_seqeval():
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "I-ORG-X"]
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randint(0, 9))]
        assert extract_entities(seq) == {(t, s, e + 1) for t, s, e in get_entities(seq)}, seq


def test_partial_match_is_wrong():
    # The predicted PER ends one token early: no credit, one false positive and one false negative.
    report = ner_report([["B-PER", "I-PER", "I-PER"]], [["B-PER", "I-PER", "O"]])
    assert report["per_class"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["token_accuracy"] == pytest.approx(2 / 3)


def test_entities_do_not_run_across_sentences():
    report = ner_report([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]])
    assert report["support"] == 2 and report["micro"]["f1"] == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 true sequences but 1 predicted"):
        ner_report([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="sequence 1 has 2 true tags but 1 predicted"):
        ner_report([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="tag 'PER' is neither O nor"):
        extract_entities(["O", "PER"])


def test_uses_entity_tags():
    assert uses_entity_tags(["O", "B-PER", "I-PER"])
    assert not uses_entity_tags(["NN", "VB", "O"])
    assert not uses_entity_tags(["O"])


def test_format_ner_report_and_side_by_side():
    true, pred = CASES["type_switch"]
    report = ner_report(true, pred)
    text = format_ner_report(report)
    assert [line.split()[0] for line in text.splitlines()[2:5]] == ["LOC", "ORG", "PER"]
    micro = next(line for line in text.splitlines() if line.strip().startswith("micro avg")).split()
    assert micro[2:] == [f"{report['micro'][k]:.2f}" for k in ("precision", "recall", "f1")] + ["4"]
    assert f"token accuracy: {report['token_accuracy']:.4f}" in text
    # only the "after" model predicts MISC, which no true tag has: its "before" cells show "-"
    before = ner_report(true, [["B-PER", "I-PER", "O", "O"], ["O", "O", "O"]])
    after = ner_report(true, [["B-PER", "I-PER", "O", "B-MISC"], ["B-ORG", "O", "O"]])
    side = format_side_by_side(before, after)
    misc = next(line for line in side.splitlines() if line.strip().startswith("MISC")).split()
    assert misc[1:4] == ["-", "-", "-"] and misc[4:7] == ["0.00"] * 3 and misc[7:] == ["-", "0"]
    org = next(line for line in side.splitlines() if line.strip().startswith("ORG")).split()
    assert org[1:] == ["0.00"] * 3 + ["1.00", "1.00", "1.00", "+1.00", "1"]
    assert any(line.strip().startswith("micro avg") for line in side.splitlines())
