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
        for name, (kind, help_text, value) in (self._gauges() if self._gauges else {}).items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
