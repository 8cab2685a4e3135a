"""Raw text → ``train.bin`` / ``val.bin`` token files, ``meta.json`` and the tokenizer's files.

Two streaming passes over the corpus: the first trains the tokenizer (skipped when one is reused with
``tokenizer_from``), the second encodes the text in batches and appends the ids to the split files, with
the end-of-text id after every document. Memory stays bounded by one batch whatever the corpus size.

The train/val split is deterministic: the text is cut into chunks (at most :data:`CHUNK_CHARS` characters,
smaller for a small corpus so that both splits get several) and chunk ``i`` goes to val exactly when
``floor((i + 1) * val_fraction)`` steps up, which spreads val evenly through the corpus and always gives
the first chunk to train. If that left val empty (a corpus of very few chunks), the last chunk goes to val;
a corpus of a single chunk is cut in two at a line end.

Everything is written into a hidden sibling folder that replaces ``out_dir`` only once complete, so a
failed run (say, on an empty corpus) leaves an earlier prepared folder as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from ..fsutil import publish_folder
from ..tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from .corpus import Corpus, Piece, resolve_corpus, split_point
from .tokens import FORMAT_VERSION, META_FILE, SPLIT_FILES

log = logging.getLogger(__name__)

TOKENIZER_KINDS = ("bpe", "char")
CHUNK_CHARS = 64 * 1024
"""Largest unit of text that goes to one split."""
MIN_CHUNK_CHARS = 256
"""Smallest chunk a small corpus is cut into, so that tokens are not cut off from their context."""
BATCH_CHARS = 1 << 20
"""Characters encoded per ``encode_batch`` call; bounds memory in the second pass."""
_N_BYTE_IDS = 256


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be at least 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_corpus(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    tokenizer_from: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize ``corpus`` into ``out_dir`` and return the ``meta.json`` written there.

    ``tokenizer`` is ``"bpe"`` (byte-level BPE with ``vocab_size`` ids) or ``"char"`` (one id per
    character, keeping the ``vocab_size - 257`` most frequent ones; rarer characters fall back to bytes).
    ``tokenizer_from`` reuses the tokenizer of a checkpoint, prepared-data or Hugging Face folder instead
    of training one, so that the data matches a model; ``tokenizer`` and ``vocab_size`` are then unused.
    """
    _check_options(tokenizer, vocab_size, val_fraction)
    source = resolve_corpus(corpus)
    # Resolved, so that the temporary sibling of "." or "a/.." is a real sibling.
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)

    if tokenizer_from is not None:
        tok = _reuse_tokenizer(tokenizer_from)
    else:
        tok = _train_tokenizer(source, tokenizer, vocab_size, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write_prepared(source, tok, tmp, val_fraction, progress)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug(
        "prepared %s into %s: %d documents, %s train and %s val tokens (%s tokenizer, %d ids)",
        source.spec, out, meta["documents"], f"{meta['train']['tokens']:,}", f"{meta['val']['tokens']:,}",
        tok.kind, tok.vocab_size,
    )
    return meta


# --------------------------------------------------------------------------------------------------
def _check_options(tokenizer: str, vocab_size: int, val_fraction: float) -> None:
    if tokenizer not in TOKENIZER_KINDS:
        raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, got {tokenizer!r}")
    # bool is an int; a flag passed where a size belongs is a mistake.
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    least = _N_BYTE_IDS + (1 if tokenizer == "bpe" else 2)  # bytes + EOS (+ one character for char)
    if vocab_size < least:
        raise ConfigError(f"vocab_size for a {tokenizer} tokenizer must be at least {least}, got {vocab_size}")
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")


def _check_out_dir(out: Path) -> None:
    # Replacing out_dir deletes it, so only ever replace an earlier prepared folder or an empty one.
    if out.is_file():
        raise DataError(f"output folder {out} is a file")
    if out.is_dir() and not (out / META_FILE).is_file() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty and holds no earlier prepared data; "
                        "choose a new or empty folder")


def _reuse_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"tokenizer folder {path} not found")
    tok = load_tokenizer(path)
    log.info("reusing the %s tokenizer from %s (%d ids, fingerprint %s)", tok.kind, path, tok.vocab_size,
             tok.fingerprint)
    return tok


def _train_tokenizer(source: Corpus, kind: str, vocab_size: int, progress: bool) -> Tokenizer:
    with _progress_bar(source.total_bytes, f"training {kind} tokenizer", progress) as bar:
        texts = _counting_bytes(source.texts(), bar)
        if kind == "char":
            tok: Tokenizer = CharTokenizer.train(texts, max_chars=vocab_size - _N_BYTE_IDS - 1)
        else:
            tok = BPETokenizer.train(texts, vocab_size)
        _finish(bar)
    log.info("trained a %s tokenizer with %d ids (fingerprint %s)", tok.kind, tok.vocab_size, tok.fingerprint)
    return tok


