"""Reading JSON lines with byte offsets: one file, every ``*.jsonl`` of a folder, or stdin.

Each complete line (ended by a newline) becomes an :class:`Item` (or a :class:`BadLine`) carrying the byte
offset just past it, where reading resumes after a restart. A line not yet ended by a newline may still be
being written by the producer, so it is left in place; only at the end of a run without ``--follow`` is an
unterminated last line taken, and then only if it is a whole JSON object.

A record is ``{"text": ..., "time": ..., "key": ...}`` plus any other fields: ``text`` is required (a
non-empty string), ``time`` is optional (ISO 8601, a naive one read as UTC, or epoch seconds), ``key``
optional (a string or a number, e.g. a ticker or a source name).
"""

from __future__ import annotations

import json
import math
import os
import select
import time as _time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

from ..errors import DataError, InvalidTextError
from ..tokenizer import check_text

STDIN = "-"
NO_KEY = "(no key)"
"""The key of items that give none."""
READ_CHUNK = 1 << 20


@dataclass
class Item:
    """One record read: where it came from, where reading resumes after it, and its text, key and time."""

    source: str
    line: int
    offset: int
    record: dict[str, Any]
    text: str
    key: str
    time: float
    """Epoch seconds: the record's own time, else the time it was read (``time_from`` says which)."""
    time_from: str


