"""Checkpoints: folders written atomically, loaded only when complete.

A checkpoint folder holds ``model.safetensors``, ``config.json`` (the full resolved config), the tokenizer
files, and, for training state, ``optimizer.pt`` and ``trainer_state.json``. It is written to a hidden
temporary folder, every file fsynced, a ``COMPLETE`` marker written last, then renamed into place. A run
folder keeps its checkpoints in ``checkpoints/step-NNNNNNN`` and a ``checkpoints/latest`` pointer that is
replaced (atomically) only after the folder it names is complete. A folder without the marker is never
loaded; if ``latest`` names one, the newest complete folder is used instead. ``latest`` holds a plain folder
name inside ``checkpoints/``; anything else (a path, ``..``, a symlink out of the folder) is refused.

The ``COMPLETE`` marker records the SHA-256 of every other file in the folder (JSON, see
:func:`read_checksums`); every loader and the resume path verify the files they read against it and name
the one that differs (:func:`verify_checkpoint`). Folders written before checksums existed hold ``ok``
there and load unverified. A checkpoint whose weights hold NaN or infinity is never written, ``latest``
never names one, rotation keeps the newest finite one, and loading one is refused.

A fine-tuning run folder (one with a complete ``best/``) given where a checkpoint is expected means its
``best/`` (:func:`resolve_checkpoint`); the loaders log at INFO which folder they loaded.

This module is also the one place that composes a model on load: :func:`load_pretrained` takes a gptforge
folder, a Hugging Face folder or hub id (through :mod:`gptforge.convert`), and :func:`load_task_checkpoint`
puts a task head (:mod:`gptforge.heads`) and re-applied adapters (:mod:`gptforge.peft`) on its base model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .backends import prepare_for_inference
from .config import InferenceConfig, ModelConfig, config_from_dict
from .convert import download_from_hub, export_hf, hf_weight_files, is_hf_folder, load_hf_folder
from .errors import CheckpointError
from .fsutil import check_output_dir, fsync_dir, fsync_file, publish_folder
from .runtime import inference_dtype, resolve_device
from .heads import TaskModel, head_state_dict, load_head
from .model import GPT
from .peft import load_peft
from .tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from .weights import (Checkpoint, build_model, first_nonfinite, load_state_dict, model_state_for_saving,
                      unwrap_model)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
COMPLETE_MARKER = "COMPLETE"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
BEST_DIR = "best"  # a fine-tuning run's best validation checkpoint (gptforge.finetune.loop writes it)
CHECKSUM_ALGORITHM = "sha256"
MARKER_FORMAT = 1
_LEGACY_MARKERS = ("", "ok")  # what COMPLETE held before checksums were recorded


# --------------------------------------------------------------------------------------------------
# Checksums
def file_checksum(path: str | Path) -> str:
    """The SHA-256 of a file, as hex (``sha256sum`` prints the same).

    SHA-256 rather than BLAKE2b: with the SHA extensions of current x86 and ARM CPUs hashlib's SHA-256 reads
    about 1.5 GB/s against BLAKE2b's 0.8 GB/s (measured on the machine of docs/training.md's figures)."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+
            return hashlib.file_digest(f, CHECKSUM_ALGORITHM).hexdigest()
        digest = hashlib.new(CHECKSUM_ALGORITHM)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest()


def _checksummed_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.relative_to(folder).as_posix() != COMPLETE_MARKER)


