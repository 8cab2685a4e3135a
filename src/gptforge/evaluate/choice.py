"""Multiple-choice accuracy: does the model find the right answer the most likely continuation?

The data is JSON lines, one question each::

    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "answer": 0}

``answer`` is the right choice's index (from 0) or its text. Each choice is scored after the context by
:func:`gptforge.generate.score` (the context prefilled once, the choices in one batched forward, lm-eval's
tokenization: whitespace ending the context moves onto the choice). Two metrics, as EleutherAI's
lm-evaluation-harness reports them for multiple-choice tasks:

- ``acc``: the share of questions whose right choice has the highest total log-probability;
- ``acc_norm``: the same with each total divided by the choice's length in bytes (UTF-8; lm-eval divides by
  characters, which is the same for ASCII), so long choices are not penalised for their length.

A tie goes to the first of the tied choices (as ``numpy.argmax`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import DataError, GptforgeError
from ..fsutil import jsonl_objects, read_utf8
from ..generate.score import score
from ..tokenizer import Tokenizer, check_text

HEADLINE = ("acc", "acc_norm")

__all__ = ["HEADLINE", "ChoiceExample", "evaluate_choice", "evaluate_choice_checkpoint", "format_choice_report",
           "read_choice_data"]


@dataclass(frozen=True)
class ChoiceExample:
    """A question: the context, its choices and the right one's index."""

    context: str
    choices: tuple[str, ...]
    answer: int
    line: int = 0
    """The line of the data file it came from."""


def read_choice_data(path: str | Path) -> list[ChoiceExample]:
    """The questions of a JSON-lines file (see the module's doc); one DataError naming the file and line."""
    path = Path(path)
    examples = []
    for number, obj in jsonl_objects(read_utf8(path, "data file", DataError).splitlines(), f"data file {path}",
                                     DataError):
        examples.append(_example(obj, f"data file {path} line {number}", number))
    if not examples:
        raise DataError(f"data file {path} holds no questions (JSON lines with 'context', 'choices' and 'answer')")
    return examples


def _example(obj: dict[str, Any], where: str, number: int) -> ChoiceExample:
    context, choices, answer = obj.get("context"), obj.get("choices"), obj.get("answer")
    if not isinstance(context, str):
        raise DataError(f"{where} has no 'context' (a string, possibly empty)")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: 'choices' must be a list of at least two strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise DataError(f"{where}: choice {i} must be a non-empty string, got {choice!r}")
        check_text(choice, f"{where}: choice {i}")
    check_text(context, f"{where}: the context")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise DataError(f"{where}: 'answer' must be the right choice's index (from 0) or its text, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' {answer} is not a choice's index (0 to {len(choices) - 1})")
        index = answer
    else:
        matches = [i for i, choice in enumerate(choices) if choice == answer]
        if len(matches) != 1:
            raise DataError(f"{where}: 'answer' {answer!r} is " + ("not one of the choices" if not matches else
                            f"choice {' and '.join(map(str, matches))}; give its index instead"))
        index = matches[0]
    return ChoiceExample(context, tuple(choices), index, number)


def evaluate_choice(model, tokenizer: Tokenizer, examples: Sequence[ChoiceExample], *,
                    batch_size: Optional[int] = None, where: str = "the data") -> dict[str, Any]:
    """``{"metrics": {acc, acc_norm}, "report": counts and each question's prediction}`` on ``examples``.
    ``batch_size``: most choices in one forward (None: as many as fit). ``where`` names the data in errors."""
    predictions = []
    correct = correct_norm = 0
    for ex in examples:
        try:
            scores = score(model, tokenizer, ex.context, ex.choices, batch_size=batch_size)
        except GptforgeError as exc:
            raise DataError(f"{where} line {ex.line}: {exc}") from None
        totals = [s.logprob for s in scores]
        per_byte = [s.logprob / s.bytes for s in scores]
        best, best_norm = _first_max(totals), _first_max(per_byte)
        correct += best == ex.answer
        correct_norm += best_norm == ex.answer
        predictions.append({"line": ex.line, "answer": ex.answer, "predicted": best, "predicted_norm": best_norm,
                            "logprobs": totals, "tokens": [s.tokens for s in scores]})
    n = len(examples)
    metrics = {"acc": correct / n if n else None, "acc_norm": correct_norm / n if n else None}
    report = {**metrics, "examples": n, "correct": correct, "correct_norm": correct_norm,
              "choices": sum(len(ex.choices) for ex in examples), "predictions": predictions}
    return {"metrics": metrics, "report": report}


def _first_max(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_choice_checkpoint(checkpoint: str | Path, data_file: str | Path, *, device: str = "auto",
                               batch_size: Optional[int] = None) -> dict[str, Any]:
    """``gptforge evaluate --task choice``: ``{"task": "choice", "checkpoint", "metrics", "report"}``. The data is
    read (and refused) before the model loads."""
    from ..checkpoint import load_for_inference
    from ..config import InferenceConfig

    examples = read_choice_data(data_file)
    ckpt = load_for_inference(InferenceConfig(checkpoint=str(checkpoint), device=device).validate())
    result = evaluate_choice(ckpt.model, ckpt.tokenizer, examples, batch_size=batch_size,
                             where=f"data file {data_file}")
    return {"task": "choice", "checkpoint": str(ckpt.path), **result}


def format_choice_report(report: dict[str, Any]) -> str:
    """One line: how many questions each metric got right."""
    return (f"{report['correct']}/{report['examples']} right by total log-probability, "
            f"{report['correct_norm']}/{report['examples']} per byte ({report['choices']} choices scored)")
