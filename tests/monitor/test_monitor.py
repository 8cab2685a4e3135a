"""The monitor end to end on a tiny classifier: result lines, alerts and their POSTs, exact resume after
stops and crashes, unfinished lines, following growing files, folders, stdin and bad lines."""

from __future__ import annotations

import http.server
import io
import json
import logging
import socket
import threading
import time

import pytest

from gptforge.config import MonitorConfig
from gptforge.errors import ConfigError, DataError
from gptforge.monitor import Monitor, load_classifier, run_monitor
from tests.monitor.monitor_utils import LABELS, news, read_jsonl, write_jsonl

TIMEOUT = 60


def config(clf, source, out, **kw) -> MonitorConfig:
    kw.setdefault("plot_every", 0)
    return MonitorConfig(checkpoint=str(clf), input=str(source), out=str(out), device="cpu", **kw)


@pytest.fixture(scope="module")
def loaded(classifier):
    return load_classifier(str(classifier), "cpu")


@pytest.fixture
def spy(monkeypatch):
    """Every text the monitor sends to the classifier."""
    from gptforge.evaluate import predict

    seen: list[str] = []
    real = predict.classify_texts

    def classify_texts(model, tokenizer, texts, labels, **kw):
        seen.extend(texts)
        return real(model, tokenizer, texts, labels, **kw)

    monkeypatch.setattr(predict, "classify_texts", classify_texts)
    return seen


def strip(results):
    """What must not depend on how a run was cut: everything but the probabilities' last bits."""
    return [{k: v for k, v in r.items() if k != "probabilities"} for r in results]


