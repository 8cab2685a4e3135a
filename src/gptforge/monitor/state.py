"""The monitor folder: results and alerts appended as JSON lines, and ``state.json`` written after them.

Commit order per batch: the results are appended and fsynced, then the alerts, then ``state.json`` is
replaced atomically (temp file, fsync, rename). ``state.json`` records each input's byte offset and line
number, the windows and the arm state of every alert rule, and the sizes of results.jsonl and alerts.jsonl
it covers. A crash between the appends and the state write leaves result lines past the recorded size: a
restart reads them back (each names its source and offset), moves the offsets past them and replays them
through the windows, so that no item is classified twice and none is lost; alerts already written are not
written again. A line torn by a crash mid-append is cut off (its item is read again).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import DataError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
RESULTS_FILE = "results.jsonl"
ALERTS_FILE = "alerts.jsonl"
TREND_FILE = "trend.png"
STATE_VERSION = 1


def read_state(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); it is not a monitor state file") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise DataError(f"{path} is not a gptforge monitor state file (version {STATE_VERSION})")
    return state


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Replace state.json: a temporary file, fsynced, renamed over it.

    Unlike :func:`~gptforge.fsutil.write_json_atomic` the folder is not fsynced after the rename (one fsync less
    per batch, a third of the monitor's time on small batches): a power cut that undoes the rename leaves the
    previous state.json, and the results appended since are then found and replayed like any others."""
    path = folder / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cut_torn_line(path: Path) -> None:
    """Cut a last line without its newline (an append a crash interrupted) off ``path``."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        while True:  # find the last newline, reading back a MiB at a time
            f.seek(start)
            block = f.read(size - start)
            at = block.rfind(b"\n")
            if at >= 0 or start == 0:
                keep = start + at + 1 if at >= 0 else 0
                break
            start = max(0, start - (1 << 20))
        log.warning("%s ends with a torn line (%d bytes, written when the monitor stopped mid-append); cut off",
                    path, size - keep)
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def lines_after(path: Path, size: int) -> list[dict[str, Any]]:
    """The JSON objects of ``path`` past byte ``size`` (what the last state write did not cover)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(size)
        data = f.read()
    out = []
    for raw in data.split(b"\n"):
        if raw.strip():
            out.append(json.loads(raw))
    return out


class Appender:
    """An append-only JSON-lines file, flushed and fsynced per batch."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "ab")

    @property
    def size(self) -> int:
        return self.file.tell()

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.file.write(b"".join(_dumps(r) + b"\n" for r in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _dumps(record: dict[str, Any]) -> bytes:
    from ..fsutil import json_safe

    text = json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in some input field: keep it as a JSON escape
        return json.dumps(json_safe(record), allow_nan=False).encode("ascii")
