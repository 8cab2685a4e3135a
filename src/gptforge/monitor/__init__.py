"""The sentiment monitor: classify a stream of JSON lines, keep rolling windows per key, alert when a label's
share crosses a threshold, draw the trend, and resume exactly after a stop (see docs/monitor.md).

    from gptforge.config import MonitorConfig
    from gptforge.monitor import run_monitor
    summary = run_monitor(MonitorConfig(checkpoint="runs/sentiment", input="news.jsonl", out="runs/monitor",
                                        alerts=["negative:0.6"]))
"""

from .live import monitor_labels, read_monitor
from .reader import NO_KEY, parse_time
from .run import Monitor, MonitorSummary, load_classifier, result_record, run_monitor
from .windows import Alert, WindowTracker

__all__ = ["Monitor", "MonitorSummary", "run_monitor", "load_classifier", "result_record", "read_monitor",
           "monitor_labels",
           "Alert", "WindowTracker", "NO_KEY", "parse_time"]
