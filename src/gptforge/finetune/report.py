"""The before/after report of a fine-tuning run: headline metrics side by side, and each task's tables.

The metrics themselves come from :func:`gptforge.evaluate.tasks.evaluate_task` (see
:data:`gptforge.evaluate.tasks.HEADLINE` for each task's headline metrics).
"""

from __future__ import annotations

from typing import Any, Optional

from ..evaluate.classification import format_report
from ..evaluate.ner import format_ner_report
from ..evaluate.tasks import HEADLINE


def format_before_after(before: Optional[dict[str, Any]], after: dict[str, Any], task: str) -> str:
    """The headline metrics before and after fine-tuning, side by side."""
    rows = [("metric", "before", "after", "change")]
    for name in HEADLINE[task]:
        b = before.get(name) if before else None
        a = after.get(name)
        change = f"{a - b:+.4f}" if a is not None and b is not None else ""
        rows.append((name, _num(b), _num(a), change))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def format_task_report(task: str, report: dict[str, Any]) -> str:
    """The detailed report of one evaluation (per-class or per-entity-type tables)."""
    if task == "classify":
        return format_report(report)
    if task == "tokens":
        return format_ner_report(report)
    return "  ".join(f"{k} {_num(report.get(k))}" for k in HEADLINE["lm"]) + f"  ({report['tokens']:,} tokens)"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"
