"""Stopping a run cleanly on SIGTERM / SIGINT: the first signal asks for a checkpoint at the next step
boundary, a second one stops at once.

:class:`StopSignals` is a context manager that installs its handlers only while a run trains, only in
the main thread (Python delivers signals there and nowhere else), and puts the previous handlers back
on exit. The training loop reads :attr:`StopSignals.signum` at each step boundary (all processes of a
torchrun job agree on it through an all-reduce, see :class:`~.trainer.Trainer`).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Optional

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`signum` instead of ending the process; a second one
    raises KeyboardInterrupt (the run stops at once, without a checkpoint). ``enabled=False`` (or a
    thread other than the main one) installs nothing, and :attr:`signum` stays None."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if not self.enabled:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: SIGTERM / SIGINT keep their handlers during training")
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # No logging here: writing to a stream the interrupted code may be writing to (the progress bar's
        # stderr) can fail with a reentrant-call error. The training loop says what happens at the step.
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
