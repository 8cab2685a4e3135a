"""Random-number states as JSON: what a checkpoint stores so that a resumed run continues bit for bit.

Python's, NumPy's, torch's CPU and (when training there) CUDA generator states; binary states are
base64-encoded so they fit in ``trainer_state.json``. Used by pretraining and fine-tuning alike.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def encode_tensor(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def decode_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states, JSON-ready (binary states base64-encoded)."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "state": base64.b64encode(np.asarray(internal, dtype=np.uint32).tobytes()).decode(),
                   "gauss_next": gauss_next},
        "numpy": {"keys": base64.b64encode(keys.astype(np.uint32).tobytes()).decode(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": encode_tensor(torch.get_rng_state()),
        "cuda": encode_tensor(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    internal = np.frombuffer(base64.b64decode(py["state"]), dtype=np.uint32)
    random.setstate((py["version"], tuple(int(v) for v in internal), py["gauss_next"]))
    npy = state["numpy"]
    keys = np.frombuffer(base64.b64decode(npy["keys"]), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(decode_tensor(state["torch"]))
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state(decode_tensor(state["cuda"]), device)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA's with torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
