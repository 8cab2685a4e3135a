"""The trend picture: per key, the share of each label over its rolling window through time, alerts marked."""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

MAX_KEYS = 12
"""Keys drawn at most (those with the most items); the rest are named in the title."""


def draw_trend(series: dict[str, list[dict[str, Any]]], alerts: Sequence[dict[str, Any]], labels: Sequence[str],
               path: str | Path) -> Path:
    """Draw ``series`` (:func:`~gptforge.monitor.live.series_of`) and ``alerts`` to a PNG at ``path``, replaced
    atomically (written beside it, then renamed), so a reader never sees half a picture.

    matplotlib's object API with the Agg canvas: no display needed and pyplot's global state left alone.
    """
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    path = Path(path)
    keys = sorted(series, key=lambda k: (-len(series[k]), k))
    shown, hidden = keys[:MAX_KEYS], keys[MAX_KEYS:]
    cols = 1 if len(shown) <= 3 else 2
    rows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(7 * cols, 2.6 * rows + 0.6), layout="constrained")
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    if not shown:
        axes[0][0].set_visible(True)
        axes[0][0].text(0.5, 0.5, "no items yet", ha="center", va="center")
    for ax, key in zip(axes.flat, sorted(shown)):
        points = series[key]
        times = [datetime.fromtimestamp(p["t"], timezone.utc) for p in points]
        for label in labels:
            ax.plot(times, [p["shares"].get(label, 0.0) for p in points], color=colors[label], label=label,
                    linewidth=1.4, marker="." if len(points) < 40 else None)
        for a in alerts:
            if str(a.get("key")) != key or a.get("t") is None:
                continue
            when = datetime.fromtimestamp(a["t"], timezone.utc)
            color = colors.get(a.get("label"), "red")
            ax.axvline(when, color=color, linestyle="--", linewidth=1)
            ax.plot([when], [a.get("share", 1.0)], marker="v", color=color, markersize=9)
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"{key} ({len(points)} items)", fontsize=10)
        ax.set_ylabel("share of window")
        ax.grid(alpha=0.3)
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.tick_params(axis="x", labelsize=8)
    if shown:
        axes.flat[0].legend(loc="upper left", fontsize=8)
    title = "label share per key (dashed: alerts)"
    if hidden:
        title += f"; {len(hidden)} more keys not drawn"
    fig.suptitle(title, fontsize=11)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
