"""The monitor loop: read → classify in batches → windows and alerts → append → record state.

:class:`Monitor` is what ``gptforge monitor`` runs. It classifies with the one classification path of
:func:`gptforge.evaluate.predict.classify_texts`, keeps the windows of :mod:`.windows`, writes the folder
as :mod:`.state` describes, and hands every alert to ``on_alert`` (the CLI prints it on stderr) and to
the URL poster. It never prints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from ..config import MonitorConfig
from ..errors import ConfigError, DataError
from .live import read_jsonl_tail, series_of
from .plot import draw_trend
from .post import AlertPoster
from .reader import STDIN, BadLine, Inputs, Item, iso_time, parse_line, parse_time
from .state import (ALERTS_FILE, RESULTS_FILE, STATE_FILE, STATE_VERSION, TREND_FILE, Appender, cut_torn_line,
                    lines_after, read_state, write_state)
from .windows import Alert, WindowTracker

log = logging.getLogger(__name__)

RESULT_FIELDS = ("key", "time", "time_from", "label", "probabilities", "window", "source", "line", "offset")
"""Fields the monitor writes on each result line; an input field of the same name (but key and time, which
are read) is kept as ``input_<name>``."""
SERIES_POINTS = 5000
"""Points per key kept in memory for the trend picture."""
# Settings a resumed run must share with the run that wrote the folder (else the windows would mix them).
FIXED_SETTINGS = ("fingerprint", "labels", "input", "window_items", "window_minutes")


@dataclass
class MonitorSummary:
    out: Path
    items: int = 0
    """Items classified by this run."""
    replayed: int = 0
    """Results found past the recorded state (a stop between the results append and the state write), counted
    without classifying them again."""
    skipped: int = 0
    alerts: int = 0
    total_items: int = 0
    sources: int = 0
    resumed: bool = False
    posts_failed: int = 0
    alert_list: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"monitored {_count(self.items, 'item')}" + (f" ({self.total_items:,} in all)" if self.resumed else "")]
        if self.replayed:
            parts.append(f"{self.replayed} results of an interrupted batch kept")
        if self.skipped:
            parts.append(f"{_count(self.skipped, 'bad line')} skipped")
        parts.append(_count(self.alerts, "alert") + (f" ({self.posts_failed} not delivered to the URL)"
                                                 if self.posts_failed else ""))
        return (", ".join(parts) + f"; results {self.out / RESULTS_FILE}, alerts {self.out / ALERTS_FILE}, "
                f"trend {self.out / TREND_FILE}")


def load_classifier(checkpoint: str, device: str = "auto"):
    """The classifier at ``checkpoint``, ready for inference; a one-line error for anything else."""
    from ..backends import prepare_for_inference
    from ..evaluate.predict import load_for_task

    ckpt = load_for_task(checkpoint, "classify", device)
    prepare_for_inference(ckpt.model)
    return ckpt


class Monitor:
    """One monitor run over ``config`` (validated here). ``checkpoint``: an already loaded classifier
    (:func:`load_classifier`); ``on_alert``: called with each :class:`~.windows.Alert` as it is raised;
    ``stdin``: the byte stream read for ``--input -`` (default: the process's stdin)."""

    def __init__(self, config: MonitorConfig, checkpoint=None, *, on_alert: Optional[Callable[[Alert], None]] = None,
                 stdin: Optional[BinaryIO] = None):
        self.config = config.validate()
        self.out = Path(config.out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; the monitor writes a folder")
        rules = config.alert_rules()
        if checkpoint is None:
            checkpoint = load_classifier(config.checkpoint, config.device)
        task = checkpoint.config.get("task") or {}
        if task.get("type") != "classify":
            raise ConfigError(f"checkpoint {checkpoint.path} is not a text classifier (task {task.get('type', 'lm')!r}); "
                              "fine-tune one first (gptforge finetune --task classify)")
        self.ckpt = checkpoint
        self.labels = list(task["labels"])
        unknown = [label for label, _ in rules if label not in self.labels]
        if unknown:
            raise ConfigError(f"--alert names label {unknown[0]!r}, which the classifier does not have "
                              f"(its labels: {', '.join(self.labels)})")
        self.rules = rules
        self.on_alert = on_alert
        self.stdin = stdin
        self.tracker = WindowTracker(self.labels, rules, window_items=config.window_items,
                                     window_seconds=config.window_minutes * 60 if config.window_minutes else None,
                                     min_items=config.min_items, hysteresis=config.hysteresis)
        self.settings = self._settings()
        self.positions: dict[str, list[int]] = {}  # source -> [offset, line] just past the last handled line
        self.totals = {"items": 0, "alerts": 0, "skipped": 0}
        self.summary = MonitorSummary(out=self.out)
        self.series: dict[str, list[dict[str, Any]]] = {}
        self.alert_records: list[dict[str, Any]] = []
        self.poster = None
        self._plotted_at = 0

    def _settings(self) -> dict[str, Any]:
        from ..checkpoint import weights_fingerprint

        c = self.config
        return {"checkpoint": str(self.ckpt.path), "fingerprint": weights_fingerprint(self.ckpt.path),
                "labels": self.labels, "input": c.input if c.input == STDIN else str(Path(c.input).resolve()),
                "window_items": c.window_items, "window_minutes": c.window_minutes,
                "alerts": [[label, share] for label, share in self.rules], "min_items": c.min_items,
                "hysteresis": c.hysteresis}

    # ---------------------------------------------------------------------------------------------
    def run(self, should_stop: Optional[Callable[[], bool]] = None) -> MonitorSummary:
        """Read until the input ends (or, with ``follow``, until ``should_stop()`` says so); the summary."""
        should_stop = should_stop or (lambda: False)
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        self._open()
        if c.alert_url:
            self.poster = AlertPoster(c.alert_url, retries=c.alert_retries)
        try:
            self._recover()
            inputs = Inputs(c.input, {s: (p[0], p[1]) for s, p in self.positions.items()}
                            if c.input != STDIN else {}, stdin=self.stdin)
            self.summary.sources = len(inputs.sources)
            while not should_stop():
                lines = inputs.poll(c.batch_size)
                if lines:
                    self._process(lines)
                    continue
                if not c.follow and inputs.at_end:
                    self._process(inputs.final_lines())
                    break
                if c.follow and inputs.kind == "stdin" and inputs.at_end:
                    break  # a closed stdin cannot grow
                self._sleep(should_stop)
            self.summary.sources = len(inputs.sources)
        finally:
            self._close()
        return self.summary

    def _sleep(self, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.config.poll_interval
        while not should_stop():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def _open(self) -> None:
        state = read_state(self.out)
        if state is None:
            if any(self.out.iterdir()):
                raise ConfigError(f"output folder {self.out} holds other files and no {STATE_FILE}; choose a new or "
                                  f"empty folder")
        for name in (RESULTS_FILE, ALERTS_FILE):
            cut_torn_line(self.out / name)
        self.results = Appender(self.out / RESULTS_FILE)
        self.alerts_file = Appender(self.out / ALERTS_FILE)
        self.state = state

    def _recover(self) -> None:
        state = self.state
        if state is None:
            self._write_state()
            return
        self.summary.resumed = True
        had = state.get("settings", {})
        changed = [name for name in FIXED_SETTINGS if had.get(name) != self.settings[name]]
        if changed:
            name = changed[0]
            what = {"fingerprint": "checkpoint weights", "labels": "classifier labels", "input": "input"}.get(name, name)
            raise ConfigError(f"{self.out} was monitored with other {what} ({_show(had.get(name))}, now "
                              f"{_show(self.settings[name])}); resume with the same checkpoint, input and window, "
                              f"or write to a new --out folder")
        for name in ("alerts", "min_items", "hysteresis"):
            if had.get(name) != self.settings[name]:
                log.info("%s changed from %s to %s; the new setting applies from the next item (a new alert rule "
                         "starts armed)", name, _show(had.get(name)), _show(self.settings[name]))
        self.positions = {s: list(p) for s, p in state.get("inputs", {}).items()}
        self.tracker.load_state(state.get("windows", {}))
        self.totals = dict(state.get("totals", self.totals))
        results = read_jsonl_tail(self.out / RESULTS_FILE)
        self.series = series_of(results, SERIES_POINTS)
        self.alert_records = [a for a in read_jsonl_tail(self.out / ALERTS_FILE) if a.get("type") == "alert"]
        for a in self.alert_records:
            a["t"] = parse_time(a["time"])
        # Results appended after the last state write: their items are done; count them and replay them
        # through the windows (alerts already written are not written again).
        replay = lines_after(self.out / RESULTS_FILE, state["results_size"])
        written = {a.get("id") for a in lines_after(self.out / ALERTS_FILE, state["alerts_size"])}
        self.totals["alerts"] += len(written)
        if replay:
            log.info("%d results were written after the last state record (stopped mid-batch); keeping them", len(replay))
            alerts = []
            for rec in replay:
                n, shares, fired = self.tracker.add(str(rec["key"]), parse_time(rec["time"]), rec["label"])
                self._advance(rec["source"], rec["offset"], rec["line"])
                alerts += [self._alert(rec["key"], rec["time"], rec["source"], rec["offset"], rec["text"], n, f)
                           for f in fired]
            self.totals["items"] += len(replay)
            self.summary.replayed = len(replay)
            self._emit([a for a in alerts if a.id not in written])
        self._write_state()
        self._plotted_at = self.totals["items"]

    # ---------------------------------------------------------------------------------------------
    def _process(self, lines: list[tuple[str, int, int, bytes]]) -> None:
        if not lines:
            return
        order: list[Any] = []  # items and skipped bad lines, in reading order
        for source, line, offset, raw in lines:
            parsed = parse_line(raw, source, line, offset)
            if isinstance(parsed, BadLine):
                if not self.config.skip_bad:
                    self._commit(order)  # what came before the bad line is kept
                    raise DataError(f"{self._where(parsed)}: {parsed.message}; fix or delete the line and run the same "
                                    f"command again to go on from it (or pass --skip-bad)")
                log.warning("skipping %s: %s", self._where(parsed), parsed.message)
            order.append(parsed)
        self._commit(order)

    def _where(self, bad: BadLine) -> str:
        if bad.source == STDIN:
            return f"stdin line {bad.line}"
        folder = Path(self.config.input)
        return f"{folder / bad.source if folder.is_dir() else folder}:{bad.line}"

    def _commit(self, order: list[Any]) -> None:
        if not order:
            return
        from ..evaluate.predict import classify_texts

        items = [x for x in order if isinstance(x, Item)]
        predictions = classify_texts(self.ckpt.model, self.ckpt.tokenizer, [i.text for i in items], self.labels,
                                     batch_size=self.config.batch_size) if items else []
        records, alerts = [], []
        by_item = dict(zip(map(id, items), predictions))
        for x in order:
            if isinstance(x, BadLine):
                self._advance(x.source, x.offset, x.line)
                self.totals["skipped"] += 1
                self.summary.skipped += 1
                continue
            prediction = by_item[id(x)]
            n, shares, fired = self.tracker.add(x.key, x.time, prediction["label"])
            record = result_record(x, prediction, n, shares)
            records.append(record)
            self._advance(x.source, x.offset, x.line)
            self._add_point(record)
            alerts += [self._alert(x.key, record["time"], x.source, x.offset, x.text, n, f) for f in fired]
        self.results.write(records)
        self.totals["items"] += len(records)
        self.summary.items += len(records)
        self._emit(alerts)
        self._write_state()
        every = self.config.plot_every
        if every and self.totals["items"] // every > self._plotted_at // every:
            self._draw()

    def _advance(self, source: str, offset: int, line: int) -> None:
        self.positions[source] = [offset, line]

    def _alert(self, key, when: str, source: str, offset: int, text: str, n: int, fired) -> Alert:
        label, share, threshold = fired
        return Alert(key=str(key), label=label, share=share, threshold=threshold, items=n, time=when, source=source,
                     offset=offset, text=text)

    def _emit(self, alerts: list[Alert]) -> None:
        """Append the alerts (fsynced), then tell the caller and queue the POSTs: before the state write, so that
        a restart finds each alert either written (and told) or not at all."""
        if not alerts:
            return
        records = [a.to_dict() for a in alerts]
        self.alerts_file.write(records)
        self.totals["alerts"] += len(alerts)
        self.summary.alerts += len(alerts)
        for alert, record in zip(alerts, records):
            log.debug(alert.describe())
            self.alert_records.append({**record, "t": parse_time(record["time"])})
            del self.alert_records[:-SERIES_POINTS]  # the picture's marks; alerts.jsonl keeps them all
            self.summary.alert_list.append(record)
            if self.on_alert is not None:
                self.on_alert(alert)
            if self.poster is not None:
                self.poster.post(record)

    def _add_point(self, record: dict[str, Any]) -> None:
        points = self.series.setdefault(record["key"], [])
        points.append({"t": parse_time(record["time"]), "time": record["time"], "shares": record["window"]["shares"],
                       "items": record["window"]["items"], "label": record["label"]})
        if len(points) > 2 * SERIES_POINTS:
            del points[:-SERIES_POINTS]

    def _write_state(self) -> None:
        write_state(self.out, {
            "version": STATE_VERSION,
            "updated": iso_time(time.time()),
            "settings": self.settings,
            "inputs": self.positions,
            "results_size": self.results.size,
            "alerts_size": self.alerts_file.size,
            "totals": self.totals,
            "items": self.totals["items"],
            "windows": self.tracker.to_state(),
        })

    def _draw(self) -> None:
        draw_trend(self.series, self.alert_records, self.labels, self.out / TREND_FILE)
        self._plotted_at = self.totals["items"]

    def _close(self) -> None:
        try:
            if self.summary.items or self.summary.replayed or not (self.out / TREND_FILE).exists():
                if hasattr(self, "results"):
                    self._draw()
        finally:
            for name in ("results", "alerts_file"):
                if hasattr(self, name):
                    getattr(self, name).close()
            if self.poster is not None:
                self.poster.close()
                self.summary.posts_failed = self.poster.failed
            self.summary.total_items = self.totals["items"]


def result_record(item: Item, prediction: dict[str, Any], n: int, shares: dict[str, float]) -> dict[str, Any]:
    """One line of results.jsonl: the input's fields, then what the monitor adds (see :data:`RESULT_FIELDS`)."""
    record = {}
    for name, value in item.record.items():
        if name in ("key", "time"):
            continue
        record[f"input_{name}" if name in RESULT_FIELDS else name] = value
    record.update(key=item.key, time=iso_time(item.time), time_from=item.time_from, label=prediction["label"],
                  probabilities=prediction["probabilities"], window={"items": n, "shares": shares},
                  source=item.source, line=item.line, offset=item.offset)
    return record


def run_monitor(config: MonitorConfig, *, checkpoint=None, on_alert: Optional[Callable[[Alert], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None, stdin: Optional[BinaryIO] = None) -> MonitorSummary:
    """Build a :class:`Monitor` for ``config`` and run it (the library call behind ``gptforge monitor``)."""
    return Monitor(config, checkpoint, on_alert=on_alert, stdin=stdin).run(should_stop)


def _show(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19] + "..."
    return str(value)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
