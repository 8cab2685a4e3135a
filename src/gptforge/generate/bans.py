"""Banned phrases: text that a generation never contains, however the tokens would split it.

transformers' ``bad_words_ids`` bans token sequences: a sequence's last token whenever its other tokens end
the input so far. Under byte-level BPE one phrase has many tokenizations ('hello' as one token, as 'hel' +
'lo', 'h' + 'ello', ' hello' after a space), so banning the phrase's own tokenization (with and without a
leading space, as transformers' documentation suggests) leaves the others open. Here the ban is on the text:
a token is banned at a step when its bytes, appended to the text so far, would complete a banned phrase,
whichever tokens wrote the phrase's beginning. For a phrase P and a row whose text ends with P's first k bytes
(1 <= k < len(P)), every token whose bytes start with the other len(P) - k bytes is banned; a token whose own
bytes contain P is always banned. Together these are exactly the tokens that would make P appear, so the
tokens a row may choose are all the others, and sampling draws from those alone (the ban masks the logits
before sampling; nothing is rejected afterwards). The text so far includes the prompt: a phrase begun in the
prompt is not finished in the output either. Matching is on UTF-8 bytes, as the tokenizer joins them, so it
holds for tokens that are half a character too.

Cost: once per tokenizer, its tokens' bytes, sorted so that :func:`bisect.bisect_left` finds the tokens that
start with given bytes; once per set of phrases, the tokens that contain one (both cached); per step and row,
``len(P) - 1`` ``endswith`` checks per phrase on a tail of the text no longer than the longest phrase. A row
without banned phrases does none of this (its :class:`~gptforge.generate.processors.TokenHistory` holds no
tails).
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from ..tokenizer import Tokenizer

__all__ = ["PhraseBan", "TokenTable", "phrase_ban", "token_table"]

_TABLES: "weakref.WeakKeyDictionary[Tokenizer, TokenTable]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # the server's scheduler thread and the event loop may both compile bans


class TokenTable:
    """A tokenizer's token bytes (:meth:`Tokenizer.token_bytes`), and the same sorted for prefix look-ups."""

    COMPILED = 64
    """Sets of phrases whose :class:`PhraseBan` is kept for reuse (a server sees the same lists again)."""

    def __init__(self, token_bytes: Sequence[bytes]):
        self.bytes = list(token_bytes)
        self._order = sorted(range(len(self.bytes)), key=self.bytes.__getitem__)
        self._sorted = [self.bytes[i] for i in self._order]
        self._compiled: "OrderedDict[tuple[str, ...], PhraseBan]" = OrderedDict()

    def starting_with(self, prefix: bytes) -> list[int]:
        """The ids whose bytes start with ``prefix`` (non-empty)."""
        lo = bisect_left(self._sorted, prefix)
        hi = len(self._sorted) if _after_prefix(prefix) is None else bisect_left(self._sorted, _after_prefix(prefix))
        return self._order[lo:hi]

    def compile(self, phrases: Sequence[str]) -> "PhraseBan":
        key = tuple(phrases)
        with _LOCK:
            ban = self._compiled.get(key)
            if ban is not None:
                self._compiled.move_to_end(key)
                return ban
        ban = PhraseBan(self, phrases)
        with _LOCK:
            self._compiled[key] = ban
            while len(self._compiled) > self.COMPILED:
                self._compiled.popitem(last=False)
        return ban


def _after_prefix(prefix: bytes) -> Optional[bytes]:
    """The smallest byte string greater than every string that starts with ``prefix`` (None: there is none)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def token_table(tokenizer: Tokenizer) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer``, built on first use and kept while the tokenizer lives."""
    with _LOCK:
        table = _TABLES.get(tokenizer)
    if table is None:
        table = TokenTable(tokenizer.token_bytes())
        with _LOCK:
            table = _TABLES.setdefault(tokenizer, table)
    return table


def phrase_ban(tokenizer: Tokenizer, phrases: Sequence[str]) -> "PhraseBan":
    """The compiled ban of ``phrases`` (non-empty strings) for ``tokenizer``'s tokens."""
    return token_table(tokenizer).compile(phrases)


class PhraseBan:
    """Banned phrases compiled for one tokenizer. Stateless and shared: each row keeps its own tail of the
    text (bytes), which :meth:`tail` starts from the prompt and :meth:`push` moves on one token at a time;
    :meth:`apply` masks each row's banned tokens."""

    def __init__(self, table: TokenTable, phrases: Sequence[str]):
        self.table = table
        self.phrases = [p.encode("utf-8") for p in dict.fromkeys(phrases)]
        if not self.phrases or not all(self.phrases):
            raise ValueError("banned phrases must be non-empty strings")
        self.keep = max(len(p) for p in self.phrases) - 1
        """The bytes of text a row keeps: a phrase's start can be no further back than this."""
        self.always = torch.tensor([i for i, b in enumerate(table.bytes) if any(p in b for p in self.phrases)],
                                   dtype=torch.long)
        """Tokens that contain a phrase themselves."""
        self._splits = sorted({(p[:k], p[k:]) for p in self.phrases for k in range(1, len(p))})
        self._starting: dict[bytes, torch.Tensor] = {}

    def tail(self, ids: Sequence[int]) -> bytes:
        """The end of the text of ``ids`` (a prompt) that a phrase could continue from."""
        if not self.keep:
            return b""
        parts, size = [], 0
        for i in reversed(ids):
            parts.append(self.table.bytes[i])
            size += len(parts[-1])
            if size >= self.keep:
                break
        text = b"".join(reversed(parts))
        return text[len(text) - self.keep:] if len(text) > self.keep else text

    def push(self, tail: bytes, token: int) -> bytes:
        """``tail`` after ``token``'s bytes are written."""
        if not self.keep:
            return b""
        text = tail + self.table.bytes[token]
        return text[len(text) - self.keep:] if len(text) > self.keep else text

    def banned(self, tail: bytes) -> torch.Tensor:
        """The ids that would complete a phrase after text ending in ``tail``, (n,) (repeats possible)."""
        parts = [self.always]
        for head, rest in self._splits:
            if tail.endswith(head):
                ids = self._starting.get(rest)
                if ids is None:
                    ids = self._starting.setdefault(rest, torch.tensor(self.table.starting_with(rest), dtype=torch.long))
                parts.append(ids)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def apply(self, logits: torch.Tensor, tails: Sequence[bytes], allow: Optional[int] = None) -> torch.Tensor:
        """``logits`` (B, V) with each row's banned tokens (after ``tails[row]``) at -inf; ``allow``: an id
        never banned (the end-of-text token that ends a sequence: it adds no text)."""
        logits = logits.clone()
        for row, tail in enumerate(tails):
            ids = self.banned(tail)
            if allow is not None:
                ids = ids[ids != allow]
            logits[row, ids.to(logits.device)] = float("-inf")
        return logits
