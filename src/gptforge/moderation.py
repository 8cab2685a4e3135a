"""Moderation: screening what goes into a model and what comes out of it with a gptforge classifier.

    moderator = Moderator.load(ModerationConfig(moderation="runs/moderation/best", block=["toxic"],
                                                threshold=0.8))
    moderator.check("you are an idiot")         # Verdict(blocked=True, label='toxic', probability=0.99, ...)
    screen = moderator.screen()                  # a stream of generated text, checked as it is produced
    for piece in moderator.filter(pieces, screen):
        print(piece, end="")                     # only text that a check has cleared
    screen.blocked                               # the Verdict that stopped the stream, or None

The classifier is any checkpoint fine-tuned with ``gptforge finetune --task classify``; a text is blocked
when the probability of one of the ``block`` labels is at least ``threshold``. Classification goes through
:func:`gptforge.evaluate.predict.classify_texts` (the loop behind ``gptforge classify`` and ``/v1/classify``);
a text longer than the classifier's context is read as overlapping pieces that each fit, and blocked if any
piece is.

Generated text is screened by an :class:`OutputScreen`, which holds text back as a stop string is held
back (:mod:`gptforge.generate.stopping`) until a check has covered it: once ``moderation_stride``
characters wait, the text up to the last word boundary is checked on a sliding window (the last
``moderation_window`` characters before that point, several windows when more than half a window waits), and
released only if no window is blocked; at the end of the output the rest is checked, and the whole output
once more. So nothing is released that a check has not read, and a blocked stream ends at the last point every
check before it cleared. :class:`ScreenBatch` checks the due windows of many screens in one classifier call
(the server's continuous batch). This module never prints and knows nothing of HTTP.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from .config import ModerationConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Verdict", "Moderator", "OutputScreen", "ScreenBatch"]

WHOLE = -1
"""The end offset that marks a screen's check of the whole output (see :meth:`OutputScreen.checks`)."""


