"""Rolling windows per key and the alerts they raise.

A key's window holds its last N items (``window_items``), or the items of the last T seconds by item time
(``window_seconds``: those with a time after the newest time seen minus T), or both at once. After each
item the share of every label over the window is known; an alert rule ``(label, share)`` fires when that
label's share reaches the threshold over a window of at least ``min_items`` items, once: it is re-armed only
when the share falls back below ``threshold - hysteresis``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass
class Alert:
    """A label's share over a key's window reached its threshold."""

    key: str
    label: str
    share: float
    threshold: float
    items: int
    """Items in the window when it fired."""
    time: str
    """ISO 8601 time of the item that made it fire."""
    source: str
    offset: int
    text: str

    @property
    def id(self) -> str:
        """Unique per crossing: the item that caused it and the rule (a restart uses it to write each alert once)."""
        return f"{self.source}:{self.offset}:{self.key}:{self.label}"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "alert", "id": self.id, "key": self.key, "label": self.label, "share": self.share,
                "threshold": self.threshold, "items": self.items, "time": self.time, "source": self.source,
                "offset": self.offset, "text": self.text}

    def describe(self) -> str:
        return (f"alert: {self.key}: {self.label} share {self.share:.2f} >= {self.threshold:g} over the last "
                f"{self.items} items (at {self.time}, {self.source} offset {self.offset})")


class Window:
    """One key's items: (time, label index), oldest first."""

    def __init__(self, n_labels: int):
        self.entries: deque[tuple[float, int]] = deque()
        self.counts = [0] * n_labels
        self.newest: Optional[float] = None

    def add(self, when: float, label: int, max_items: Optional[int], max_seconds: Optional[float]) -> None:
        self.entries.append((when, label))
        self.counts[label] += 1
        self.newest = when if self.newest is None else max(self.newest, when)
        if max_items is not None:
            while len(self.entries) > max_items:
                self.counts[self.entries.popleft()[1]] -= 1
        if max_seconds is not None:
            cutoff = self.newest - max_seconds
            if any(t <= cutoff for t, _ in self.entries):  # items may arrive out of time order
                kept = deque()
                for t, lab in self.entries:
                    if t > cutoff:
                        kept.append((t, lab))
                    else:
                        self.counts[lab] -= 1
                self.entries = kept

    def shares(self) -> list[float]:
        n = len(self.entries)
        return [c / n if n else 0.0 for c in self.counts]


class WindowTracker:
    """Every key's window and every (key, rule) arm state; :meth:`add` returns the alerts an item raises."""

    def __init__(self, labels: Sequence[str], rules: Sequence[tuple[str, float]], *, window_items: Optional[int],
                 window_seconds: Optional[float], min_items: int, hysteresis: float = 0.0):
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.rules = list(rules)
        self.window_items = window_items
        self.window_seconds = window_seconds
        self.min_items = min_items
        self.hysteresis = hysteresis
        self.windows: dict[str, Window] = {}
        self.armed: dict[str, dict[str, bool]] = {}  # key -> label -> armed

    def add(self, key: str, when: float, label: str) -> tuple[int, dict[str, float], list[tuple[str, float, float]]]:
        """Put an item in its key's window: (items in the window, share per label, [(label, share, threshold)]
        of the rules that fire)."""
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window(len(self.labels))
        window.add(when, self.index[label], self.window_items, self.window_seconds)
        shares = dict(zip(self.labels, window.shares()))
        n = len(window.entries)
        armed = self.armed.setdefault(key, {})
        fired = []
        for rule_label, threshold in self.rules:
            share = shares[rule_label]
            if armed.get(rule_label, True):
                if n >= self.min_items and share >= threshold:
                    armed[rule_label] = False
                    fired.append((rule_label, share, threshold))
            elif share < threshold - self.hysteresis:
                armed[rule_label] = True
        return n, shares, fired

    # ---- state.json
    def to_state(self) -> dict[str, Any]:
        return {"windows": {key: [[t, lab] for t, lab in w.entries] for key, w in self.windows.items()},
                "newest": {key: w.newest for key, w in self.windows.items()},
                "armed": {key: dict(a) for key, a in self.armed.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        for key, entries in state.get("windows", {}).items():
            window = self.windows[key] = Window(len(self.labels))
            for t, lab in entries:
                window.entries.append((float(t), int(lab)))
                window.counts[int(lab)] += 1
            window.newest = state.get("newest", {}).get(key)
        rule_labels = {label for label, _ in self.rules}
        # Arm states of rules given again carry over; a new rule starts armed.
        self.armed = {key: {label: bool(v) for label, v in a.items() if label in rule_labels}
                      for key, a in state.get("armed", {}).items()}
