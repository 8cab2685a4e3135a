"""A conversation with a loaded model: history, the checkpoint's chat template, streamed replies.

    session = ChatSession(ckpt.model, ckpt.tokenizer, GenerateConfig(temperature=0.7),
                          system="You are terse.", template=chat_template_of(ckpt.config))
    for piece in session.send("Capital of France?"):   # text pieces as they are decided
        print(piece, end="")
    session.reset()                                    # forget the turns, keep the system prompt

Each turn's prompt is the whole conversation (system prompt, earlier user and assistant turns, the new
user message) rendered with the chat template and followed by the opening of an assistant reply, exactly
as :func:`~gptforge.tokenizer.encode_chat_prompt` tokenizes chats for fine-tuning. Each turn keeps
:attr:`ChatSession.reply_tokens` of the model's context for the reply: ``max_new_tokens`` when it is set,
else half the context (at most 256), and a reply may then use all the room the prompt leaves (at most 256,
:func:`~gptforge.config.resolve_max_new_tokens`). When the prompt no longer leaves that room, the oldest
turns are dropped from the history (the system prompt is always kept) and :attr:`ChatSession.dropped_turns`
counts them. This module never prints: the CLI (``gptforge chat``) decides what a person sees.

With a :class:`~gptforge.knowledge.grounding.Grounding` (``gptforge chat --knowledge kb/``) each turn's prompt
also holds the passages retrieved for the last user turns, in the template's context slot; passages are
cut before old turns are dropped (:func:`~gptforge.knowledge.grounding.prepare_grounded`).
:attr:`ChatSession.sources` holds the hits behind the last reply, and with ``knowledge_only`` a question
the knowledge base has nothing on gets the configured refusal instead of a generated reply.

With a :class:`~gptforge.moderation.Moderator` (``gptforge chat --moderation clf/ --block toxic``) a message the
classifier blocks gets the moderator's refusal and never reaches the model, and the reply is screened as it
streams (:meth:`~gptforge.moderation.Moderator.filter`): only text a check has cleared is yielded, and decoding
stops at the first blocked window. :attr:`ChatSession.moderated` holds the verdict; a blocked turn does not join
the history.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Optional

from .config import DEFAULT_MAX_NEW_TOKENS, GenerateConfig
from .errors import ConfigError
from .generate import stream_ids
from .knowledge.grounding import GroundedPrompt, Grounding
from .knowledge.types import Hit
from .model import GPT
from .moderation import Moderator, Verdict
from .tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, encode_chat_prompt

log = logging.getLogger(__name__)

__all__ = ["ChatSession", "chat_template_of"]


def chat_template_of(config: Mapping[str, Any]) -> str:
    """The chat template a checkpoint was fine-tuned with (``config["task"]["chat_template"]``), else the default."""
    task = config.get("task") or {}
    template = task.get("chat_template") if isinstance(task, Mapping) else None
    return template or DEFAULT_CHAT_TEMPLATE


class ChatSession:
    """A multi-turn conversation over one model; see the module docstring."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: GenerateConfig, *,
                 system: Optional[str] = None, template: str = DEFAULT_CHAT_TEMPLATE,
                 grounding: Optional[Grounding] = None, moderator: Optional[Moderator] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config.validate()
        self.system = system or None
        self.template = template
        self.grounding = grounding
        self.sources: list[Hit] = []
        """The hits whose passages were in the last reply's prompt, best first (empty without grounding)."""
        self.refused = False
        """Whether the last reply was the knowledge_only refusal rather than the model's."""
        self.moderator = moderator
        self.moderated: Optional[Verdict] = None
        """Why moderation blocked the last turn (``side`` "input": the refusal replaced the reply; "output":
        the reply was cut), or None."""
        self.history: list[dict[str, str]] = []
        """Earlier turns, alternating user and assistant messages (the system prompt is not in it)."""
        self.dropped_turns = 0
        """Turns (a user message and its reply) dropped so far to fit the context."""
        self.turns = 0
        encode_chat_prompt(tokenizer, [], template)  # a bad template fails here, not mid-conversation
        block = model.config.block_size
        if config.max_new_tokens is not None and config.max_new_tokens >= block:
            raise ConfigError(f"max_new_tokens ({config.max_new_tokens}) leaves no room for the conversation in "
                              f"the model's context of {block} tokens; lower it")
        self.reply_tokens = config.max_new_tokens or max(1, min(DEFAULT_MAX_NEW_TOKENS, block // 2))
        """The part of the context each turn keeps for the reply; older turns are dropped to keep it free."""

    def messages(self, user_text: Optional[str] = None) -> list[dict[str, str]]:
        """The conversation as chat messages: system prompt, history and (if given) a new user message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        return head + self.history + tail

    def prompt_ids(self, user_text: str) -> list[int]:
        """The next turn's prompt, after dropping the oldest turns while it does not fit the context."""
        return self.prepare(user_text).ids

    def prepare(self, user_text: str) -> GroundedPrompt:
        """The next turn's prompt (with its passages when grounded), or the refusal that replaces the reply;
        drops the oldest turns while the prompt does not fit the context even without passages."""
        block = self.model.config.block_size
        budget = block - self.reply_tokens
        while True:
            messages = self.messages(user_text)
            if self.grounding is not None:
                prepared = self.grounding.prepare(self.tokenizer, messages, template=self.template,
                                                  context_length=block, max_new_tokens=self.config.max_new_tokens)
            else:
                prepared = GroundedPrompt(encode_chat_prompt(self.tokenizer, messages, self.template), budget=budget)
            if prepared.refusal is not None or prepared.fits:
                return prepared
            ids = prepared.ids
            if not self.history:
                if self.config.max_new_tokens is None:
                    raise ConfigError(f"the message ({len(ids)} tokens with the system prompt and chat template) "
                                      f"does not fit the model's context of {block} tokens with {self.reply_tokens} "
                                      "tokens kept for the reply; shorten it")
                raise ConfigError(f"the message ({len(ids)} tokens with the system prompt and chat template) does not "
                                  f"fit the model's context of {block} tokens with "
                                  f"max_new_tokens {self.config.max_new_tokens}; shorten it or lower max_new_tokens")
            # A turn is a user message and the reply to it; drop both so the history still alternates.
            del self.history[:2]
            self.dropped_turns += 1
            log.debug("dropped the oldest turn to fit the context (%d dropped so far)", self.dropped_turns)

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to ``user_text``; once it is complete, both join the history.

        A reply abandoned before its end (the iterator closed, or Ctrl-C) leaves the history unchanged.
        """
        self.moderated = None
        if self.moderator is not None:
            verdict = self.moderator.check(user_text, "input")
            if verdict.blocked:  # the model never sees it, and neither does the history
                self.moderated, self.sources, self.refused = verdict, [], False
                yield self.moderator.refusal
                return
        prepared = self.prepare(user_text)
        self.sources, self.refused = prepared.hits, prepared.refusal is not None
        if prepared.refusal is not None:  # knowledge_only and nothing relevant: no guess from the model
            yield prepared.refusal
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": prepared.refusal}]
            return
        ids = prepared.ids
        config = self.config.for_prompt(len(ids), self.model.config.block_size)
        if config.seed is not None:  # reproducible, yet not the same draw every turn
            config = dataclasses.replace(config, seed=config.seed + self.turns)
        self.turns += 1
        pieces: list[str] = []
        stream = stream_ids(self.model, self.tokenizer, ids, config)
        screen = self.moderator.screen() if self.moderator is not None else None
        if screen is not None:
            stream = self.moderator.filter(stream, screen)
        for piece in stream:
            pieces.append(piece)
            yield piece
        if screen is not None and screen.blocked is not None:
            self.moderated = screen.blocked
            return
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": "".join(pieces)}]

    def reset(self) -> None:
        """Forget every turn; the system prompt stays."""
        self.history.clear()