def _write_marker(folder: Path) -> None:
    """Write the COMPLETE marker, recording the checksum of every other file in ``folder``."""
    files = {f.relative_to(folder).as_posix(): file_checksum(f) for f in _checksummed_files(folder)}
    record = {"format": MARKER_FORMAT, "algorithm": CHECKSUM_ALGORITHM, "files": files}
    (folder / COMPLETE_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_checksums(path: str | Path) -> Optional[dict[str, str]]:
    """{file name: SHA-256 hex} recorded in the checkpoint's COMPLETE marker; None for a checkpoint written
    before checksums were recorded (its marker holds ``ok``). CheckpointError if the marker is damaged."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        text = marker.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the {COMPLETE_MARKER} marker of checkpoint {path}: {exc}") from None
    if text.strip() in _LEGACY_MARKERS:
        return None
    try:
        record = json.loads(text)
        files = record["files"]
        if record.get("algorithm") != CHECKSUM_ALGORITHM or not isinstance(files, dict) \
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError
    except (ValueError, TypeError, KeyError):
        raise CheckpointError(f"the {COMPLETE_MARKER} marker of checkpoint {path} is damaged (it should hold the "
                              f"{CHECKSUM_ALGORITHM} checksums of the folder's files); use an earlier checkpoint") from None
    return files


def verify_checkpoint(path: str | Path, *, skip: tuple[str, ...] = ()) -> None:
    """Check every file the checkpoint's marker records (but those in ``skip``) against its checksum;
    CheckpointError naming the first file that is missing or differs. A checkpoint without recorded
    checksums (written by an older gptforge) passes unverified."""
    path = Path(path)
    recorded = read_checksums(path)
    if recorded is None:
        log.debug("checkpoint %s records no checksums (written by an older gptforge); not verified", path)
        return
    for name, expected in recorded.items():
        if name in skip:
            continue
        file = path / name
        if not _inside(file, path) or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing; use an earlier checkpoint")
        if file_checksum(file) != expected:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match the checksum recorded "
                                  f"when it was saved; use an earlier checkpoint")


def weights_fingerprint(folder: str | Path) -> str:
    """``sha256:<hex>`` of a model folder's weights: a gptforge checkpoint's model.safetensors (the checksum its
    marker records, else computed), or a Hugging Face folder's weight files. Adapter folders record their
    base model's fingerprint to find and check it on load."""
    folder = Path(folder)
    if is_complete(folder):
        recorded = read_checksums(folder) or {}
        return f"{CHECKSUM_ALGORITHM}:{recorded.get(MODEL_FILE) or file_checksum(folder / MODEL_FILE)}"
    files = hf_weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder} holds no model weights to fingerprint")
    if len(files) == 1:
        return f"{CHECKSUM_ALGORITHM}:{file_checksum(files[0])}"
    lines = "".join(f"{f.name} {file_checksum(f)}\n" for f in files)
    return f"{CHECKSUM_ALGORITHM}:{hashlib.sha256(lines.encode()).hexdigest()}"


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies inside ``folder``."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Writing
def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    config: dict[str, Any],
    *,
    optimizer_state: Optional[dict[str, Any]] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    extra: Optional[Callable[[Path], None]] = None,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically (replacing one that is there).

    ``state`` replaces the model's own state dict as the weights written (task checkpoints use it to
    store a head beside the base model's tensors); ``extra`` writes more files into the folder. Weights
    holding NaN or infinity are refused (CheckpointError naming the tensor) before anything is written.
    An ``adapter`` section with an absolute ``base_checkpoint`` gains ``base_relative``: that path relative
    to ``path``, so that the adapter finds its base after both folders move together.
    """
    from safetensors.torch import save_file

    path = Path(path)
    weights = model_state_for_saving(model) if state is None else state
    bad = first_nonfinite(weights)
    if bad is not None:
        raise CheckpointError(f"refusing to save checkpoint {path}: tensor {bad} holds NaN or infinite values "
                              f"(the run diverged); earlier checkpoints are kept as they are")
    config = _with_relative_base(dict(config), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        config.setdefault("tokenizer", {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                                        "vocab_size": tokenizer.vocab_size})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        if trainer_state is not None:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        if extra is not None:
            extra(tmp)
        for f in tmp.iterdir():
            fsync_file(f)
        _write_marker(tmp)  # last: its presence vouches for every other file, its checksums for their bytes
        publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", path)
    return path


def update_latest(run_dir: str | Path, checkpoint_name: str) -> None:
    """Point ``run_dir/checkpoints/latest`` at a complete checkpoint folder (written last)."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    if not _is_plain_name(checkpoint_name):
        raise CheckpointError(f"'latest' must name a folder inside {ckpt_root}, not {checkpoint_name!r}")
    if not is_complete(ckpt_root / checkpoint_name):
        raise CheckpointError(f"refusing to point 'latest' at incomplete checkpoint {ckpt_root / checkpoint_name}")
    if not _is_finite_checkpoint(ckpt_root / checkpoint_name):
        raise CheckpointError(f"refusing to point 'latest' at checkpoint {ckpt_root / checkpoint_name}: its weights "
                              f"hold NaN or infinite values")
    tmp = ckpt_root / f".{LATEST_POINTER}.tmp-{os.getpid()}"
    tmp.write_text(checkpoint_name + "\n")
    fsync_file(tmp)
    os.replace(tmp, ckpt_root / LATEST_POINTER)
    fsync_dir(ckpt_root)


