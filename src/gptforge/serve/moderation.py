"""The server's moderation (``gptforge serve --moderation``): the glue between the continuous batch and
:mod:`gptforge.moderation`.

Inputs are checked on the scheduler thread between decode steps (``Scheduler.run_job``) before a request's
sequences are queued. Each generated sequence's events go through a :class:`ScreenedSink`, which holds them in
an :class:`~gptforge.moderation.OutputScreen` until a check clears their text; the checks of every running
sequence that has text due run together after each decode step (``Scheduler.after_step``), on the model
thread, with no second engine. A blocked sequence is cancelled in the scheduler at once (its row is freed
before the next step, so it wastes no decoding) and its choice ends with ``finish_reason`` ``"content_filter"``;
the other sequences, of the same request or of others, go on untouched.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from ..moderation import Moderator, ScreenBatch, ScreenFailed, Verdict
from .metrics import Metrics
from .scheduler import Scheduler, Sequence, TokenEvent

log = logging.getLogger(__name__)

__all__ = ["ServerModeration", "ScreenedSink", "CONTENT_FILTER"]

CONTENT_FILTER = "content_filter"
"""The finish reason of a choice that moderation ended (OpenAI's name for it)."""
_ABNORMAL = ("cancelled", "error")  # ends that are not the output's: passed on at once, nothing released


class ServerModeration:
    """A :class:`~gptforge.moderation.Moderator` wired to the scheduler and the metrics."""

    def __init__(self, moderator: Moderator, scheduler: Scheduler, metrics: Metrics):
        self.moderator = moderator
        self.metrics = metrics
        self.batch = ScreenBatch(moderator)
        metrics.declare_moderation(moderator.block)
        scheduler.after_step = self.run_checks

    @property
    def refusal(self) -> str:
        return self.moderator.refusal

    def check_inputs(self, texts: list[str]) -> list[Verdict]:
        """The verdicts on a request's input texts (run on the scheduler thread); blocks are counted."""
        verdicts = self.moderator.check_many(texts, "input")
        self.metrics.count_moderation_checks("input", len(texts))
        for verdict in verdicts:
            if verdict.blocked:
                self.record(verdict)
        return verdicts

    def record(self, verdict: Verdict) -> None:
        self.metrics.count_moderation_block(verdict.side or "output", verdict.label or "")

    def run_checks(self) -> None:  # scheduler thread, after every step
        if len(self.batch):
            self.metrics.count_moderation_checks("output", self.batch.run())

    def sink(self, sink: Callable[[TokenEvent], None], index: int) -> "ScreenedSink":
        return ScreenedSink(self, sink, index)


class ScreenedSink:
    """A sequence's event sink that passes its events on only as their text is cleared (scheduler thread)."""

    def __init__(self, moderation: ServerModeration, sink: Callable[[TokenEvent], None], index: int):
        self.moderation = moderation
        self.screen = moderation.moderator.screen()
        self.sink = sink
        self.index = index
        self.sequence: Optional[Sequence] = None  # set once the sequence exists: a block cancels it
        self.closed = False

    @property
    def verdict(self) -> Optional[Verdict]:
        """The verdict that ended this sequence's output, if one did."""
        return self.screen.blocked

    def __call__(self, event: TokenEvent) -> None:
        if self.closed:  # after a block, the scheduler's own end of the sequence is not the client's business
            return
        if event.finish_reason in _ABNORMAL:
            self.closed = True
            self.sink(event)
            return
        self.screen.push(event.text, event, final=event.finish_reason is not None)
        if self.screen.due:
            self.moderation.batch.add(self.screen, self._checked)

    def _checked(self, released: list) -> None:
        if isinstance(released, ScreenFailed):  # logged by the batch; this output cannot be cleared
            self._end("error")
            return
        for event in released:
            self.sink(event)
        if self.screen.blocked is not None:
            self.moderation.record(self.screen.blocked)
            self._end(CONTENT_FILTER)

    def _end(self, reason: str) -> None:
        self.closed = True
        if self.sequence is not None:
            self.sequence.cancel(reason)  # its row is freed before the next decode step
        self.sink(TokenEvent(self.index, "", finish_reason=reason))