@dataclass
class BadLine:
    """A complete line that is not a usable record, and why."""

    source: str
    line: int
    offset: int
    message: str

    def describe(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


def parse_time(value: Any) -> float:
    """Epoch seconds of an ISO 8601 string (naive = UTC; a trailing Z allowed) or of a number of epoch seconds."""
    if isinstance(value, bool):
        raise ValueError(f"time must be ISO 8601 or epoch seconds, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"time must be a finite number, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"time {value!r} is neither ISO 8601 (e.g. 2026-12-07T09:30:00Z) nor epoch seconds") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    raise ValueError(f"time must be ISO 8601 or epoch seconds, got {type(value).__name__}")


def iso_time(seconds: float) -> str:
    """``2026-12-07T09:30:00Z`` (UTC; fractions of a second kept when there are any)."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def parse_line(raw: bytes, source: str, line: int, offset: int) -> Union[Item, BadLine]:
    """The record of one line, or why it is not one."""

    def bad(message: str) -> BadLine:
        return BadLine(source, line, offset, message)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(f"byte 0x{raw[exc.start]:02x} is not valid UTF-8")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return bad(f"not valid JSON ({exc.msg})")
    if not isinstance(record, dict):
        return bad(f"must be a JSON object, got a JSON {type(record).__name__}")
    body = record.get("text")
    if not isinstance(body, str) or not body.strip():
        return bad('needs a non-empty "text" string')
    try:
        check_text(body, '"text"')
    except InvalidTextError as exc:
        return bad(str(exc))
    key = record.get("key", NO_KEY)
    if isinstance(key, bool) or not isinstance(key, (str, int, float)) or str(key) == "":
        return bad(f'"key" must be a non-empty string or a number, got {json.dumps(key)}')
    if isinstance(key, str):
        try:
            check_text(key, '"key"')
        except InvalidTextError as exc:
            return bad(str(exc))
    if "time" in record and record["time"] is not None:
        try:
            when, time_from = parse_time(record["time"]), "item"
        except ValueError as exc:
            return bad(str(exc))
    else:
        when, time_from = _time.time(), "arrival"
    return Item(source, line, offset, record, body, str(key), when, time_from)


# --------------------------------------------------------------------------------------------------
class _Source:
    """The lines of one byte stream, from ``offset`` on; ``pending`` holds the bytes of an unended line."""

    def __init__(self, name: str, offset: int = 0, line: int = 0):
        self.name = name
        self.offset = offset  # just past the last line handed out
        self.line = line
        self.pending = b""

    def _take_lines(self, limit: int) -> list[tuple[int, int, bytes]]:
        out = []
        while len(out) < limit:
            end = self.pending.find(b"\n")
            if end < 0:
                break
            raw, self.pending = self.pending[:end], self.pending[end + 1:]
            self.line += 1
            self.offset += end + 1
            if raw.strip():
                out.append((self.line, self.offset, raw))
        return out

    def final_line(self) -> Optional[tuple[int, int, bytes]]:
        """The unended last line, if it is a whole JSON object (the stream is complete); else None."""
        raw = self.pending
        if not raw.strip():
            return None
        try:
            complete = isinstance(json.loads(raw.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False
        if not complete:
            return None
        self.pending = b""
        self.line += 1
        self.offset += len(raw)
        return self.line, self.offset, raw


class FileSource(_Source):
    def __init__(self, path: Path, name: str, offset: int = 0, line: int = 0):
        super().__init__(name, offset, line)
        self.path = path

    def read(self, limit: int) -> list[tuple[int, int, bytes]]:
        lines = self._take_lines(limit)
        if len(lines) >= limit:
            return lines
        position = self.offset + len(self.pending)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"input file {self.path} disappeared while being read") from None
        if size < position:
            raise DataError(f"input file {self.path} is shorter ({size} bytes) than the {position} bytes already read: "
                            f"it was truncated or replaced; monitor the new file into a new --out folder")
        while size > position and len(lines) < limit:
            with open(self.path, "rb") as f:
                f.seek(position)
                chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            self.pending += chunk
            position += len(chunk)
            lines += self._take_lines(limit - len(lines))
        return lines


class StdinSource(_Source):
    def __init__(self, stream: BinaryIO):
        super().__init__(STDIN)
        self.stream = stream
        self.eof = False
        try:
            self.fd: Optional[int] = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None

    def read(self, limit: int) -> list[tuple[int, int, bytes]]:
        lines = self._take_lines(limit)
        while len(lines) < limit and not self.eof:
            if self.fd is not None:
                ready, _, _ = select.select([self.fd], [], [], 0)
                if not ready:
                    break
                chunk = os.read(self.fd, READ_CHUNK)
            else:
                chunk = self.stream.read(READ_CHUNK)
            if not chunk:
                self.eof = True
                break
            self.pending += chunk
            lines += self._take_lines(limit - len(lines))
        return lines


class Inputs:
    """Every source of ``--input``: ``poll`` hands out up to ``limit`` complete lines, the sources in a stable
    order (a folder's files by name; files that appear later join in)."""

    def __init__(self, path: str, positions: dict[str, tuple[int, int]], stdin: Optional[BinaryIO] = None):
        self.path = path
        self.positions = positions  # source name -> (offset, line) to start from
        self.sources: dict[str, _Source] = {}
        if path == STDIN:
            self.kind = "stdin"
            import sys

            self.sources[STDIN] = StdinSource(stdin if stdin is not None else sys.stdin.buffer)
            return
        p = Path(path)
        if p.is_dir():
            self.kind = "folder"
        elif p.is_file():
            self.kind = "file"
        elif p.exists():
            raise DataError(f"input {path} is neither a file nor a folder")
        else:
            raise DataError(f"input {path} does not exist")
        self._discover()

    def _discover(self) -> None:
        p = Path(self.path)
        if self.kind == "file":
            names = [(p, p.name)]
        else:
            names = [(f, f.name) for f in sorted(p.glob("*.jsonl")) if f.is_file() and not f.name.startswith(".")]
        for file, name in names:
            if name not in self.sources:
                offset, line = self.positions.get(name, (0, 0))
                self.sources[name] = FileSource(file, name, offset, line)

    @property
    def at_end(self) -> bool:
        """Whether no more lines can come without --follow: files are read to their end; stdin has closed."""
        return all(getattr(s, "eof", True) for s in self.sources.values())

    def poll(self, limit: int) -> list[tuple[str, int, int, bytes]]:
        """Up to ``limit`` complete lines as (source, line number, offset past it, bytes)."""
        if self.kind == "folder":
            self._discover()
        out: list[tuple[str, int, int, bytes]] = []
        for name, source in list(self.sources.items()):
            if len(out) >= limit:
                break
            if self.kind == "folder" and not source.path.exists():  # deleted (rotated away): nothing more to read
                import logging

                logging.getLogger(__name__).warning("%s was removed from %s; no longer read", name, self.path)
                del self.sources[name]
                continue
            out += [(name, *line) for line in source.read(limit - len(out))]
        return out

    def final_lines(self) -> list[tuple[str, int, int, bytes]]:
        """At the end of a run without --follow: each source's unended last line that is a whole record."""
        out = []
        for name, source in self.sources.items():
            last = source.final_line()
            if last is not None:
                out.append((name, *last))
            elif source.pending.strip():
                import logging

                logging.getLogger(__name__).warning(
                    "%s ends with an unfinished line (no newline, not yet a whole JSON object); it is left for the "
                    "next run", name)
        return out
