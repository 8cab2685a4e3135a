"""Grounded answers: retrieve passages for a conversation and put them into the prompt's context slot.

    grounding = Grounding.load(GroundingConfig(knowledge="kb/"), tokenizer)   # the index, checked
    prepared = grounding.prepare(tokenizer, messages, template=template, context_length=block,
                                 max_new_tokens=None)
    if prepared.refusal is not None:      # knowledge_only, and nothing reached min_score
        reply = prepared.refusal
    else:
        ...generate from prepared.ids...; sources = [hit.to_source() for hit in prepared.hits]

One function, :func:`prepare_grounded` (``Grounding.prepare``), serves ``gptforge chat``, ``gptforge serve``
and ``gptforge evaluate --task grounded``: the query is the last user turns (:func:`retrieval_query`), the
passages are the retriever's best hits that reach ``min_score`` (:func:`select_hits`), and
:func:`grounded_prompt` renders them through the chat template's ``context`` slot
(:data:`gptforge.tokenizer.CONTEXT_ROLE`) within the context budget, cutting passages before the
conversation: whole lower-ranked passages go first, then the last one kept is cut short. Grounded
fine-tuning renders its examples with the same tokenizer functions (:func:`passage_texts` formats the
passages), so training and inference prompts are the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from ..config import DEFAULT_MAX_NEW_TOKENS, GroundingConfig
from ..errors import ConfigError
from ..tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, encode_grounded_prompt, format_passage
from .types import Hit, Retriever

log = logging.getLogger(__name__)

__all__ = ["ContextRetriever", "GroundedPrompt", "Grounding", "grounded_prompt", "passage_texts", "prepare_grounded",
           "reply_reserve", "retrieval_query", "select_hits", "context_retriever"]


@dataclass
class GroundedPrompt:
    """A turn's prompt with the passages in it, or the refusal that replaces the model's reply."""

    ids: list[int]
    """The prompt's token ids (the chat with its context slot, then the opening of an assistant reply)."""
    hits: list[Hit] = field(default_factory=list)
    """The hits whose passages are in the prompt, best first (the last one maybe cut short): the sources."""
    refusal: Optional[str] = None
    """With knowledge_only and no hit reaching min_score: the reply to give instead of running the model."""
    budget: int = 0
    """Tokens the prompt may take: the context length less the room kept for the reply."""
    retrieved: list[Hit] = field(default_factory=list)
    """Every hit that reached min_score, before fitting (``hits`` is a prefix of it)."""

    @property
    def fits(self) -> bool:
        """False when the conversation alone, without any passage, is longer than ``budget``."""
        return len(self.ids) <= self.budget

    @property
    def sources(self) -> list[dict]:
        """The hits in the prompt as the CLI and the API report them: id, title, score, passage."""
        return [hit.to_source() for hit in self.hits]


def reply_reserve(max_new_tokens: Optional[int], context_length: int) -> int:
    """Tokens of the context kept free for the reply: ``max_new_tokens`` when set, else half the context (at
    most 256), as :class:`gptforge.chat.ChatSession` keeps."""
    if max_new_tokens is not None:
        if max_new_tokens >= context_length:
            raise ConfigError(f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in the model's "
                              f"context of {context_length} tokens; lower it")
        return max(1, max_new_tokens)
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, context_length // 2))


def retrieval_query(messages: Sequence[Mapping[str, str]], turns: int = 2) -> str:
    """The retrieval query of a conversation: its last ``turns`` user messages, oldest first, one per line."""
    users = [m["content"] for m in messages if isinstance(m, Mapping) and m.get("role") == "user"
             and isinstance(m.get("content"), str) and m["content"].strip()]
    return "\n".join(users[-turns:]) if turns > 0 else ""


def select_hits(hits: Sequence[Hit], min_score: float = 0.0) -> list[Hit]:
    """The hits worth putting into a prompt, best first: those scoring at least ``min_score`` and above 0."""
    return sorted((h for h in hits if h.score > 0 and h.score >= min_score), key=lambda h: -h.score)


def passage_texts(hits: Sequence[Hit]) -> list[str]:
    """The passages of ``hits`` as the context slot shows them (:func:`gptforge.tokenizer.format_passage`)."""
    return [format_passage(hit.passage.text, hit.passage.title) for hit in hits]


