"""Entity-level NER metrics with CoNLL semantics (those of ``conlleval`` and seqeval's default mode).

Tags are ``O`` or a prefix and a type: ``B-``, ``I-`` (and ``E-``, ``S-`` of IOBES). Chunking tolerates
IOB1 and IOB2: an ``I-`` after ``O``, or after a tag of another type, starts a new entity rather than being
dropped. An entity counts as correct only if its type and both of its boundaries match a true entity.
Precision, recall and F1 are reported per entity type, micro-averaged (over all entities), macro-averaged
(mean over types) and weighted by support; the types are those that occur in the true or the predicted
tags, as in seqeval, and a 0/0 ratio counts as 0.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .classification import averaged, format_report, per_class, scores

Entity = tuple[str, int, int]
"""(type, start, end): the entity covers tags[start:end] (``end`` is exclusive)."""

_PREFIXES = "BIES"


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in _PREFIXES and tag[1] == "-":
        return tag[0], tag[2:]
    raise ValueError(f"tag {tag!r} is neither O nor B-, I-, E- or S- followed by an entity type")


def uses_entity_tags(tags: Sequence[str]) -> bool:
    """Whether a tag set is an entity scheme (IOB / IOBES) that :func:`ner_report` can score.

    Part-of-speech tags such as ``NN`` are not; score those per token with a classification report.
    """
    try:
        prefixes = {_split_tag(tag)[0] for tag in tags}
    except ValueError:
        return False
    return bool(prefixes - {"O"})


def _ends(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """Whether an entity ends before the current tag (conlleval's endOfChunk)."""
    if prev_prefix in "ES":
        return True
    if prev_prefix in "BI" and prefix in "BSO":
        return True
    return prev_prefix != "O" and prev_type != type_


def _starts(prev_prefix: str, prefix: str, prev_type: str, type_: str) -> bool:
    """Whether an entity starts at the current tag (conlleval's startOfChunk)."""
    if prefix in "BS":
        return True
    if prefix in "IE" and prev_prefix in "ESO":
        return True
    return prefix != "O" and prev_type != type_


def extract_entities(tags: Sequence[str]) -> set[Entity]:
    """The entities of one tag sequence as (type, start, end) with ``end`` exclusive."""
    entities: set[Entity] = set()
    prev_prefix, prev_type, begin = "O", "", 0
    # A trailing "O" closes an entity that runs to the end of the sequence.
    for i, tag in enumerate([*tags, "O"]):
        prefix, type_ = _split_tag(tag)
        if _ends(prev_prefix, prefix, prev_type, type_):
            entities.add((prev_type, begin, i))
        if _starts(prev_prefix, prefix, prev_type, type_):
            begin = i
        prev_prefix, prev_type = prefix, type_
    return entities


def ner_report(true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision / recall / F1 per type, with micro, macro and weighted averages.

    Also gives ``token_accuracy``, the share of tags predicted exactly. The layout is that of
    :func:`~gptforge.evaluate.classification.classification_report` with ``micro`` in place of
    ``accuracy`` and no confusion matrix.
    """
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"{len(true_seqs)} true sequences but {len(pred_seqs)} predicted ones")
    true_entities: set[tuple[int, str, int, int]] = set()
    pred_entities: set[tuple[int, str, int, int]] = set()
    same_tags = n_tags = 0
    for n, (true, pred) in enumerate(zip(true_seqs, pred_seqs)):
        if len(true) != len(pred):
            raise ValueError(f"sequence {n} has {len(true)} true tags but {len(pred)} predicted ones")
        # The sequence number keeps entities of different sentences apart.
        true_entities |= {(n, *entity) for entity in extract_entities(true)}
        pred_entities |= {(n, *entity) for entity in extract_entities(pred)}
        same_tags += sum(t == p for t, p in zip(true, pred))
        n_tags += len(true)
    types = sorted({entity[1] for entity in true_entities | pred_entities})
    correct = true_entities & pred_entities

    def count(entities: set[tuple[int, str, int, int]]) -> np.ndarray:
        return np.array([sum(e[1] == t for e in entities) for t in types], dtype=np.int64)

    tp, n_pred, support = count(correct), count(pred_entities), count(true_entities)
    precision, recall, f1 = scores(tp, n_pred, support)
    micro_p, micro_r, micro_f1 = scores(np.array([len(correct)]), np.array([len(pred_entities)]),
                                        np.array([len(true_entities)]))
    return {
        "labels": types,
        "per_class": per_class(types, precision, recall, f1, support),
        "micro": {"precision": float(micro_p[0]), "recall": float(micro_r[0]), "f1": float(micro_f1[0]),
                  "support": len(true_entities)},
        **averaged(precision, recall, f1, support),
        "support": len(true_entities),
        "token_accuracy": same_tags / n_tags if n_tags else 0.0,
    }


def format_ner_report(report: Mapping[str, Any], digits: int = 2) -> str:
    """The NER report as a table (one row per entity type, then the averages) and the token accuracy."""
    return format_report(report, digits) + f"\n\ntoken accuracy: {report['token_accuracy']:.{digits + 2}f}"