def prune_checkpoints(run_dir: str | Path, keep: int, protect: tuple[str, ...] = ()) -> None:
    """Delete all but the newest ``keep`` step folders and stale temp folders. Never deleted: a folder named
    in ``protect``, the one ``latest`` names, and the newest complete checkpoint with finite weights."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    protect = tuple(protect)
    pointer = root / LATEST_POINTER
    if pointer.is_file():
        try:
            protect += (pointer.read_text(encoding="utf-8").strip(),)
        except (OSError, UnicodeDecodeError):
            pass
    newest_finite = next((p for p in reversed(steps) if is_complete(p) and _is_finite_checkpoint(p)), None)
    if newest_finite is not None:
        protect += (newest_finite.name,)
    for p in steps[:-keep] if keep > 0 else []:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _is_finite_checkpoint(path: Path) -> bool:
    """Whether a complete checkpoint's weights are finite: certain for one with recorded checksums (saving
    refuses non-finite weights), read and checked for an older one."""
    try:
        if read_checksums(path) is not None:
            return True
        return first_nonfinite(load_state_dict(path / MODEL_FILE, finite=False)) is None
    except CheckpointError:
        return False


def _with_relative_base(config: dict[str, Any], path: Path) -> dict[str, Any]:
    adapter = config.get(ADAPTER_SECTION)
    base = adapter.get("base_checkpoint") if isinstance(adapter, dict) else None
    if isinstance(base, str) and Path(base).is_absolute():
        try:
            relative = os.path.relpath(base, path.resolve())
        except ValueError:  # another drive (Windows)
            return config
        config[ADAPTER_SECTION] = {**adapter, "base_relative": Path(relative).as_posix()}
    return config


# --------------------------------------------------------------------------------------------------
# Finding and reading
def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def is_complete(path: str | Path) -> bool:
    p = Path(path)
    return (p / COMPLETE_MARKER).is_file() and (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file()


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint ``latest`` names; else the newest complete step folder; else None."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_POINTER
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {pointer}: {exc}") from None
        target = root / name
        if not _is_plain_name(name) or (target.exists() and not _inside(target, root)):
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder inside {root}; "
                                  f"it must hold a folder name such as step-0000100")
        if is_complete(target):
            return target
        log.warning("checkpoint %s named by 'latest' is incomplete; looking for an older one", target)
    for p in sorted(root.glob("step-*"), reverse=True):
        if is_complete(p):
            return p
    return None


def find_resume_checkpoint(run_dir: str | Path, required_files: tuple[str, ...] = ()) -> Path:
    """The checkpoint a resumed run in ``run_dir`` continues from: its latest complete one, which must also
    hold each of ``required_files`` (the trainer state, the optimizer, ...); CheckpointError if there is none.
    Every file is verified against the checksums the checkpoint recorded (:func:`verify_checkpoint`)."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"nothing to resume in {run_dir}: it holds no complete checkpoint")
    for name in required_files:
        if not (found / name).is_file():
            raise CheckpointError(f"checkpoint {found} has no {name}, so training cannot resume from it")
    verify_checkpoint(found)
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder; a fine-tuning run folder (its ``best/``); or a run folder (its latest complete
    checkpoint). Raises CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if is_complete(p):
        return p
    if is_complete(p / BEST_DIR):
        return p / BEST_DIR
    if (p / COMPLETE_MARKER).is_file() is False and (p / MODEL_FILE).exists():
        raise CheckpointError(
            f"checkpoint {p} is incomplete (no {COMPLETE_MARKER} marker: it was being written when the "
            f"process stopped); use an earlier one"
        )
    for run_dir in (p, p.parent):
        if (run_dir / CHECKPOINTS_DIR).is_dir():
            found = latest_checkpoint(run_dir)
            if found is not None:
                return found
            raise CheckpointError(f"run folder {run_dir} holds no complete checkpoint")
    raise CheckpointError(f"{p} is not a gptforge checkpoint (no {MODEL_FILE} + {CONFIG_FILE} + {COMPLETE_MARKER})")


