"""Checkpoints: folders written atomically, loaded only when complete.

A checkpoint folder holds ``model.safetensors``, ``config.json`` (the full resolved config), the tokenizer
files, and, for training state, ``optimizer.pt`` and ``trainer_state.json``. It is written to a hidden
temporary folder, every file fsynced, a ``COMPLETE`` marker written last, then renamed into place. A run
folder keeps its checkpoints in ``checkpoints/step-NNNNNNN`` and a ``checkpoints/latest`` pointer that is
replaced (atomically) only after the folder it names is complete. A folder without the marker is never
loaded; if ``latest`` names one, the newest complete folder is used instead.

This module is also the one place that composes a model on load: :func:`load_pretrained` takes a gptforge
folder, a Hugging Face folder or hub id (through :mod:`gptforge.convert`), and :func:`load_task_checkpoint`
puts a task head (:mod:`gptforge.heads`) and re-applied adapters (:mod:`gptforge.peft`) on its base model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .backends import prepare_for_inference
from .config import InferenceConfig, ModelConfig, config_from_dict
from .convert import download_from_hub, export_hf, is_hf_folder, load_hf_folder
from .errors import CheckpointError
from .fsutil import check_output_dir, fsync_dir, fsync_file, publish_folder
from .runtime import inference_dtype, resolve_device
from .heads import TaskModel, head_state_dict, load_head
from .model import GPT
from .peft import load_peft
from .tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from .weights import Checkpoint, build_model, load_state_dict, model_state_for_saving, unwrap_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
COMPLETE_MARKER = "COMPLETE"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"


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
    store a head beside the base model's tensors); ``extra`` writes more files into the folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = model_state_for_saving(model) if state is None else state
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        config = dict(config)
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
        (tmp / COMPLETE_MARKER).write_text("ok\n")  # last: its presence vouches for every other file
        publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", path)
    return path


def update_latest(run_dir: str | Path, checkpoint_name: str) -> None:
    """Point ``run_dir/checkpoints/latest`` at a complete checkpoint folder (written last)."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    if not is_complete(ckpt_root / checkpoint_name):
        raise CheckpointError(f"refusing to point 'latest' at incomplete checkpoint {ckpt_root / checkpoint_name}")
    tmp = ckpt_root / f".{LATEST_POINTER}.tmp-{os.getpid()}"
    tmp.write_text(checkpoint_name + "\n")
    fsync_file(tmp)
    os.replace(tmp, ckpt_root / LATEST_POINTER)
    fsync_dir(ckpt_root)


def prune_checkpoints(run_dir: str | Path, keep: int, protect: tuple[str, ...] = ()) -> None:
    """Delete all but the newest ``keep`` step folders (never one named in ``protect``) and stale temp folders."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in steps[:-keep] if keep > 0 else []:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Finding and reading
def is_complete(path: str | Path) -> bool:
    p = Path(path)
    return (p / COMPLETE_MARKER).is_file() and (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file()


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint ``latest`` names; else the newest complete step folder; else None."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_POINTER
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if is_complete(target):
            return target
        log.warning("checkpoint %s named by 'latest' is incomplete; looking for an older one", target)
    for p in sorted(root.glob("step-*"), reverse=True):
        if is_complete(p):
            return p
    return None


def find_resume_checkpoint(run_dir: str | Path, required_files: tuple[str, ...] = ()) -> Path:
    """The checkpoint a resumed run in ``run_dir`` continues from: its latest complete one, which must also
    hold each of ``required_files`` (the trainer state, the optimizer, ...); CheckpointError if there is none."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"nothing to resume in {run_dir}: it holds no complete checkpoint")
    for name in required_files:
        if not (found / name).is_file():
            raise CheckpointError(f"checkpoint {found} has no {name}, so training cannot resume from it")
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint). Raises CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if is_complete(p):
        return p
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
    """Load a complete gptforge checkpoint (or a run folder's latest) for inference.

    This is always the language model: a fine-tuned classifier or tagger gives its base GPT (the task
    head is left out, with a warning), and an adapter folder its base model with the adapters applied.
    """
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    task = task_of(config)["type"]
    if ADAPTER_SECTION in config:
        loaded = load_task_checkpoint(ckpt, device=device, dtype=dtype)
        model = loaded.model if task == "lm" else loaded.model.base
    else:
        model_config = model_config_from(config)
        state, _ = split_task_state(load_state_dict(ckpt / MODEL_FILE, device="cpu"))
        model = build_model(model_config, state, device=device, dtype=dtype)
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
    re-applied) or any other gptforge checkpoint or Hugging Face model (an ``lm`` one). ``config["task"]``
    always holds the task section.
    """
    kind, folder = resolve_model_source(str(path))
    if kind == "hf":
        loaded = load_hf_folder(folder, device=device, dtype=dtype)
        loaded.config[TASK_SECTION] = task_of(loaded.config)
        return loaded
    config = read_config(folder)
    task = config[TASK_SECTION] = task_of(config)
    if ADAPTER_SECTION in config:
        model = attach_adapter_checkpoint(folder, config)
    else:
        base_state, head = split_task_state(load_state_dict(folder / MODEL_FILE, device="cpu"))
        model = build_model(model_config_from(config), base_state)
        if task["type"] != "lm":
            model = _with_head(model, task, head, folder)
    tokenizer = _checkpoint_tokenizer(folder, _gpt_of(model).config.vocab_size)
    return Checkpoint(model=model.to(device=device, dtype=dtype).eval(), tokenizer=tokenizer, config=config,
                      path=folder)


def attach_adapter_checkpoint(ckpt: Path, config: dict[str, Any]) -> torch.nn.Module:
    """Load an adapter folder's base model (on the CPU), wrap it for the task, re-apply the adapters and head."""
    adapter = config[ADAPTER_SECTION]
    base_source = adapter.get("base_checkpoint")
    try:
        base = load_pretrained(str(base_source), device="cpu").model
    except CheckpointError as exc:
        raise CheckpointError(f"adapter folder {ckpt} needs its base model {base_source}, which cannot be "
                              f"loaded: {exc}") from None
    task = task_of(config)
    model = build_task_model(base, task)
    load_peft(model, ckpt)
    if task["type"] != "lm":
        _, head = split_task_state(load_state_dict(ckpt / MODEL_FILE, device="cpu"))
        _load_head(model, head, ckpt)
    return model


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
    if (path / COMPLETE_MARKER).exists() or (path / CHECKPOINTS_DIR).is_dir() or path.name == CHECKPOINTS_DIR:
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
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise CheckpointError(f"model {source!r} does not exist (and is not a Hugging Face hub id)") from None
    return "hf", download_from_hub(source)


def load_pretrained(source: str | Path, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """Load a gptforge checkpoint, a local Hugging Face GPT-2 folder or a hub id, ready for inference.

    The one entry point that generate, finetune and serve use.
    """
    kind, path = resolve_model_source(str(source))
    if kind == "gptforge":
        return load_checkpoint(path, device=device, dtype=dtype)
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
