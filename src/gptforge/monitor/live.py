"""What a monitor folder holds, read back: each key's share series and the recent alerts.

Used by the trend plot at the start of a resumed run and by ``gptforge serve --monitor DIR``'s
``/v1/monitor`` (which polls it while the monitor writes: only whole lines are read, and only the last
``max_bytes`` of each file, so that a large folder answers as fast as a small one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .state import ALERTS_FILE, RESULTS_FILE, STATE_FILE

TAIL_BYTES = 4 << 20


def read_jsonl_tail(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The JSON objects of the complete lines in the last ``max_bytes`` of ``path`` ([] when it is missing)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(size - start)
    except FileNotFoundError:
        return []
    if start:
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    out = []
    for raw in data.split(b"\n")[:-1]:  # the last piece is empty or an unfinished line
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def series_of(results: list[dict[str, Any]], max_points: Optional[int] = None) -> dict[str, list[dict[str, Any]]]:
    """Per key, the points ``{"t": epoch seconds, "time": ISO, "shares": {...}, "items": n, "label": ...}`` of
    result lines (the window's shares after each item), oldest first, the last ``max_points`` of each."""
    from .reader import parse_time

    keys: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        window = r.get("window")
        if not isinstance(window, dict) or "key" not in r or "time" not in r:
            continue
        try:
            t = parse_time(r["time"])
        except ValueError:
            continue
        keys.setdefault(str(r["key"]), []).append({"t": t, "time": r["time"], "shares": window.get("shares", {}),
                                                   "items": window.get("items"), "label": r.get("label")})
    if max_points is not None:
        keys = {k: v[-max_points:] for k, v in keys.items()}
    return keys


def _state_as_written(folder: Path) -> dict[str, Any]:
    """The folder's state.json as the monitor last wrote it; empty while there is none or it is not JSON."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def monitor_labels(folder: str | Path) -> Optional[list[str]]:
    """The labels of the classifier a monitor folder was written with; None while it holds no state yet."""
    labels = _state_as_written(Path(folder)).get("settings", {}).get("labels")
    return [str(label) for label in labels] if isinstance(labels, list) else None


def read_monitor(folder: str | Path, *, max_points: int = 500, max_alerts: int = 50) -> dict[str, Any]:
    """The monitor folder as the live page draws it: labels, alert rules, per-key series, recent alerts."""
    from .reader import parse_time

    folder = Path(folder)
    state = _state_as_written(folder)
    settings = state.get("settings", {})
    series = series_of(read_jsonl_tail(folder / RESULTS_FILE), max_points)
    alerts = [a for a in read_jsonl_tail(folder / ALERTS_FILE) if a.get("type") == "alert"][-max_alerts:]
    for a in alerts:
        try:
            a["t"] = parse_time(a["time"])
        except (KeyError, ValueError):
            a["t"] = None
    return {
        "object": "monitor",
        "folder": str(folder),
        "started": bool(state),
        "labels": settings.get("labels", []),
        "alert_rules": settings.get("alerts", []),
        "window": {"items": settings.get("window_items"), "minutes": settings.get("window_minutes")},
        "items": state.get("items", 0),
        "updated": state.get("updated"),
        "keys": [{"key": key, "points": points, "last": points[-1]} for key, points in sorted(series.items())],
        "alerts": alerts,
    }