def _write_prepared(source: Corpus, tok: Tokenizer, folder: Path, val_fraction: float,
                    progress: bool) -> dict[str, Any]:
    dtype = token_dtype(tok.vocab_size)
    eos = tok.eos_id
    if eos is None:
        log.warning("the tokenizer has no end-of-text token; documents will run into each other")
    counts = {split: {"tokens": 0, "bytes": 0} for split in SPLIT_FILES}
    documents = 0
    chunk_chars = _chunk_chars(source.total_bytes, val_fraction)
    pieces = source.pieces()

    with _progress_bar(source.total_bytes, "encoding", progress) as bar, \
            open(folder / SPLIT_FILES["train"], "wb") as train_file, \
            open(folder / SPLIT_FILES["val"], "wb") as val_file:
        files: dict[str, BinaryIO] = {"train": train_file, "val": val_file}
        assigned = _assign_splits(_chunks(pieces, chunk_chars), val_fraction, source.spec)
        for batch in _batches(assigned, BATCH_CHARS):
            encoded = tok.encode_batch([piece.text for _, piece in batch])
            for (split, piece), ids in zip(batch, encoded):
                if piece.document_end:
                    documents += 1
                    if eos is not None:
                        ids.append(eos)
                np.asarray(ids, dtype=dtype).tofile(files[split])
                n_bytes = len(piece.text.encode("utf-8"))
                counts[split]["tokens"] += len(ids)
                counts[split]["bytes"] += n_bytes
                bar.update(n_bytes)
        _finish(bar)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())

    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "eos_id": eos},
        "train": counts["train"],
        "val": counts["val"],
        "corpus": str(source.spec),
        "documents": documents,
        "val_fraction": val_fraction,
    }
    tok.save(folder)
    meta_path = folder / META_FILE
    with open(meta_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return meta


def _chunk_chars(total_bytes: int, val_fraction: float) -> int:
    # Aim for at least four chunks in the smaller split, within [MIN_CHUNK_CHARS, CHUNK_CHARS].
    wanted = int(total_bytes * min(val_fraction, 1 - val_fraction) / 4)
    return max(MIN_CHUNK_CHARS, min(CHUNK_CHARS, wanted))


def _chunks(pieces: Iterable[Piece], size: int) -> Iterator[Piece]:
    """Cut pieces into chunks of at most ``size`` characters; only a document's last chunk ends it."""
    for piece in pieces:
        text = piece.text
        while len(text) > size:
            cut = split_point(text, size)
            yield Piece(text[:cut], False)
            text = text[cut:]
        yield Piece(text, piece.document_end)


def _assign_splits(chunks: Iterable[Piece], val_fraction: float, spec: str) -> Iterator[tuple[str, Piece]]:
    """Label each chunk ``train`` or ``val``; both labels are always used (see the module docstring)."""
    index = 0
    val_used = False
    held: Piece | None = None  # one chunk of look-ahead, to know which chunk is the last
    for chunk in chunks:
        if held is not None:
            split = _split_of(index, val_fraction)
            val_used = val_used or split == "val"
            yield split, held
            index += 1
        held = chunk
    if held is None:
        return
    if index == 0:  # the whole corpus is one chunk
        if len(held.text) < 2:
            raise DataError(f"corpus {spec} is too small to split into train and val")
        cut = split_point(held.text, len(held.text) // 2)
        yield "train", Piece(held.text[:cut], False)
        yield "val", Piece(held.text[cut:], held.document_end)
    elif not val_used:
        yield "val", held
    else:
        yield _split_of(index, val_fraction), held


def _split_of(index: int, val_fraction: float) -> str:
    return "val" if math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction) else "train"


def _batches(items: Iterable[tuple[str, Piece]], max_chars: int) -> Iterator[list[tuple[str, Piece]]]:
    batch: list[tuple[str, Piece]] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item[1].text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=not enabled, leave=False)


def _counting_bytes(texts: Iterable[str], bar) -> Iterator[str]:
    for text in texts:
        if not bar.disable:
            bar.update(len(text.encode("utf-8")))
        yield text


def _finish(bar) -> None:
    # The bar's total is the files' size on disk, which JSONL markup and CRLF line ends make larger
    # than the text; close the gap so that a finished pass reads 100%.
    if not bar.disable and bar.total and bar.n < bar.total:
        bar.update(bar.total - bar.n)
