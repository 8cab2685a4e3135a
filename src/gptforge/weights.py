"""What every model loader shares: reading a weights file, building a GPT from a state dict, the state
to save, the plain module inside training wrappers, and the :class:`Checkpoint` a loader returns.

It sits below :mod:`gptforge.convert` (Hugging Face folders), :mod:`gptforge.peft` and
:mod:`gptforge.checkpoint` (gptforge folders and the composition of model + PEFT + heads on load), so
that none of them has to import another to get at these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .model import GPT
from .tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its tokenizer and the config it was saved with."""

    model: GPT
    tokenizer: Tokenizer
    config: dict[str, Any]
    path: Path


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied weights stored once (safetensors refuses shared storage)."""
    model = unwrap_model(model)
    state = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def first_nonfinite(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor in ``state`` holding a NaN or an infinity, else None.

    A tensor's sum is finite exactly when every element is, unless finite elements overflow it; only then
    (a non-finite sum) are the elements checked one by one. The sum reads the tensor once without
    allocating a mask: for GPT-2 124M's weights about 60 ms on one CPU thread, against 1.0 s for
    ``torch.isfinite(t).all()``.
    """
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if bool(torch.isfinite(tensor.sum())):
            continue
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise CheckpointError naming ``source`` (a file) and the first tensor that holds a NaN or an infinity."""
    name = first_nonfinite(state)
    if name is not None:
        raise CheckpointError(
            f"weights {source} hold NaN or infinite values (tensor {name}): they come from a diverged run "
            f"and cannot be used; load an earlier checkpoint"
        )


def load_state_dict(path: str | Path, device: str | torch.device = "cpu", *,
                    finite: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with ``finite`` (the default) CheckpointError if one holds NaN or
    an infinity (see :func:`check_finite`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from None
    if finite:
        check_finite(state, path)
    return state


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], *, device="cpu",
                dtype: Optional[torch.dtype] = None, strict: bool = True, source=None) -> GPT:
    """Build the model on the meta device and adopt the loaded tensors (no double allocation). ``source``
    (the weights file) is named in the CheckpointError for weights that do not fit ``config``."""
    with torch.device("meta"):
        model = GPT(config)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    weights = f"weights {source}" if source is not None else "weights"
    expected = model.state_dict()
    for name, tensor in state.items():  # torch's own message puts the tensor and shapes past its first line
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{weights} do not fit the model config: tensor {name} has shape "
                                  f"{tuple(tensor.shape)}, the config gives {tuple(expected[name].shape)}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} do not fit the model config: {str(exc).splitlines()[0]}") from None
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{weights} do not match the model config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.to(device=device, dtype=dtype)
    return model.eval()