def read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / CONFIG_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {p}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{p} has no 'model' section; is this a gptforge checkpoint?")
    return data


def model_config_from(config: dict[str, Any]) -> ModelConfig:
    return config_from_dict(ModelConfig, config["model"], "model").validate()


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """Load a complete gptforge checkpoint (or a run folder's: see :func:`resolve_checkpoint`) for inference.

    This is always the language model: a fine-tuned classifier or tagger gives its base GPT (the task
    head is left out, with a warning), and an adapter folder its base model with the adapters applied.
    The files are verified against their recorded checksums and weights holding NaN or infinity are refused.
    """
    ckpt = resolve_checkpoint(path)
    loaded = _load_lm_folder(ckpt, device=device, dtype=dtype)
    log.info("loaded %s", describe_source(path, ckpt))
    return loaded


def describe_source(given: str | Path, folder: Path) -> str:
    """``folder`` (what ``given`` resolved to) with why it was chosen, for the log line of a load."""
    given_path = Path(given)
    if folder == given_path:
        return str(folder)
    if folder == given_path / BEST_DIR:
        return f"{folder} (best validation checkpoint of fine-tuning run {given_path})"
    if folder.parent.name == CHECKPOINTS_DIR:
        return f"{folder} (latest complete checkpoint of run {folder.parent.parent})"
    return f"{folder} (for {given})"


def _load_lm_folder(ckpt: Path, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """The language model of a resolved checkpoint folder (load_checkpoint without the log line)."""
    verify_checkpoint(ckpt, skip=(OPTIMIZER_FILE,))
    config = read_config(ckpt)
    task = task_of(config)["type"]
    if ADAPTER_SECTION in config:
        loaded = _compose_task_folder(ckpt, config, device=device, dtype=dtype)
        model = loaded.model if task == "lm" else loaded.model.base
    else:
        model_config = model_config_from(config)
        state, _ = split_task_state(load_state_dict(ckpt / MODEL_FILE, device="cpu"))
        model = build_model(model_config, state, device=device, dtype=dtype, source=ckpt / MODEL_FILE)
    if task != "lm":
        log.warning("checkpoint %s was fine-tuned for task %r; loading its base language model without "
                    "the task head", ckpt, task)
    tokenizer = _checkpoint_tokenizer(ckpt, model.config.vocab_size)
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, path=ckpt)


def _checkpoint_tokenizer(ckpt: Path, vocab_size: int) -> Tokenizer:
    if not has_tokenizer(ckpt):
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer files")
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"checkpoint {ckpt}: tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size}"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Fine-tuned (task) checkpoints
#
# config.json gains a "task" section: {"type": "lm" | "classify" | "tokens", "labels": [...],
# "chat_template": str | None}. A classifier's or tagger's head is stored as "head.*" tensors in
# model.safetensors beside the base model's own names, so the base loads on its own as well.
# A parameter-efficient run (lora, adapter, prefix) writes an adapter folder instead: gptforge.peft's
# adapter files, the head (if any) in model.safetensors, and an "adapter" section naming the base model
# ({"strategy": ..., "base_checkpoint": ...}); loading it loads the base and re-applies the adapters.

TASK_SECTION = "task"
ADAPTER_SECTION = "adapter"
HEAD_PREFIX = "head."
TASK_NAMES = {"lm": "language modelling", "classify": "text classification", "tokens": "token tagging"}


def split_task_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the base model's tensors, the task head's ``head.*`` tensors)."""
    base = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return base, head


def task_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a task checkpoint stores: the base GPT's tensors, plus ``head.*`` for a TaskModel."""
    model = unwrap_model(model)
    if isinstance(model, GPT):
        return model_state_for_saving(model)
    return {**model_state_for_saving(model.base), **head_state(model)}


