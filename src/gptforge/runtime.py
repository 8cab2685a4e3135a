"""Where and in what precision to run: the device and dtype choices made at run time.

One place for ``auto`` so that training, inference, the benchmarks and the server agree: CUDA when
present, else CPU; bfloat16 on GPUs that have it, float32 on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this process's CUDA device when there is one, else CPU; ``cuda`` → ``cuda:local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but CUDA is not available on this machine")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """Training precision → (autocast dtype, or None for plain float32; whether a GradScaler is needed)."""
    if name == "auto":
        if device.type != "cuda":
            return None, False
        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    if name == "float32":
        return None, False
    dtype = DTYPES[name]
    # float16's narrow exponent underflows small gradients without loss scaling; bfloat16's does not.
    return dtype, dtype == torch.float16


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """Weights' dtype for inference: ``auto`` is bfloat16 on GPUs that support it, else float32."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return DTYPES[name]