def wait_for(predicate, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------
def test_each_item_gets_one_result_line_with_its_fields_label_window_and_offset(classifier, loaded, tmp_path):
    from gptforge.evaluate.predict import classify_texts

    rows = news(12)
    source = write_jsonl(tmp_path / "news.jsonl", rows)
    summary = run_monitor(config(classifier, source, tmp_path / "out", window_items=4), checkpoint=loaded)
    results = read_jsonl(tmp_path / "out/results.jsonl")
    assert summary.items == len(results) == 12 and summary.total_items == 12
    reference = classify_texts(loaded.model, loaded.tokenizer, [r["text"] for r in rows], LABELS)
    ends = [len(line) for line in source.read_bytes().splitlines(keepends=True)]
    for i, (row, result, ref) in enumerate(zip(rows, results, reference)):
        assert result["text"] == row["text"] and result["n"] == row["n"] and result["key"] == row["key"]
        assert result["time"].endswith("Z") and result["time_from"] == "item"
        assert result["label"] == ref["label"]
        assert result["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-5)
        assert (result["source"], result["line"], result["offset"]) == ("news.jsonl", i + 1, sum(ends[:i + 1]))
        same_key = [r["label"] for r in results[:i + 1] if r["key"] == row["key"]][-4:]
        assert result["window"]["items"] == len(same_key)
        assert result["window"]["shares"] == pytest.approx({l: same_key.count(l) / len(same_key) for l in LABELS})
    state = json.loads((tmp_path / "out/state.json").read_text())
    assert state["inputs"]["news.jsonl"] == [source.stat().st_size, 12]
    png = (tmp_path / "out/trend.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_a_rerun_classifies_only_what_was_added(classifier, loaded, tmp_path, spy):
    rows = news(20)
    whole = tmp_path / "whole"
    run_monitor(config(classifier, write_jsonl(tmp_path / "all.jsonl", rows), whole, window_items=5,
                       alerts=["neutral:0.4"], min_items=2), checkpoint=loaded)
    source = write_jsonl(tmp_path / "news.jsonl", rows[:9])
    cfg = config(classifier, source, tmp_path / "out", window_items=5, alerts=["neutral:0.4"], min_items=2)
    run_monitor(cfg, checkpoint=loaded)
    spy.clear()
    assert run_monitor(cfg, checkpoint=loaded).items == 0  # nothing new
    write_jsonl(source, rows[9:], mode="a")
    summary = run_monitor(cfg, checkpoint=loaded)
    assert summary.items == 11 and summary.total_items == 20 and summary.resumed
    assert spy == [r["text"] for r in rows[9:]]
    got, want = read_jsonl(tmp_path / "out/results.jsonl"), read_jsonl(whole / "results.jsonl")
    assert [r["n"] for r in got] == list(range(20))
    assert strip([{**r, "source": "x"} for r in got]) == strip([{**r, "source": "x"} for r in want])
    assert [a["id"].split(":", 1)[1] for a in read_jsonl(tmp_path / "out/alerts.jsonl")] == \
        [a["id"].split(":", 1)[1] for a in read_jsonl(whole / "alerts.jsonl")]


@pytest.mark.parametrize("crash_in", ["state write", "alerts append"])
def test_a_crash_after_the_results_append_loses_and_repeats_nothing(classifier, loaded, tmp_path, spy, monkeypatch,
                                                                    crash_in):
    """Killed between appending a batch's results and recording the state: the rerun keeps those results (it
    does not classify them again), replays them through the windows, and writes each alert exactly once."""
    from gptforge.monitor import run as run_module

    rows = news(14)
    settings = dict(window_items=3, alerts=[f"{label}:0.34" for label in LABELS], min_items=1, batch_size=4)
    run_monitor(config(classifier, write_jsonl(tmp_path / "all.jsonl", rows), tmp_path / "whole", **settings),
                checkpoint=loaded)
    reference_alerts = [a["id"].split(":", 1)[1] for a in read_jsonl(tmp_path / "whole/alerts.jsonl")]
    assert reference_alerts

    source = write_jsonl(tmp_path / "news.jsonl", rows)
    out = tmp_path / "out"
    calls = {"n": 0}
    if crash_in == "state write":
        real = run_module.write_state

        def crashing(folder, state):
            calls["n"] += 1
            if calls["n"] == 3:  # the first is the empty folder's state, then one per batch
                raise KeyboardInterrupt("killed")
            real(folder, state)

        monkeypatch.setattr(run_module, "write_state", crashing)
    else:
        real = run_module.Monitor._emit

        def crashing(self, alerts):
            if alerts:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise KeyboardInterrupt("killed")
            real(self, alerts)

        monkeypatch.setattr(run_module.Monitor, "_emit", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_monitor(config(classifier, source, out, **settings), checkpoint=loaded)
    monkeypatch.undo()
    written = read_jsonl(out / "results.jsonl")
    state = json.loads((out / "state.json").read_text())
    assert len(written) > state["items"]  # results past the recorded state: the case under test
    spy.clear()
    from gptforge.evaluate import predict

    monkeypatch.setattr(predict, "classify_texts", _counting(predict.classify_texts, spy))
    summary = run_monitor(config(classifier, source, out, **settings), checkpoint=loaded)
    assert summary.replayed == len(written) - state["items"]
    assert spy == [r["text"] for r in rows[len(written):]]  # nothing classified twice
    results = read_jsonl(out / "results.jsonl")
    assert [r["n"] for r in results] == list(range(14))  # nothing lost, nothing twice
    assert strip([{**r, "source": "x"} for r in results]) == \
        strip([{**r, "source": "x"} for r in read_jsonl(tmp_path / "whole/results.jsonl")])
    assert [a["id"].split(":", 1)[1] for a in read_jsonl(out / "alerts.jsonl")] == reference_alerts


def _counting(real, seen):
    def classify_texts(model, tokenizer, texts, labels, **kw):
        seen.extend(texts)
        return real(model, tokenizer, texts, labels, **kw)

    return classify_texts


def test_a_line_torn_by_a_crash_is_cut_and_its_item_done_again(classifier, loaded, tmp_path, caplog):
    rows = news(8)
    source = write_jsonl(tmp_path / "news.jsonl", rows[:5])
    cfg = config(classifier, source, tmp_path / "out", batch_size=2)
    run_monitor(cfg, checkpoint=loaded)
    with open(tmp_path / "out/results.jsonl", "ab") as f:
        f.write(b'{"text": "Acme sha')  # a crash in the middle of an append
    write_jsonl(source, rows[5:], mode="a")
    run_monitor(cfg, checkpoint=loaded)
    assert [r["n"] for r in read_jsonl(tmp_path / "out/results.jsonl")] == list(range(8))
    assert "torn line" in caplog.text


def test_follow_reads_a_file_while_a_thread_writes_it_in_pieces(classifier, loaded, tmp_path):
    source = tmp_path / "news.jsonl"
    source.write_text("")
    rows = news(30)
    out = tmp_path / "out"
    stop = threading.Event()
    monitor = Monitor(config(classifier, source, out, follow=True, poll_interval=0.02, batch_size=4), loaded)
    runner = threading.Thread(target=lambda: monitor.run(stop.is_set))
    runner.start()

    def write():
        with open(source, "ab") as f:
            for row in rows:
                line = (json.dumps(row) + "\n").encode()
                f.write(line[:10])  # half a line: must wait for the rest
                f.flush()
                time.sleep(0.003)
                f.write(line[10:])
                f.flush()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        writer.join(TIMEOUT)
        wait_for(lambda: len(read_jsonl(out / "results.jsonl")) >= 30)
    finally:
        stop.set()
        runner.join(TIMEOUT)
    assert not runner.is_alive()
    assert [r["n"] for r in read_jsonl(out / "results.jsonl")] == list(range(30))
    assert json.loads((out / "state.json").read_text())["inputs"]["news.jsonl"] == [source.stat().st_size, 30]


def test_follow_picks_up_new_files_in_a_folder(classifier, loaded, tmp_path):
    folder = tmp_path / "feed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", news(3))
    out = tmp_path / "out"
    stop = threading.Event()
    monitor = Monitor(config(classifier, folder, out, follow=True, poll_interval=0.02), loaded)
    runner = threading.Thread(target=lambda: monitor.run(stop.is_set))
    runner.start()
    try:
        wait_for(lambda: len(read_jsonl(out / "results.jsonl")) >= 3)
        write_jsonl(folder / "b.jsonl", news(2))
        wait_for(lambda: len(read_jsonl(out / "results.jsonl")) >= 5)
    finally:
        stop.set()
        runner.join(TIMEOUT)
    assert [r["source"] for r in read_jsonl(out / "results.jsonl")] == ["a.jsonl"] * 3 + ["b.jsonl"] * 2
    assert set(json.loads((out / "state.json").read_text())["inputs"]) == {"a.jsonl", "b.jsonl"}


def test_stdin(classifier, loaded, tmp_path):
    data = "".join(json.dumps(r) + "\n" for r in news(5)).encode()
    summary = run_monitor(config(classifier, "-", tmp_path / "out"), checkpoint=loaded, stdin=io.BytesIO(data))
    results = read_jsonl(tmp_path / "out/results.jsonl")
    assert summary.items == 5 and [r["source"] for r in results] == ["-"] * 5
    assert results[-1]["offset"] == len(data)


def test_a_bad_line_stops_with_file_and_line_and_a_rerun_goes_on_after_the_fix(classifier, loaded, tmp_path):
    source = tmp_path / "news.jsonl"
    good = [json.dumps(r) for r in news(5)]
    source.write_text("\n".join(good[:3] + ['{"text": "Acme up", oops}'] + good[3:]) + "\n")
    cfg = config(classifier, source, tmp_path / "out", batch_size=10)
    with pytest.raises(DataError, match=r"news.jsonl:4: not valid JSON .*--skip-bad"):
        run_monitor(cfg, checkpoint=loaded)
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 3  # the lines before it are kept
    source.write_text("\n".join(good[:3] + ['{"text": "Acme up", "n": 99}'] + good[3:]) + "\n")  # fixed
    assert run_monitor(cfg, checkpoint=loaded).items == 3
    assert [r["n"] for r in read_jsonl(tmp_path / "out/results.jsonl")] == [0, 1, 2, 99, 3, 4]


def test_skip_bad_skips_and_counts(classifier, loaded, tmp_path, caplog):
    source = tmp_path / "news.jsonl"
    good = [json.dumps(r) for r in news(4)]
    source.write_text("\n".join([good[0], "[1, 2]", good[1], '{"text": ""}', good[2], good[3]]) + "\n")
    summary = run_monitor(config(classifier, source, tmp_path / "out", skip_bad=True), checkpoint=loaded)
    assert (summary.items, summary.skipped) == (4, 2)
    assert "news.jsonl:2: must be a JSON object" in caplog.text and "news.jsonl:4:" in caplog.text
    assert json.loads((tmp_path / "out/state.json").read_text())["totals"]["skipped"] == 2


# --------------------------------------------------------------------------------------------------
class Collector(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Collector.received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alerts_once_per_crossing_are_told_written_and_posted(negative_classifier, tmp_path):
    Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    told = []
    try:
        rows = news(12, keys=("ACME", "GLBX"))
        cfg = config(negative_classifier, write_jsonl(tmp_path / "news.jsonl", rows), tmp_path / "out",
                     window_items=4, min_items=3, alerts=["negative:0.6"],
                     alert_url=f"http://127.0.0.1:{server.server_address[1]}/hook")
        summary = run_monitor(cfg, on_alert=told.append)
    finally:
        server.shutdown()
        server.server_close()
    # Every headline is negative: each key crosses once (at its third item) and stays above: one alert each.
    assert [(a.key, a.label, a.items, a.share) for a in told] == [("ACME", "negative", 3, 1.0),
                                                                 ("GLBX", "negative", 3, 1.0)]
    assert "ACME: negative share 1.00 >= 0.6 over the last 3 items" in told[0].describe()
    written = read_jsonl(tmp_path / "out/alerts.jsonl")
    assert [a["id"] for a in written] == [a.id for a in told]
    assert written[0]["offset"] == read_jsonl(tmp_path / "out/results.jsonl")[4]["offset"]  # ACME's 3rd item
    assert summary.alerts == 2 and summary.posts_failed == 0
    assert [(ctype, body["id"]) for ctype, body in Collector.received] == [("application/json", a.id) for a in told]


def test_a_failing_alert_url_is_logged_and_never_stops_the_monitor(negative_classifier, tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    cfg = config(negative_classifier, write_jsonl(tmp_path / "news.jsonl", news(8)), tmp_path / "out",
                 min_items=2, alerts=["negative:0.5"], alert_url=f"http://127.0.0.1:{port}/", alert_retries=2)
    with caplog.at_level(logging.WARNING):
        summary = run_monitor(cfg)
    assert summary.items == 8 and summary.alerts == 3 and summary.posts_failed == 3
    assert caplog.text.count("could not POST alert") == 3 and "after 2 tries" in caplog.text
    assert len(read_jsonl(tmp_path / "out/alerts.jsonl")) == 3


# --------------------------------------------------------------------------------------------------
def test_resume_refuses_other_weights_or_windows_and_takes_new_alert_rules(classifier, negative_classifier, loaded,
                                                                            tmp_path, caplog):
    source = write_jsonl(tmp_path / "news.jsonl", news(6))
    out = tmp_path / "out"
    run_monitor(config(classifier, source, out, window_items=5), checkpoint=loaded)
    with pytest.raises(ConfigError, match=r"other window_items \(5, now 6\).*new --out folder"):
        run_monitor(config(classifier, source, out, window_items=6), checkpoint=loaded)
    with pytest.raises(ConfigError, match="other checkpoint weights"):
        run_monitor(config(negative_classifier, source, out, window_items=5))
    with pytest.raises(ConfigError, match="other input"):
        run_monitor(config(classifier, write_jsonl(tmp_path / "other.jsonl", news(2)), out, window_items=5),
                    checkpoint=loaded)
    with caplog.at_level(logging.INFO, logger="gptforge.monitor"):
        run_monitor(config(classifier, source, out, window_items=5, alerts=["neutral:0.9"]), checkpoint=loaded)
    assert "alerts changed" in caplog.text


def test_an_output_folder_with_other_files_is_refused(classifier, loaded, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files and no state.json"):
        run_monitor(config(classifier, write_jsonl(tmp_path / "n.jsonl", news(1)), tmp_path / "out"),
                    checkpoint=loaded)
    assert (tmp_path / "out/notes.txt").read_text() == "mine"


def test_the_trend_is_redrawn_every_k_items(classifier, loaded, tmp_path, monkeypatch):
    from gptforge.monitor import run as run_module

    drawn = []
    real = run_module.draw_trend
    monkeypatch.setattr(run_module, "draw_trend", lambda *a, **k: drawn.append(1) or real(*a, **k))
    run_monitor(config(classifier, write_jsonl(tmp_path / "n.jsonl", news(12)), tmp_path / "out", plot_every=5,
                       batch_size=2), checkpoint=loaded)
    assert len(drawn) == 3  # after items 6 (the batch that passes 5) and 10, and at the end
    assert (tmp_path / "out/trend.png").stat().st_size > 5000
