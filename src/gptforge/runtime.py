"""Where and in what precision to run: the device and dtype choices made at run time.

One place for ``auto`` so that training, inference, the benchmarks and the server agree: CUDA when
present, else CPU; bfloat16 on GPUs that have it, float32 on CPU. Also :func:`release_thread_pool`, for
code that loads a model on one thread and runs it on another.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

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


# The OpenMP runtimes of this process (torch's libgomp; LLVM's libomp or Intel's libiomp5 where a build
# uses those) whose names start with one of these.
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp5")
_pause_functions: Optional[list] = None


def _omp_pause_functions() -> list:
    """``omp_pause_resource_all`` (OpenMP 5.0) of each OpenMP runtime this process has loaded, found through
    ``/proc/self/maps`` (Linux; none elsewhere) and opened without loading anything new."""
    global _pause_functions
    if _pause_functions is None:
        found, paths = [], set()
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:  # address perms offset dev inode [path]
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(_OPENMP_RUNTIMES):
                        paths.add(fields[5].strip())
        except OSError:
            pass
        mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)
        for path in sorted(paths):
            try:
                function = ctypes.CDLL(path, mode=mode).omp_pause_resource_all
            except (OSError, AttributeError):  # not loaded after all, or older than OpenMP 5.0
                continue
            function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
            found.append(function)
        _pause_functions = found
    return _pause_functions


def release_thread_pool() -> bool:
    """End the calling thread's idle OpenMP worker threads (torch's intra-op threads on CPU); its next
    parallel op starts them again. Returns whether a runtime released them.

    Call it from the thread that loaded a model before another thread runs it, as the server's scheduler
    does. libgomp keeps a worker pool for every thread that has run parallel work, and counts all of their
    threads. Once the count exceeds the CPUs, every worker sleeps between parallel regions after ~100 spins
    instead of ~300,000, so every op of the thread that runs the model pays a wake-up: ~30% of a 16-row
    decode step on 2 cores (benchmarks/README.md, serving). False where no runtime offers
    ``omp_pause_resource_all`` (before OpenMP 5.0; outside Linux), or while a parallel region runs.
    """
    released = False
    for pause in _omp_pause_functions():
        released = pause(1) == 0 or released  # 1: omp_pause_soft
    log.debug("OpenMP worker pool of this thread released: %s", released)
    return released