def head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ``head.*`` tensors of a TaskModel ({} for a plain GPT), as an adapter folder stores them."""
    model = unwrap_model(model)
    if isinstance(model, GPT):
        return {}
    return {k: v.contiguous().cpu() for k, v in head_state_dict(model).items()}


def task_of(config: dict[str, Any]) -> dict[str, Any]:
    """The task section of a checkpoint's config (a plain pretrained checkpoint is an ``lm`` one)."""
    task = config.get(TASK_SECTION) or {}
    return {"type": task.get("type", "lm"), "labels": list(task.get("labels") or []),
            "chat_template": task.get("chat_template")}


def build_task_model(base: GPT, task: dict[str, Any], *, dropout: float = 0.0) -> torch.nn.Module:
    """The bare GPT for ``lm``, else a TaskModel around it with a freshly initialised head."""
    if task["type"] == "lm":
        return base
    return TaskModel(base, task["type"], len(task["labels"]), dropout=dropout)


def load_task_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                         dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """A fine-tuned checkpoint with its task: ``model`` is a TaskModel (classify, tokens) or a GPT (lm).

    ``path`` may be a full task checkpoint, an adapter folder (its base model is loaded and the adapters
    re-applied), a fine-tuning run folder (its ``best/``) or any other gptforge checkpoint or Hugging Face
    model (an ``lm`` one). ``config["task"]`` always holds the task section. Files are verified against
    their recorded checksums; weights holding NaN or infinity are refused.
    """
    kind, folder = resolve_model_source(str(path))
    if kind == "hf":
        loaded = load_hf_folder(folder, device=device, dtype=dtype)
        loaded.config[TASK_SECTION] = task_of(loaded.config)
        return loaded
    verify_checkpoint(folder, skip=(OPTIMIZER_FILE,))
    loaded = _compose_task_folder(folder, read_config(folder), device=device, dtype=dtype)
    log.info("loaded %s", describe_source(path, folder))
    return loaded


def _compose_task_folder(folder: Path, config: dict[str, Any], *, device: str | torch.device = "cpu",
                         dtype: Optional[torch.dtype] = None) -> Checkpoint:
    task = config[TASK_SECTION] = task_of(config)
    if ADAPTER_SECTION in config:
        model = attach_adapter_checkpoint(folder, config)
    else:
        base_state, head = split_task_state(load_state_dict(folder / MODEL_FILE, device="cpu"))
        model = build_model(model_config_from(config), base_state, source=folder / MODEL_FILE)
        if task["type"] != "lm":
            model = _with_head(model, task, head, folder)
    tokenizer = _checkpoint_tokenizer(folder, _gpt_of(model).config.vocab_size)
    return Checkpoint(model=model.to(device=device, dtype=dtype).eval(), tokenizer=tokenizer, config=config,
                      path=folder)


def adapter_base_record(source: Checkpoint, given: str | Path) -> dict[str, Any]:
    """What an adapter folder's ``adapter`` section records of the base model it is trained on: the base as
    an absolute path (or the hub id ``given``, for a hub model) and the base's weights fingerprint
    (:func:`weights_fingerprint`). :func:`save_checkpoint` adds the base's path relative to the adapter
    folder; loading finds the base by either path and refuses one whose weights have changed."""
    local = Path(given).expanduser().exists()
    return {"base_checkpoint": str(Path(source.path).resolve()) if local else str(given),
            "base_fingerprint": weights_fingerprint(source.path)}


def attach_adapter_checkpoint(ckpt: Path, config: dict[str, Any]) -> torch.nn.Module:
    """Load an adapter folder's base model (on the CPU), wrap it for the task, re-apply the adapters and head."""
    kind, base_folder = find_adapter_base(ckpt, config[ADAPTER_SECTION])
    try:
        if kind == "hf":
            base = load_hf_folder(base_folder, device="cpu").model
        else:
            base = _load_lm_folder(base_folder, device="cpu").model
    except CheckpointError as exc:
        raise CheckpointError(f"adapter folder {ckpt} needs its base model {base_folder}, which cannot be "
                              f"loaded: {exc}") from None
    log.debug("loaded base model %s of adapter folder %s", base_folder, ckpt)
    task = task_of(config)
    model = build_task_model(base, task)
    load_peft(model, ckpt)
    if task["type"] != "lm":
        _, head = split_task_state(load_state_dict(ckpt / MODEL_FILE, device="cpu"))
        _load_head(model, head, ckpt)
    return model