@dataclass(frozen=True)
class Verdict:
    """The classifier's decision on one text."""

    blocked: bool
    """Whether one of the blocked labels reached the threshold."""
    label: Optional[str]
    """The blocked label with the highest probability when blocked, else the predicted label (None for a text
    with no tokens, which is never blocked)."""
    probability: float
    """That label's probability."""
    scores: dict[str, float] = field(default_factory=dict)
    """Every label's probability (of the most blocked piece, for a text read in pieces)."""
    side: Optional[str] = None
    """Where the text came from, when the caller says: "input" (a prompt, a user message) or "output"."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Moderator:
    """A classifier with the labels that block, the threshold and the screening settings of a
    :class:`~gptforge.config.ModerationConfig`."""

    def __init__(self, model, tokenizer, labels: Sequence[str], config: ModerationConfig, *,
                 source: str | Path = "the classifier"):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.config = config.validate()
        unknown = [label for label in self.config.block if label not in self.labels]
        if unknown:
            raise ConfigError(f"--block {', '.join(unknown)}: {'is not a label' if len(unknown) == 1 else 'are not labels'}"
                              f" of the moderation classifier {source}; its labels are {', '.join(self.labels)}")
        if set(self.config.block) == set(self.labels):
            log.warning("every label of the moderation classifier blocks: every text with a token will be blocked")
        self.block = list(self.config.block)
        self.threshold = self.config.threshold
        self.refusal = self.config.moderation_refusal

    @classmethod
    def load(cls, config: ModerationConfig, device: str = "auto") -> "Moderator":
        """The classifier at ``config.moderation``: a text-classification checkpoint, adapter or run folder."""
        from .evaluate.predict import load_for_task

        config.validate()
        if config.moderation is None:
            raise ConfigError("no moderation classifier: set moderation (a checkpoint from gptforge finetune "
                              "--task classify)")
        ckpt = load_for_task(config.moderation, None, device)
        task = ckpt.config["task"]
        if task["type"] != "classify":
            what = "a language model" if task["type"] == "lm" else f"a {task['type']!r} model"
            raise ConfigError(f"--moderation {config.moderation} is {what}; moderation needs a text classifier "
                              "(gptforge finetune --task classify)")
        return cls(ckpt.model, ckpt.tokenizer, task["labels"], config, source=config.moderation)

    # ------------------------------------------------------------------------------------------------
    @property
    def context(self) -> int:
        """The classifier's context length, in its tokens."""
        from .evaluate.predict import block_size_of

        return block_size_of(self.model)

    def check(self, text: str, side: Optional[str] = None) -> Verdict:
        """The verdict on ``text``."""
        return self.check_many([text], side)[0]

    def check_many(self, texts: Sequence[str], side: Optional[str] = None) -> list[Verdict]:
        """The verdict on each text, from one batched classifier run."""
        from .evaluate.predict import classify_texts

        owners: list[int] = []
        pieces: list[str] = []
        for i, text in enumerate(texts):
            for piece in self._pieces(text):
                owners.append(i)
                pieces.append(piece)
        verdicts: list[Optional[Verdict]] = [None] * len(texts)
        if pieces:
            results = classify_texts(self.model, self.tokenizer, pieces, self.labels)
            for i, result in zip(owners, results):
                verdict = self._verdict(result, side)
                if verdicts[i] is None or _severity(verdict, self.block) > _severity(verdicts[i], self.block):
                    verdicts[i] = verdict
        return [v if v is not None else Verdict(False, None, 0.0, {}, side) for v in verdicts]

    def _verdict(self, result: dict[str, Any], side: Optional[str]) -> Verdict:
        scores = result["probabilities"]
        worst = max(self.block, key=lambda label: scores[label])
        if scores[worst] >= self.threshold:
            return Verdict(True, worst, scores[worst], scores, side)
        return Verdict(False, result["label"], scores[result["label"]], scores, side)

    def _pieces(self, text: str) -> list[str]:
        """``text`` as pieces that each fit the classifier's context (overlapping by half); none when the
        text has no token."""
        if not text:
            return []
        block = self.context
        if len(text.encode("utf-8")) <= block:  # a token is at least one byte: it fits as it is
            return [text] if self.tokenizer.encode(text) else []
        ids = self.tokenizer.encode(text)
        if len(ids) <= block:
            return [text] if ids else []
        size = max(1, block - 8)  # room for a decoded piece that encodes a few tokens longer
        step = max(1, size // 2)
        starts = range(0, max(1, len(ids) - size + step), step)
        return [self.tokenizer.decode(ids[s:s + size]) for s in starts]

    # ------------------------------------------------------------------------------------------------
    def screen(self) -> "OutputScreen":
        """A new screen for one stream of generated text, with this moderator's window and stride."""
        return OutputScreen(self.config.moderation_window, self.config.moderation_stride)

    def run(self, screen: "OutputScreen") -> list[Any]:
        """Check what ``screen`` has due now; the items this releases."""
        checks = screen.checks()
        return screen.apply(checks, self.check_many([text for _, text in checks], "output"))

    def filter(self, pieces: Iterable[str], screen: Optional["OutputScreen"] = None) -> Iterator[str]:
        """The pieces of generated text that ``screen`` releases, as checks clear them; stops reading
        ``pieces`` (closing a generator, which ends its decoding) as soon as a check blocks. Afterwards
        ``screen.blocked`` says whether and why the text was cut."""
        screen = screen if screen is not None else self.screen()
        source = iter(pieces)
        try:
            for piece in source:
                screen.push(piece, piece)
                if screen.due:
                    yield from self.run(screen)
                if screen.blocked is not None:
                    return
            screen.push("", "", final=True)
            while screen.due:
                yield from self.run(screen)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()


def _severity(verdict: Verdict, block: Sequence[str]) -> tuple[bool, float]:
    return verdict.blocked, max((verdict.scores.get(label, 0.0) for label in block), default=0.0)


# --------------------------------------------------------------------------------------------------
class OutputScreen:
    """Holds generated text back until a moderation check has read it; see the module docstring.

    Text arrives with :meth:`push`, each piece with an item (what the caller releases for it: the piece
    itself, or a streaming event). :meth:`checks` lists the windows due for a check, :meth:`apply` takes
    their verdicts and returns the items now cleared, in order. Released text always ends at a piece's
    end, and (but for a word longer than half a window, or the end of the output) at a word boundary.
    """

    def __init__(self, window: int, stride: int):
        if window < 2 or not 1 <= stride <= window // 2:
            raise ConfigError(f"a moderation window of {window} characters needs a stride in [1, {window // 2}], "
                              f"got {stride}")
        self.window = window
        self.stride = stride
        self.half = window // 2
        self.text = ""
        self._held: list[tuple[int, Any]] = []  # (end offset in text, item), not yet released
        self.cleared = 0
        """Characters of the text that passed every check (and whose items were released)."""
        self.final = False
        """Whether the output has ended (its last piece was pushed with ``final``)."""
        self.blocked: Optional[Verdict] = None
        """The verdict that blocked the stream; nothing after :attr:`cleared` is ever released then."""

    def push(self, piece: str, item: Any = None, *, final: bool = False) -> None:
        """Add the next piece of text (``final``: the last one, the output has ended)."""
        if self.final:
            raise ValueError("the output has already ended")
        self.text += piece
        self._held.append((len(self.text), item))
        self.final = final

    @property
    def due(self) -> bool:
        """Whether a check should run now."""
        if self.blocked is not None:
            return False
        if self.final:
            return bool(self._held)
        return self._clear_point() is not None

    @property
    def done(self) -> bool:
        """Blocked, or ended with everything released."""
        return self.blocked is not None or (self.final and not self._held)

    def _is_word_boundary(self, end: int) -> bool:
        """Whether a cut after ``end`` characters splits no word (a character on one side is not a letter or
        a digit; the character after the last piece is not known yet)."""
        before = self.text[end - 1] if end > 0 else " "
        after = self.text[end] if end < len(self.text) else None
        return not before.isalnum() or (after is not None and not after.isalnum())

    def _clear_point(self) -> Optional[int]:
        """The end offset the next (non-final) check clears up to, or None while too little text waits."""
        ends = [end for end, _ in self._held if end > self.cleared]
        if not ends:
            return None
        boundaries = [end for end in ends if self._is_word_boundary(end)]
        if boundaries and boundaries[-1] - self.cleared >= self.stride:
            return boundaries[-1]
        if ends[-1] - self.cleared >= self.half:  # half a window waits: cut at a word if one is there
            return boundaries[-1] if boundaries else ends[-1]
        return None

    def checks(self) -> list[tuple[int, str]]:
        """The texts to classify now, as ``(end offset, text)``: windows ending at successive cut points up to
        the clear point, no two more than half a window apart, and at the end of the output the whole text
        (end offset :data:`WHOLE`) when it is longer than one window."""
        if self.blocked is not None:
            return []
        target = len(self.text) if self.final else self._clear_point()
        if target is None:
            return []
        # Windows end anywhere (at a word boundary where one is near); only what is released ends at a piece.
        cuts: list[int] = []
        pos = self.cleared
        while target - pos > self.half:
            pos = next((e for e in range(pos + self.half, pos, -1) if self._is_word_boundary(e)), pos + self.half)
            cuts.append(pos)
        cuts.append(target)
        checks = [(end, self._window(end, covered)) for end, covered in zip(cuts, [self.cleared] + cuts)]
        if self.final and len(self.text) > self.window:
            checks.append((WHOLE, self.text))
        return checks

    def _window(self, end: int, covered: int) -> str:
        """The window of the check up to ``end``; the text before ``covered`` was read by the check before."""
        start = max(0, end - self.window)
        if start > 0:  # start at a word (a word cut in half reads as something else), within what was read
            space = next((i for i in range(start, covered) if self.text[i].isspace()), None)
            if space is not None:
                start = space + 1
        return self.text[start:end]

    def apply(self, checks: Sequence[tuple[int, str]], verdicts: Sequence[Verdict]) -> list[Any]:
        """Take the verdicts on ``checks`` (from :meth:`checks`); return the items now released.

        Before the end, text is cleared up to the last window before the first blocked one; at the end, the
        rest is released only when every check (the whole text's too) passed."""
        if len(checks) != len(verdicts):
            raise ValueError(f"{len(checks)} checks but {len(verdicts)} verdicts")
        cleared = self.cleared
        for (end, _), verdict in zip(checks, verdicts):
            if verdict.blocked:
                self.blocked = verdict
                break
            if end != WHOLE:
                cleared = max(cleared, end)
        if self.final and self.blocked is not None:
            cleared = self.cleared  # the end of the output goes out whole or not at all
        self.cleared = cleared
        if self.final and self.blocked is None and cleared >= len(self.text):
            released, self._held = self._held, []
        else:
            keep = next((i for i, (end, _) in enumerate(self._held) if end > cleared), len(self._held))
            released, self._held = self._held[:keep], self._held[keep:]
        if self.blocked is not None:
            self._held = []  # never released
        return [item for _, item in released]


# --------------------------------------------------------------------------------------------------
class ScreenBatch:
    """The screens of many streams whose checks run together: one classifier call for all that is due
    (the server's continuous batch runs it after each decode step, on its model thread)."""

    def __init__(self, moderator: Moderator):
        self.moderator = moderator
        self._due: dict[int, tuple[OutputScreen, Callable[[list[Any]], None]]] = {}

    def add(self, screen: OutputScreen, on_checked: Callable[[list[Any]], None]) -> None:
        """Check ``screen`` at the next :meth:`run`; ``on_checked(released items)`` follows (also with no
        items: the screen may have become blocked)."""
        self._due[id(screen)] = (screen, on_checked)

    def __len__(self) -> int:
        return len(self._due)

    def run(self) -> int:
        """Run every due check; returns how many texts were classified. When the batch's classification
        raises, each screen is checked alone, and a screen whose own check raises gets a :class:`ScreenFailed`
        (no items, the exception in ``error``) instead of its released items."""
        due, self._due = list(self._due.values()), {}
        plans = [(screen, callback, screen.checks()) for screen, callback in due]
        texts = [text for _, _, checks in plans for _, text in checks]
        try:
            verdicts = self.moderator.check_many(texts, "output") if texts else []
        except Exception:  # noqa: BLE001 - retried screen by screen below
            verdicts = None
        i = 0
        for screen, callback, checks in plans:
            if verdicts is not None:
                own = verdicts[i:i + len(checks)]
                i += len(checks)
            else:
                try:
                    own = self.moderator.check_many([text for _, text in checks], "output")
                except Exception as exc:  # noqa: BLE001 - handed to this stream's owner
                    log.exception("moderation check failed")
                    callback(ScreenFailed(exc))
                    continue
            callback(screen.apply(checks, own))
        return len(texts)


class ScreenFailed(list):
    """What :meth:`ScreenBatch.run` hands a screen's callback when its check raised (no items released)."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error
