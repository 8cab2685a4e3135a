"""One Tokenizer interface with three implementations.

- :class:`BPETokenizer`: byte-level BPE trained with Hugging Face ``tokenizers``, or GPT-2's own files
  (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) loaded from a Hugging Face folder.
- :class:`CharTokenizer`: one id per character seen in the corpus, with a UTF-8 byte fallback so that
  characters never seen still encode (and decode back) exactly.

Both give back any Unicode text exactly: ``decode(encode(text)) == text``. Text that is not valid Unicode
(a lone surrogate, which is what Python makes of bytes that are not UTF-8 in command-line arguments) is
refused by every tokenizer's ``encode`` with one :class:`~gptforge.errors.InvalidTextError`
(:func:`check_text`). A tokenizer is saved inside every checkpoint and every prepared-data folder; its
:attr:`fingerprint` tells whether two of them agree.

Chat templates live here too (:data:`DEFAULT_CHAT_TEMPLATE`, :func:`render_chat`,
:func:`encode_chat_prompt`): fine-tuning data, the chat command and the server all turn messages into
tokens the same way. So does the template's ``context`` slot for retrieved passages
(:data:`CONTEXT_ROLE`, :func:`with_context`, :func:`fit_passages`, :func:`encode_grounded_prompt`), which
grounded fine-tuning and grounded chat share.
"""

from __future__ import annotations

import hashlib
import json
import string
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from .errors import ConfigError, DataError, InvalidTextError

EOS_TOKEN = "<|endoftext|>"
CHAR_FILE = "char_tokenizer.json"
BPE_FILE = "tokenizer.json"