def grounded_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], hits: Sequence[Hit], *,
                    template: str = DEFAULT_CHAT_TEMPLATE, context_length: int,
                    max_new_tokens: Optional[int] = None) -> GroundedPrompt:
    """The prompt of ``messages`` (ending with the user's turn) with ``hits`` (best first) in the template's
    context slot, within ``context_length`` less the reply's room (:func:`reply_reserve`).

    Passages are cut before the conversation: the lowest-ranked whole passages are dropped, then the last
    one kept is cut short. When the conversation alone does not fit, no passage is kept and the result's
    ``fits`` is False: dropping old turns (or refusing) is the caller's call.
    """
    budget = context_length - reply_reserve(max_new_tokens, context_length)
    ids, kept = encode_grounded_prompt(tokenizer, messages, passage_texts(hits), template, budget=budget)
    if len(kept) < len(hits):
        log.debug("%d of %d passages fit the context of %d tokens", len(kept), len(hits), context_length)
    return GroundedPrompt(ids, list(hits[:len(kept)]), budget=budget, retrieved=list(hits))


def prepare_grounded(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], retriever: Retriever,
                     config: GroundingConfig, *, template: str = DEFAULT_CHAT_TEMPLATE, context_length: int,
                     max_new_tokens: Optional[int] = None) -> GroundedPrompt:
    """Retrieve passages for the last user turns and build the grounded prompt (:func:`grounded_prompt`);
    with ``config.knowledge_only`` and no hit reaching ``config.min_score``, a result whose ``refusal`` is
    ``config.refusal`` (and whose ids are the plain chat's, for counting)."""
    query = retrieval_query(messages, config.query_turns)
    hits = select_hits(retriever.search(query, k=config.passages), config.min_score) if query else []
    if not hits and config.knowledge_only:
        budget = context_length - reply_reserve(max_new_tokens, context_length)
        ids, _ = encode_grounded_prompt(tokenizer, messages, [], template, budget=budget)
        log.info("no passage reaches min_score %s for %r: refusing", config.min_score, query)
        return GroundedPrompt(ids, [], refusal=config.refusal, budget=budget)
    return grounded_prompt(tokenizer, messages, hits, template=template, context_length=context_length,
                           max_new_tokens=max_new_tokens)


class ContextRetriever:
    """For grounded fine-tuning: an example's messages → the passages of its context slot, retrieved and
    formatted as at inference (the last user turns as the query, hits reaching min_score, best first)."""

    def __init__(self, retriever: Retriever, config: GroundingConfig):
        self.retriever, self.config = retriever, config

    @property
    def settings(self) -> dict:
        """What a grounded run records in its task section: the knowledge base and how it was queried."""
        c = self.config
        return {"knowledge": c.knowledge, "passages": c.passages, "min_score": c.min_score,
                "query_turns": c.query_turns}

    def __call__(self, messages: Sequence[Mapping[str, str]]) -> list[str]:
        query = retrieval_query(messages, self.config.query_turns)
        if not query:
            return []
        return passage_texts(select_hits(self.retriever.search(query, k=self.config.passages), self.config.min_score))

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """The knowledge base's own check that it was built for ``tokenizer`` (a retriever without one passes)."""
        check = getattr(self.retriever, "check_tokenizer", None)
        if check is not None:
            check(tokenizer)


def context_retriever(retriever: Retriever, config: GroundingConfig) -> ContextRetriever:
    """The ``retrieve`` function :func:`gptforge.finetune.finetune` takes for grounded fine-tuning."""
    return ContextRetriever(retriever, config)


@dataclass
class Grounding:
    """A loaded knowledge base (or any retriever) with the settings that ground each turn."""

    retriever: Retriever
    config: GroundingConfig

    @classmethod
    def load(cls, config: GroundingConfig, tokenizer: Optional[Tokenizer] = None) -> "Grounding":
        """Open ``config.knowledge`` and, given the model's tokenizer, check that the index was built for it
        (one clear error before anything is served)."""
        config.validate()
        if config.knowledge is None:
            raise ConfigError("no knowledge base to load: set knowledge (a folder written by `gptforge index`)")
        from .index import KnowledgeBase  # the index (bm25s) only when a knowledge base is used

        grounding = cls(KnowledgeBase.load(config.knowledge), config)
        if tokenizer is not None:
            grounding.check_tokenizer(tokenizer)
        return grounding

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """The knowledge base's check that its passages were cut for ``tokenizer`` (a KnowledgeError, one line,
        when not); a retriever without such a check passes."""
        check = getattr(self.retriever, "check_tokenizer", None)
        if check is not None:
            check(tokenizer)

    def prepare(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], *,
                template: str = DEFAULT_CHAT_TEMPLATE, context_length: int,
                max_new_tokens: Optional[int] = None) -> GroundedPrompt:
        """:func:`prepare_grounded` with this retriever and config."""
        return prepare_grounded(tokenizer, messages, self.retriever, self.config, template=template,
                                context_length=context_length, max_new_tokens=max_new_tokens)
