"""Training metrics: JSON lines (the source of truth), TensorBoard events and a PNG loss curve.

``metrics.jsonl`` is strict JSON: a non-finite value (a NaN loss, an infinite perplexity) is written as
``null``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..fsutil import json_safe

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records after ``last_step`` so that a resumed run continues one clean curve."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [r for r in read_metrics(p) if r.get("step", 0) <= last_step]
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(to_json_line(r) for r in kept), encoding="utf-8")
    os.replace(tmp, p)


def to_json_line(record: dict[str, Any]) -> str:
    """One record as a line of strict JSON (non-finite floats become null)."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


class MetricsWriter:
    """Appends records to ``out_dir/metrics.jsonl`` and, optionally, TensorBoard scalars.

    ``purge_step`` (on resume) makes TensorBoard hide events at or after that step left by the run
    that was interrupted.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool, purge_step: Optional[int] = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        # Line-buffered so every record is on disk even if the process is killed.
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(to_json_line(record))
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(_tb_tag(key), value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tb_tag(key: str) -> str:
    prefix, _, rest = key.partition("_")
    return f"{prefix}/{rest}" if prefix in ("train", "val") and rest else f"train/{key}"


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Optional[Path]:
    """Train and validation loss against step as a PNG; None when there is nothing to plot."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return None
    # A bare Figure renders with Agg without touching pyplot's global backend or figure registry.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    return png_path