def check_text(text: str, what: str = "the text") -> str:
    """``text`` if it is valid Unicode; else :class:`~gptforge.errors.InvalidTextError` naming the first lone
    surrogate (and, for one that stands for a byte of input that was not UTF-8, that byte). ``what`` names the
    text in the message ("the prompt", "--text")."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        cp = ord(text[exc.start])
        # Python's surrogateescape error handler maps an undecodable byte b to U+DC00 + b (b >= 0x80).
        byte = f" (as Python reads the byte 0x{cp - 0xDC00:02x} of input that is not UTF-8)" if 0xDC80 <= cp <= 0xDCFF else ""
        raise InvalidTextError(f"{what} holds a lone surrogate U+{cp:04X} at character {exc.start}{byte}, "
                               "which is not valid Unicode and cannot be tokenized", exc.start) from None
    return text


class Tokenizer(ABC):
    """Text ↔ token ids. Every text passes :func:`check_text` before a subclass's ``_encode`` sees it."""

    kind: str

    def encode(self, text: str) -> list[int]:
        return self._encode(check_text(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode_batch([check_text(t) for t in texts])

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int | None: ...

    @abstractmethod
    def save(self, directory: str | Path) -> list[Path]:
        """Write the tokenizer's files into ``directory``; return their paths."""

    @abstractmethod
    def _canonical(self) -> str: ...

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in the text, in id order: what decoding joins (as UTF-8) when the id comes in a
        sequence. This generic version decodes each id alone, exact where no id is part of a character."""
        return [self.decode([i]).encode("utf-8", "surrogatepass") for i in range(self.vocab_size)]

    @property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary and merges: equal fingerprints encode text identically."""
        return hashlib.sha256(self._canonical().encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


# --------------------------------------------------------------------------------------------------
class BPETokenizer(Tokenizer):
    """Byte-level BPE backed by a Hugging Face ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._eos = hf_tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges from an iterator of texts (streamed; the corpus is never held in memory)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise DataError(f"a byte-level BPE vocabulary needs at least 257 entries (256 bytes + EOS), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"cannot read tokenizer file {path}: {exc}") from None

    @classmethod
    def from_vocab_merges(cls, vocab: str | Path, merges: str | Path) -> "BPETokenizer":
        """GPT-2's original ``vocab.json`` + ``merges.txt``."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as exc:
            raise DataError(f"cannot read GPT-2 tokenizer files {vocab}, {merges}: {exc}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOS_TOKEN) is not None:
            tok.add_special_tokens([EOS_TOKEN])
        return cls(tok)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_bytes(self) -> list[bytes]:
        """Byte-level tokens' bytes through GPT-2's byte alphabet; added tokens (end-of-text) are their text,
        as decode writes them. A tokenizer file with another decoder falls back to decoding ids one by one."""
        decoder = (json.loads(self._tok.to_str()).get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            return super().token_bytes()
        byte_of = {ch: b for b, ch in _byte_alphabet().items()}
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        out = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if i in added or piece is None or not all(ch in byte_of for ch in piece):
                out.append((added.get(i) if i in added else self.decode([i])).encode("utf-8"))
            else:
                out.append(bytes(byte_of[ch] for ch in piece))
        return out

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def hf_tokenizer(self):
        return self._tok

    def save(self, directory: str | Path) -> list[Path]:
        path = Path(directory) / BPE_FILE
        self._tok.save(str(path))
        return [path]

    def _canonical(self) -> str:
        data = json.loads(self._tok.to_str())
        return json.dumps({"model": data.get("model"), "added": data.get("added_tokens")}, sort_keys=True)


# --------------------------------------------------------------------------------------------------
class CharTokenizer(Tokenizer):
    """Ids 0-255 are UTF-8 bytes (the fallback), 256 is EOS, then one id per corpus character."""

    kind = "char"
    _N_BYTES = 256

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self._index = {c: i + self._N_BYTES + 1 for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str], max_chars: int | None = None) -> "CharTokenizer":
        """Collect the corpus's characters (the ``max_chars`` most frequent, if given)."""
        from collections import Counter

        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        chars = [c for c, _ in counts.most_common(max_chars)]
        return cls(sorted(chars))

    @classmethod
    def from_file(cls, path: str | Path) -> "CharTokenizer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            chars = data["chars"]
            if data.get("type") != "char" or not all(isinstance(c, str) and len(c) == 1 for c in chars):
                raise ValueError("not a character vocabulary")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read character tokenizer {path}: {exc}") from None
        return cls(chars)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        index = self._index
        for ch in text:
            i = index.get(ch)
            if i is None:
                ids.extend(ch.encode("utf-8"))
            else:
                ids.append(i)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        pending = bytearray()
        first_char = self._N_BYTES + 1
        for i in ids:
            i = int(i)
            if i < self._N_BYTES:
                pending.append(i)
                continue
            if pending:
                out.append(pending.decode("utf-8", "replace"))
                pending.clear()
            if i == self._N_BYTES:
                out.append(EOS_TOKEN)
            elif i - first_char < len(self.chars):
                out.append(self.chars[i - first_char])
            else:
                out.append("\ufffd")
        if pending:
            out.append(pending.decode("utf-8", "replace"))
        return "".join(out)

    def token_bytes(self) -> list[bytes]:
        return ([bytes([i]) for i in range(self._N_BYTES)] + [EOS_TOKEN.encode("utf-8")]
                + [c.encode("utf-8", "surrogatepass") for c in self.chars])

    @property
    def vocab_size(self) -> int:
        return self._N_BYTES + 1 + len(self.chars)

    @property
    def eos_id(self) -> int:
        return self._N_BYTES

    def save(self, directory: str | Path) -> list[Path]:
        path = Path(directory) / CHAR_FILE
        path.write_text(self._canonical(), encoding="utf-8")
        return [path]

    def _canonical(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte's printable stand-in in a byte-level BPE vocabulary."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    alphabet, extra = {}, 0
    for b in range(256):
        if b in kept:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint, prepared-data or Hugging Face folder."""
    d = Path(directory)
    if (d / CHAR_FILE).is_file():
        return CharTokenizer.from_file(d / CHAR_FILE)
    if (d / BPE_FILE).is_file():
        return BPETokenizer.from_file(d / BPE_FILE)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return BPETokenizer.from_vocab_merges(d / "vocab.json", d / "merges.txt")
    raise DataError(f"no tokenizer in {d} (expected {BPE_FILE}, {CHAR_FILE}, or vocab.json + merges.txt)")


def has_tokenizer(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / CHAR_FILE).is_file() or (d / BPE_FILE).is_file() or (
        (d / "vocab.json").is_file() and (d / "merges.txt").is_file())


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    Each call to :meth:`push` returns only the newly decided text. Decoding restarts from a short
    window (not the whole sequence), so a step costs the same at token 10 and token 10,000.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids)
        # Start the window a few tokens into the prompt so the first piece decodes in context.
        self._prefix = max(0, len(self.ids) - 4)
        self._read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        piece = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character comes out as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


def iter_pieces(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    dec = IncrementalDecoder(tokenizer)
    for i in ids:
        piece = dec.push(i)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


# --------------------------------------------------------------------------------------------------
# Chat templates
ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}{end}\n"
"""How a chat is turned into text: this format string is applied to each message in turn.

Fields: ``{role}`` (``system``, ``user`` or ``assistant``; ``context`` for retrieved passages, see
:data:`CONTEXT_ROLE`), ``{content}`` (the message text) and
``{end}``, which is the end-of-text token after an assistant reply and nothing after any other message.
``{content}`` and ``{end}`` must each appear once, ``{end}`` after ``{content}``; write ``{{`` and ``}}``
for literal braces. The default renders a system + user + assistant chat as::

    <|system|>
    You are terse.
    <|user|>
    Capital of France?
    <|assistant|>
    Paris.<|endoftext|>

(with a newline after the end-of-text token). Only an assistant's content and its end marker are trained
on; the model learns to stop by producing the end-of-text token. At generation time the prompt is the
chat so far followed by the part of the template before ``{content}`` for role ``assistant``
(:func:`encode_chat_prompt`). The template is saved as a plain string in a fine-tuned checkpoint's
config, so it can be changed there (it is never executed: only the three fields above are filled in).
"""

_TEMPLATE_FIELDS = ("role", "content", "end")

CONTEXT_ROLE = "context"
"""The template's ``context`` slot: retrieved passages travel as one message of role ``context``, placed just
before the last user message and rendered by the same template as every other message (``{role}`` is
``context``, ``{end}`` is empty, and it is never trained on). With the default template a grounded turn reads::

    <|system|>
    You answer from the passages.
    <|context|>
    Returns > Refunds
    Refunds reach your card within 5 days.

    Shipping
    Orders leave the warehouse within a day.
    <|user|>
    How long does a refund take?
    <|assistant|>

Each passage is its title on one line and its text below (:func:`format_passage`), best first, separated
by a blank line (:data:`PASSAGE_SEPARATOR`). A chat without passages renders exactly as before, so a custom
template needs nothing new: it only has to read well with ``context`` as a role. Grounded fine-tuning
(``context`` in a training example) and grounded chat both build this message with :func:`with_context`
and fit it with :func:`fit_passages`, so training and serving see the same prompt.
"""

PASSAGE_SEPARATOR = "\n\n"
"""What separates two passages inside the ``context`` message."""

CUT_MARK = " …"
"""Appended to a passage cut short to fit the context."""

MIN_CUT_CHARS = 40
"""A passage cut to fit keeps at least this many characters of its text, else it is left out."""

_RENDERED_ROLES = ROLES + (CONTEXT_ROLE,)


def _parse_template(template: str) -> list[tuple[str, str | None]]:
    """The template as (literal, None) and ("", field) parts, checked."""
    if not isinstance(template, str):
        raise ConfigError(f"the chat template must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"chat template {template!r} is not a valid format string ({exc}); "
                          "write {{ and }} for literal braces") from None
    parts: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in parsed:
        if literal:
            parts.append((literal, None))
        if field is None:
            continue
        if field not in _TEMPLATE_FIELDS or spec or conversion:
            raise ConfigError(f"chat template {template!r} has field {{{field}}}; only {{role}}, {{content}} "
                              "and {end} are allowed (write {{ and }} for literal braces)")
        parts.append(("", field))
    fields = [field for _, field in parts if field]
    if fields.count("content") != 1 or fields.count("end") != 1 or fields.index("end") < fields.index("content"):
        raise ConfigError(f"chat template {template!r} must hold {{content}} once, followed by {{end}} once")
    return parts


def _append(segments: list[tuple[str, bool]], text: str, trainable: bool) -> None:
    # Neighbouring text with the same flag is tokenized as one piece, as it would be in running text;
    # only the mask boundaries (and the end-of-text marker) split it.
    if not text:
        return
    if segments and segments[-1][1] == trainable and segments[-1][0] != EOS_TOKEN:
        segments[-1] = (segments[-1][0] + text, trainable)
    else:
        segments.append((text, trainable))


def _chat_segments(messages: Sequence[Mapping[str, str]], template: str, *, open_reply: bool) -> list[tuple[str, bool]]:
    parts = _parse_template(template)
    segments: list[tuple[str, bool]] = []
    for i, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in _RENDERED_ROLES or not isinstance(content, str):
            raise DataError(f"chat message {i} must have a role ({', '.join(ROLES)}) and a string content")
        trained = role == "assistant"
        for literal, field in parts:
            if field is None:
                _append(segments, literal, False)
            elif field == "role":
                _append(segments, role, False)
            elif field == "content":
                _append(segments, content, trained)
            elif trained:
                segments.append((EOS_TOKEN, True))
    if open_reply:  # the template's head for an assistant turn, where generation takes over
        for literal, field in parts:
            if field == "content":
                break
            _append(segments, "assistant" if field == "role" else literal, False)
    return segments


def render_chat(messages: Sequence[Mapping[str, str]], template: str = DEFAULT_CHAT_TEMPLATE) -> list[tuple[str, bool]]:
    """A chat as (text, trainable) segments: True only for assistant content and its end marker.

    The end marker is its own segment, exactly ``EOS_TOKEN``, which the encoders turn into the tokenizer's
    end-of-text id (so it works for tokenizers that would spell the string out character by character).
    """
    return _chat_segments(messages, template, open_reply=False)


def encode_segment(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of one segment of :func:`render_chat`: the end-of-text id for ``EOS_TOKEN``, else the text's."""
    if text != EOS_TOKEN:
        return tokenizer.encode(text)
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has no end-of-text token, which fine-tuning needs to mark where "
                          "a text or a reply ends")
    return [tokenizer.eos_id]


def encode_chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                       template: str = DEFAULT_CHAT_TEMPLATE) -> list[int]:
    """Token ids of a chat followed by the opening of an assistant reply, tokenized as in training."""
    # Each segment on its own, as in training, so that no token straddles a segment boundary.
    segments = _chat_segments(messages, template, open_reply=True)
    return [token for text, _ in segments for token in encode_segment(tokenizer, text)]


# --------------------------------------------------------------------------------------------------
# The context slot: retrieved passages in the prompt
def format_passage(text: str, title: str = "") -> str:
    """One passage as the ``context`` message shows it: its title on a line of its own (when it has one), then its text."""
    title, text = title.strip(), text.strip()
    return f"{title}\n{text}" if title else text


def with_context(messages: Sequence[Mapping[str, str]], passages: Sequence[str]) -> list[Mapping[str, str]]:
    """``messages`` with a ``context`` message of ``passages`` (formatted, best first) just before the last
    user message; unchanged when there are no passages. See :data:`CONTEXT_ROLE`."""
    messages = list(messages)
    if not passages:
        return messages
    users = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users:
        raise DataError("passages go before the last user message, and this chat has no user message")
    context = {"role": CONTEXT_ROLE, "content": PASSAGE_SEPARATOR.join(passages)}
    return messages[:users[-1]] + [context] + messages[users[-1]:]


def fit_passages(passages: Sequence[str], fits: Callable[[list[str]], bool]) -> list[str]:
    """The passages (best first) that fit, as ``fits(passages)`` judges: the best whole ones that fit, then the
    next one cut short (at a space where it can, marked with :data:`CUT_MARK`) to fill the room left, if at
    least :data:`MIN_CUT_CHARS` of it fits. Whole lower-ranked passages are dropped before any is cut;
    ``[]`` when not even a cut top passage fits (the caller then cuts the conversation).
    """
    kept: list[str] = []
    for passage in passages:
        if fits(kept + [passage]):
            kept.append(passage)
            continue
        # Binary search for the longest prefix that fits (token counts grow with the prefix, near enough).
        lo, hi = 0, len(passage) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(kept + [_cut(passage, mid)]):
                lo = mid
            else:
                hi = mid - 1
        space = passage.rfind(" ", 0, lo + 1)
        if space >= max(MIN_CUT_CHARS, lo * 4 // 5):  # end on a word boundary when that loses little
            lo = space
        if lo >= MIN_CUT_CHARS and fits(kept + [_cut(passage, lo)]):
            kept.append(_cut(passage, lo))
        break
    return kept


def _cut(passage: str, n_chars: int) -> str:
    return passage[:n_chars].rstrip() + CUT_MARK


def encode_grounded_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], passages: Sequence[str],
                           template: str = DEFAULT_CHAT_TEMPLATE, *, budget: int) -> tuple[list[int], list[str]]:
    """``(ids, kept)``: the prompt of a chat with the passages that fit ``budget`` tokens in its ``context``
    slot (:func:`fit_passages`), and those passages as rendered (the last one maybe cut). When even the chat
    alone is longer than ``budget`` the ids are those of the chat alone (longer than ``budget``) and no passage
    is kept: cutting the conversation is the caller's decision."""
    def encode(kept: Sequence[str]) -> list[int]:
        return encode_chat_prompt(tokenizer, with_context(messages, kept), template)

    kept = fit_passages(passages, lambda candidate: len(encode(candidate)) <= budget)
    return encode(kept), kept
