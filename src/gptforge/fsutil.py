"""Crash-safe file writing: fsync, and folders published whole by rename.

Used by checkpoints, Hugging Face exports and prepared data alike, so that a process killed at any
moment leaves either the previous folder or the complete new one, never a half-written one.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import CheckpointError, GptforgeError


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities) replaced by None, so that it serialises as
    strict JSON (``json.dumps(..., allow_nan=False)`` accepts it). Walks dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON; readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_folder(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target`` (replacing one that is there), durably.

    Every file in ``tmp`` is fsynced first. An existing ``target`` is renamed aside, the new folder renamed
    in, then the old one deleted: a crash in between leaves both folders on disk and nothing half-written.
    """
    for f in tmp.iterdir():
        if f.is_file():
            fsync_file(f)
    fsync_dir(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


def check_output_dir(out: Path, replaceable: bool, what: str) -> None:
    """Refuse to replace a folder with other things in it: `--out .` must never wipe a project.

    ``replaceable`` says whether ``out`` already is ``what`` (a folder a new one may replace).
    """
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not replaceable)):
        raise CheckpointError(f"output folder {out} already exists and is not {what}; choose a new folder")


# --------------------------------------------------------------------------------------------------
# Reading users' text files: one error naming the file, the line and the byte, never a traceback
def read_utf8(path: Path, what: str = "", error: type[GptforgeError] = GptforgeError) -> str:
    """The text of a UTF-8 file (a byte-order mark skipped). A file that is missing, unreadable or not UTF-8
    is one ``error`` naming ``what`` (e.g. "prompt file") and the path, and for bad bytes the line and the
    byte; the text is never decoded with replacement characters."""
    name = f"{what} {path}" if what else str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except IsADirectoryError:
        raise error(f"{name} is a folder, not a file") from None
    except OSError as exc:
        raise error(f"cannot read {name}: {exc.strerror or exc}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{name} is not UTF-8: byte 0x{data[exc.start]:02x} on line {line} is not valid UTF-8; "
                    "save the file as UTF-8") from None


def jsonl_objects(lines: Iterable[str], where: str, error: type[GptforgeError] = GptforgeError
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of JSON lines; a line that is not JSON, or not a JSON
    object, is one ``error`` naming ``where`` (the file) and the line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where} line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise error(f"{where} line {number} must be a JSON object, got a JSON {type(record).__name__}")
        yield number, record
