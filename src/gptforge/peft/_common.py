"""What every PEFT strategy shares: finding the GPT, freezing its weights, and the adapter folder.

An adapter folder holds ``adapter_model.safetensors`` (only the new tensors, keyed relative to the GPT so
that a file trained on a bare GPT loads onto a ``TaskModel`` wrapping one, and back) and
``adapter_config.json`` (``kind`` plus the settings needed to rebuild the same modules). It is written to a
temporary folder and renamed into place, like a checkpoint.

The settings of the strategy applied to a GPT are kept on it as ``gpt.peft_config`` (a plain dict, as in
Hugging Face ``peft``); saving reads them from there, so a file always describes the tensors it holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..weights import check_finite, first_nonfinite, unwrap_model
from ..errors import CheckpointError, ConfigError
from ..fsutil import publish_folder
from ..model import GPT

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

# Name components that mark a parameter as belonging to a PEFT strategy (never frozen by another apply).
PEFT_PARAM_MARKERS = frozenset({"lora_a", "lora_b", "attn_adapter", "mlp_adapter", "prefix_encoder"})


def find_gpt(model: nn.Module) -> GPT:
    """The GPT inside ``model`` (itself, a TaskModel's ``base``, or one under DDP / torch.compile)."""
    model = unwrap_model(model)
    if isinstance(model, GPT):
        return model
    for module in model.modules():
        if isinstance(module, GPT):
            return module
    raise ConfigError(f"{type(model).__name__} holds no gptforge GPT to apply PEFT to")


def check_no_strategy(gpt: GPT) -> None:
    """Refuse a second strategy on one GPT: an adapter folder describes exactly one kind."""
    current = getattr(gpt, "peft_config", None)
    if current is not None:
        raise ConfigError(f"the model already has {current['kind']!r} PEFT applied; apply one strategy per model")


def start_strategy(gpt: GPT, kind: str, settings: dict[str, Any]) -> None:
    """Record the applied strategy's settings on the GPT (what save_* writes to adapter_config.json)."""
    check_no_strategy(gpt)
    gpt.peft_config = {"kind": kind, **settings}


def needs_apply(model: nn.Module, kind: str) -> bool:
    """Whether loading a ``kind`` adapter must first apply it (False: already applied to this model)."""
    current = getattr(find_gpt(model), "peft_config", None)
    if current is None:
        return True
    if current["kind"] != kind:
        raise ConfigError(f"cannot load a {kind!r} adapter into a model that already has {current['kind']!r} PEFT")
    return False


def freeze_base(model: nn.Module, trainable: Iterable[str] = ()) -> None:
    """Freeze every parameter except PEFT ones and those under the submodules named in ``trainable``
    (dotted paths from ``model``, e.g. ``"head"`` for a TaskModel's classifier)."""
    model = unwrap_model(model)
    keep = tuple(trainable)
    for name, param in model.named_parameters():
        parts = name.split(".")
        is_peft = not PEFT_PARAM_MARKERS.isdisjoint(parts)
        wanted = any(name == t or name.startswith(t + ".") for t in keep)
        param.requires_grad_(is_peft or wanted)


def peft_state_dict(model: nn.Module, is_peft: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The GPT's tensors whose names pass ``is_peft``, keyed relative to the GPT."""
    gpt = find_gpt(model)
    return {name: t.detach() for name, t in gpt.state_dict().items() if is_peft(name)}


def save_folder(model: nn.Module, path: str | Path, kind: str, state: dict[str, torch.Tensor],
                config: Optional[dict[str, Any]]) -> Path:
    """Write ``state`` and the adapter config (the model's settings, plus ``config`` as extra metadata)."""
    from safetensors.torch import save_file

    gpt = find_gpt(model)
    settings = getattr(gpt, "peft_config", None)
    if settings is None or settings["kind"] != kind:
        raise ConfigError(f"the model has no {kind} PEFT applied; nothing to save")
    record = json.loads(json.dumps(dict(config or {})))  # JSON-normalised (tuples become lists)
    for key, value in json.loads(json.dumps(settings)).items():
        if key in record and record[key] != value:
            raise ConfigError(f"adapter config gives {key}={record[key]!r} but the model was built with {value!r}")
        record[key] = value

    path = Path(path)
    tensors = {k: v.contiguous().cpu() for k, v in state.items()}
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"refusing to save adapter {path}: tensor {bad} holds NaN or infinite values "
                              f"(the run diverged)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "kind": kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s adapter (%d tensors, %d parameters) to %s", kind, len(tensors),
             sum(t.numel() for t in tensors.values()), path)
    return path


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / CONFIG_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read adapter config {p}: {exc}") from None
    if not isinstance(data, dict) or "kind" not in data:
        raise CheckpointError(f"{p} has no 'kind'; is this a gptforge adapter folder?")
    return data


def read_folder(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter config and tensors of the folder at ``path``, which must hold a ``kind`` adapter."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(path)
    if config["kind"] != kind:
        raise CheckpointError(f"{path} holds a {config['kind']!r} adapter, not {kind!r}")
    try:
        state = load_file(str(Path(path) / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read adapter weights in {path}: {exc}") from None
    check_finite(state, Path(path) / WEIGHTS_FILE)
    return config, state


@torch.no_grad()
def copy_into(model: nn.Module, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
              source: str | Path) -> None:
    """Copy ``state`` into the model's tensors ``expected`` (same keys, same shapes), or raise CheckpointError."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"adapter {source} does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for name, target in expected.items():
        if target.shape != state[name].shape:
            raise CheckpointError(f"adapter {source}: {name} has shape {tuple(state[name].shape)}, "
                                  f"the model expects {tuple(target.shape)}")
    for name, target in expected.items():
        target.copy_(state[name])  # in place: keeps the parameters (and any optimizer's references)
