"""Server metrics in the Prometheus text format (no client library needed): counters, gauges, a histogram."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Optional

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe request counters and latency histogram; scheduler gauges are read when rendered."""

    def __init__(self, gauges: Optional[Callable[[], dict[str, tuple[str, str, float]]]] = None):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._latency_buckets: dict[str, list[int]] = {}
        self._latency_sum: dict[str, float] = defaultdict(float)
        self._latency_count: dict[str, int] = defaultdict(int)
        self._gauges = gauges
        self._moderation_blocks: Optional[dict[tuple[str, str], int]] = None  # (side, label) → count
        self._moderation_checks: dict[str, int] = defaultdict(int)

    def declare_moderation(self, labels) -> None:
        """Moderation is on: its block counters (at 0 for each blocked label and side) appear in /metrics."""
        with self._lock:
            self._moderation_blocks = {(side, label): 0 for side in ("input", "output") for label in labels}
            self._moderation_checks.update({"input": 0, "output": 0})

    def count_moderation_block(self, side: str, label: str) -> None:
        with self._lock:
            blocks = self._moderation_blocks if self._moderation_blocks is not None else {}
            blocks[(side, label)] = blocks.get((side, label), 0) + 1
            self._moderation_blocks = blocks

    def count_moderation_checks(self, side: str, texts: int) -> None:
        with self._lock:
            self._moderation_checks[side] += texts

    def moderation_blocks(self, side: str, label: str) -> int:
        with self._lock:
            return (self._moderation_blocks or {}).get((side, label), 0)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, str(status))] += 1
            buckets = self._latency_buckets.setdefault(route, [0] * len(LATENCY_BUCKETS))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self._latency_sum[route] += seconds
            self._latency_count[route] += 1

    def requests(self, route: str, status: int) -> int:
        with self._lock:
            return self._requests.get((route, str(status)), 0)

    def render(self) -> str:
        lines = ["# HELP gptforge_requests_total HTTP requests answered, by route and status code.",
                 "# TYPE gptforge_requests_total counter"]
        with self._lock:
            for (route, status), count in sorted(self._requests.items()):
                lines.append(f"gptforge_requests_total{_labels(route=route, status=status)} {count}")
            lines += ["# HELP gptforge_request_latency_seconds Time from a request's arrival to its last byte.",
                      "# TYPE gptforge_request_latency_seconds histogram"]
            for route, buckets in sorted(self._latency_buckets.items()):
                for bound, count in zip(LATENCY_BUCKETS, buckets):
                    lines.append(f"gptforge_request_latency_seconds_bucket{_labels(route=route, le=repr(bound))} {count}")
                total = self._latency_count[route]
                lines.append(f"gptforge_request_latency_seconds_bucket{_labels(route=route, le='+Inf')} {total}")
                lines.append(f"gptforge_request_latency_seconds_sum{_labels(route=route)} {self._latency_sum[route]:.6f}")
                lines.append(f"gptforge_request_latency_seconds_count{_labels(route=route)} {total}")
            if self._moderation_blocks is not None:
                lines += ["# HELP gptforge_moderation_blocks_total Texts the moderation classifier blocked, by side "
                          "(input: prompts and user messages; output: generated text) and label.",
                          "# TYPE gptforge_moderation_blocks_total counter"]
                for (side, label), count in sorted(self._moderation_blocks.items()):
                    lines.append(f"gptforge_moderation_blocks_total{_labels(label=label, side=side)} {count}")
                lines += ["# HELP gptforge_moderation_checks_total Texts the moderation classifier read, by side.",
                          "# TYPE gptforge_moderation_checks_total counter"]
                for side, count in sorted(self._moderation_checks.items()):
                    lines.append(f"gptforge_moderation_checks_total{_labels(side=side)} {count}")
        for name, (kind, help_text, value) in (self._gauges() if self._gauges else {}).items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