def find_adapter_base(ckpt: Path, adapter: dict[str, Any]) -> tuple[str, Path]:
    """(kind, folder) of the base model of the adapter folder ``ckpt`` (see :func:`resolve_model_source`).

    Tried in turn: ``base_relative`` (relative to ``ckpt``: both folders moved together), then
    ``base_checkpoint`` (an absolute path, or a hub id). Where a ``base_fingerprint`` is recorded, a
    candidate is taken only if its weights have that fingerprint. Older adapter folders record only
    ``base_checkpoint``, which is loaded as it is."""
    recorded, fingerprint = adapter.get("base_checkpoint"), adapter.get("base_fingerprint")
    candidates: list[tuple[str, bool]] = []  # (source, whether it is a local path)
    if isinstance(adapter.get("base_relative"), str):
        candidates.append((os.path.normpath(Path(ckpt).resolve() / adapter["base_relative"]), True))
    if isinstance(recorded, str) and recorded:
        candidates.append((recorded, Path(recorded).is_absolute()))
    if not candidates:
        raise CheckpointError(f"adapter folder {ckpt} does not record its base model (adapter.base_checkpoint)")
    missing: list[str] = []
    changed: Optional[tuple[Path, str]] = None
    for source, local in candidates:
        if local and not Path(source).exists():
            missing.append(source)
            continue
        try:
            kind, folder = resolve_model_source(source)
            found = weights_fingerprint(folder) if fingerprint else None
        except CheckpointError as exc:
            raise CheckpointError(f"adapter folder {ckpt} needs its base model {source}, which cannot be "
                                  f"loaded: {exc}") from None
        if found == fingerprint:
            return kind, folder
        changed = changed or (folder, found)
    if changed is not None:
        folder, found = changed
        raise CheckpointError(
            f"adapter folder {ckpt} was trained on other weights than its base model {folder} holds now "
            f"(fingerprint {found[:19]}..., recorded {str(fingerprint)[:19]}...); restore that base checkpoint "
            f"or fine-tune again")
    raise CheckpointError(
        f"adapter folder {ckpt} needs its base model, which is gone: {' and '.join(dict.fromkeys(missing))} "
        f"{'does' if len(set(missing)) == 1 else 'do'} not exist (checkpoint rotation may have deleted it); "
        f"restore that base checkpoint or fine-tune again")


def _gpt_of(model: torch.nn.Module) -> GPT:
    return model if isinstance(model, GPT) else model.base


def _with_head(base: GPT, task: dict[str, Any], head: dict[str, torch.Tensor], ckpt: Path) -> torch.nn.Module:
    if not task["labels"]:
        raise CheckpointError(f"checkpoint {ckpt} is a {task['type']!r} checkpoint without labels in its config")
    model = build_task_model(base, task)
    _load_head(model, head, ckpt)
    return model


