"""`gptforge evaluate --task grounded`: answer held-out questions from a knowledge base, then score the answers.

Each question is one user turn. With a knowledge base its prompt is built exactly as ``gptforge chat
--knowledge`` builds it (:meth:`gptforge.knowledge.grounding.Grounding.prepare`: the passages retrieved for
the question in the chat template's context slot, within the context budget); without one, the prompt is the
plain chat prompt, which is how a model fine-tuned on the FAQ alone (the memorising baseline) is asked.
Answers are decoded greedily by the one decode engine (:func:`gptforge.generate.generate_ids`), in batches
(greedy tokens do not depend on the batch), and scored by :func:`gptforge.evaluate.grounded.score_grounded`:
exact match, token F1, and the share of answers whose sources include the right passage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import GenerateConfig, GroundingConfig, InferenceConfig
from ..checkpoint import load_for_inference, task_of
from ..errors import ConfigError
from ..evaluate.grounded import GroundedExample, load_grounded_examples, score_grounded
from ..generate import generate_ids
from ..tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, encode_chat_prompt
from .grounding import Grounding
from .types import Hit

log = logging.getLogger(__name__)

__all__ = ["GroundedAnswers", "answer_questions", "evaluate_grounded", "DEFAULT_ANSWER_TOKENS"]

DEFAULT_ANSWER_TOKENS = 32
"""Most tokens of a generated answer: the reference answers are short, and the rest of the context is the
passages'."""


@dataclass
class GroundedAnswers:
    """The generated answers, and for each the hits whose passages were in its prompt (best first)."""

    answers: list[str]
    sources: list[list[Hit]]
    refused: list[bool]


def answer_questions(model, tokenizer: Tokenizer, questions: Sequence[str], *, grounding: Optional[Grounding] = None,
                     template: str = DEFAULT_CHAT_TEMPLATE, max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
                     batch_size: int = 16) -> GroundedAnswers:
    """Greedy answers to ``questions`` (one user turn each), grounded in ``grounding`` when given."""
    block = model.config.block_size
    if not 0 < max_new_tokens < block:
        raise ConfigError(f"max_new_tokens must be between 1 and {block - 1} (the model's context is {block} "
                          f"tokens), got {max_new_tokens}")
    prompts: list[Optional[list[int]]] = []
    answers: list[str] = []
    sources: list[list[Hit]] = []
    refused: list[bool] = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        if grounding is not None:
            prepared = grounding.prepare(tokenizer, messages, template=template, context_length=block,
                                         max_new_tokens=max_new_tokens)
            if prepared.refusal is not None:
                prompts.append(None)
                answers.append(prepared.refusal)
                sources.append([])
                refused.append(True)
                continue
            ids, hits = prepared.ids, list(prepared.hits)
        else:
            ids, hits = encode_chat_prompt(tokenizer, messages, template), []
        if len(ids) + max_new_tokens > block:
            raise ConfigError(f"the question {question[:60]!r} takes {len(ids)} tokens with the chat template, "
                              f"which with max_new_tokens {max_new_tokens} does not fit the model's context of "
                              f"{block} tokens; shorten it or lower max_new_tokens")
        prompts.append(ids)
        answers.append("")
        sources.append(hits)
        refused.append(False)
    todo = [i for i, ids in enumerate(prompts) if ids is not None]
    config = GenerateConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        results = generate_ids(model, [prompts[i] for i in rows], config, tokenizer.eos_id, tokenizer=tokenizer)
        for i, completions in zip(rows, results):
            answers[i] = completions[0].text.strip()
    return GroundedAnswers(answers, sources, refused)


def evaluate_grounded(checkpoint: str | Path, data_file: str | Path, *, grounding: Optional[GroundingConfig] = None,
                      device: str = "auto", max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
                      batch_size: int = 16) -> dict[str, Any]:
    """Answer the questions of ``data_file`` with ``checkpoint`` (grounded in ``grounding.knowledge`` when set)
    and score them: ``{"task": "grounded", "checkpoint", "knowledge", "metrics", "report"}``.

    The metrics are exact match, token F1 and (with a knowledge base) the source hit share; the report adds
    each question's answer and sources. The library call behind ``gptforge evaluate --task grounded``.
    """
    examples: list[GroundedExample] = load_grounded_examples(data_file)
    loaded = None
    if grounding is not None and grounding.knowledge is not None:
        loaded = Grounding.load(grounding)  # a bad index fails before the model loads
    ckpt = load_for_inference(InferenceConfig(checkpoint=str(checkpoint), device=device).validate())
    if loaded is not None:
        loaded.retriever.check_tokenizer(ckpt.tokenizer)
    template = task_of(ckpt.config)["chat_template"] or DEFAULT_CHAT_TEMPLATE
    result = answer_questions(ckpt.model, ckpt.tokenizer, [ex.question for ex in examples], grounding=loaded,
                              template=template, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scored = score_grounded(examples, result.answers, result.sources if loaded is not None else
                            [[] for _ in examples])
    if loaded is None:  # no retrieval: there are no sources to check
        scored["metrics"]["source_hit"] = None
        scored["report"]["source_hit"] = None
        for row in scored["report"]["per_question"]:
            row["source_hit"] = None
    scored["report"]["refused"] = sum(result.refused)
    for row, was_refused in zip(scored["report"]["per_question"], result.refused):
        row["refused"] = was_refused
    return {"task": "grounded", "checkpoint": str(ckpt.path),
            "knowledge": None if loaded is None else str(grounding.knowledge), **scored}