def _load_head(model: torch.nn.Module, head: dict[str, torch.Tensor], ckpt: Path) -> None:
    if not head:
        raise CheckpointError(f"checkpoint {ckpt} is a task checkpoint but holds no head weights (head.*)")
    try:
        load_head(model, head)
    except CheckpointError as exc:
        raise CheckpointError(f"the head weights in {ckpt} do not fit its labels: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Any model source: a gptforge checkpoint or run folder, a Hugging Face folder or a hub id
def _looks_like_gptforge(path: Path) -> bool:
    """Signs of a gptforge checkpoint or run folder, complete or not (resolve_checkpoint judges which)."""
    if (path / COMPLETE_MARKER).exists() or (path / CHECKPOINTS_DIR).is_dir() or path.name == CHECKPOINTS_DIR \
            or (path / BEST_DIR / COMPLETE_MARKER).exists():
        return True
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def resolve_model_source(source: str) -> tuple[str, Path]:
    """("gptforge", checkpoint folder), ("hf", HF model folder) or, for a hub id, ("hf", its cached folder)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and is_hf_folder(path):
            return "hf", path
        if path.is_dir() and _looks_like_gptforge(path):
            return "gptforge", resolve_checkpoint(path)
        raise CheckpointError(
            f"{path} is neither a gptforge checkpoint or run folder nor a Hugging Face model folder "
            f"(no {COMPLETE_MARKER} marker, no {CHECKPOINTS_DIR}/ and no config.json with a model_type)"
        )
    if looks_local(source):
        raise CheckpointError(f"model {source} does not exist{_did_you_mean(path)}")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise CheckpointError(f"model {source!r} does not exist (and is not a Hugging Face hub id)") from None
    return "hf", download_from_hub(source)


def looks_local(source: str) -> bool:
    """Whether a model name that does not exist is meant as a local path, never a hub id: it starts with
    ``./``, ``../``, ``/`` or ``~``, or its first component exists here (``runs/demo-typo``)."""
    if source.startswith(("./", "../", "/", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    first = Path(source).parts[0] if Path(source).parts else ""
    return bool(first) and first != source and Path(first).exists()


def _did_you_mean(path: Path) -> str:
    """`` (did you mean X?)`` from the entries beside the first missing component of ``path``, else ``""``."""
    parts = path.parts
    for i in range(len(parts)):
        head = Path(*parts[: i + 1])
        if head.exists():
            continue
        parent = head.parent
        try:
            siblings = [p.name for p in parent.iterdir()] if parent.is_dir() else []
        except OSError:
            siblings = []
        close = difflib.get_close_matches(parts[i], siblings, n=1)
        if not close:
            return " (no such local folder)"
        return f" (no such local folder; did you mean {parent / close[0]}?)"
    return ""


def load_pretrained(source: str | Path, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """Load a gptforge checkpoint, a local Hugging Face GPT-2 folder or a hub id, ready for inference.

    The one entry point that generate, finetune and serve use.
    """
    kind, path = resolve_model_source(str(source))
    if kind == "gptforge":
        loaded = _load_lm_folder(path, device=device, dtype=dtype)
        log.info("loaded %s", describe_source(source, path))
        return loaded
    return load_hf_folder(path, device=device, dtype=dtype)



def load_for_inference(config: InferenceConfig, *, task: bool = False) -> Checkpoint:
    """``config.checkpoint`` on ``config.device`` in ``config.dtype``, made inference-only with
    :func:`~gptforge.backends.prepare_for_inference` (int8 if asked, prepacked CPU float32 linears, the KV
    cache dtype): the one loader of `generate`, `chat` and the server, so that they all round alike.
    ``task``: load with :func:`load_task_checkpoint` (a classifier too), else :func:`load_pretrained`."""
    device = resolve_device(config.device)
    load = load_task_checkpoint if task else load_pretrained
    ckpt = load(config.checkpoint, device=device, dtype=inference_dtype(config.dtype, device))
    prepare_for_inference(ckpt.model, quantize=config.quantize, prepack=config.prepack,
                          kv_cache_dtype=config.kv_cache_dtype)
    return ckpt

# --------------------------------------------------------------------------------------------------
# The library calls behind `gptforge convert`
def convert_from_hf(source: str | Path, out_dir: str | Path) -> Path:
    """A Hugging Face GPT-2 folder or hub id → a gptforge checkpoint folder at ``out_dir``."""
    kind, path = resolve_model_source(str(source))
    if kind != "hf":
        raise CheckpointError(f"{source} is already a gptforge checkpoint; there is nothing to convert")
    out = Path(out_dir)
    check_output_dir(out, replaceable=is_complete(out), what="a gptforge checkpoint")
    ckpt = load_hf_folder(path)
    return save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.config)


def convert_to_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A gptforge checkpoint (or run folder) → a Hugging Face GPT-2 folder at ``out_dir``."""
    return export_hf(load_checkpoint(checkpoint), out_dir)
