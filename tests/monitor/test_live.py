"""`gptforge serve --monitor DIR`: /v1/monitor returns the folder's series and alerts; /monitor draws them
(driven in headless Chromium when it is installed, as the chat page's test does)."""

from __future__ import annotations

import httpx
import pytest

from gptforge.cli import main
from gptforge.config import MonitorConfig, ServeConfig
from gptforge.monitor import run_monitor
from gptforge.errors import ConfigError
from gptforge.serve.app import STATIC_DIR, create_app, load_served_checkpoint
from tests.monitor.monitor_utils import news, read_jsonl, save_classifier, write_jsonl
from tests.serve.test_chat_page import browser  # noqa: F401 (the fixture: Chromium, or the test skipped)
from tests.serve.serve_utils import LiveServer, serving

pytestmark = pytest.mark.integration

KEY = "monitor-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folder(negative_classifier, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    source = write_jsonl(tmp / "news.jsonl", news(10, keys=("ACME", "GLBX")))
    out = tmp / "out"
    run_monitor(MonitorConfig(checkpoint=str(negative_classifier), input=str(source), out=str(out), device="cpu",
                              window_items=4, min_items=3, alerts=["negative:0.6"], plot_every=0))
    return out


@pytest.fixture(scope="module")
def live(negative_classifier, folder):
    config = ServeConfig(checkpoint=str(negative_classifier), device="cpu", api_key=KEY, monitor=str(folder))
    with serving(config) as server:
        yield server


def test_the_monitor_endpoint_returns_series_and_alerts(live, folder):
    assert httpx.get(live.url + "/v1/monitor", timeout=30).status_code == 401  # the data needs the key
    r = httpx.get(live.url + "/v1/monitor", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()
    results = read_jsonl(folder / "results.jsonl")
    assert data["started"] and data["items"] == 10 and data["labels"] == ["negative", "neutral", "positive"]
    assert data["alert_rules"] == [["negative", 0.6]] and data["window"] == {"items": 4, "minutes": None}
    assert [k["key"] for k in data["keys"]] == ["ACME", "GLBX"]
    for entry in data["keys"]:
        mine = [r for r in results if r["key"] == entry["key"]]
        assert [p["time"] for p in entry["points"]] == [r["time"] for r in mine]
        assert entry["last"]["shares"] == mine[-1]["window"]["shares"] and entry["last"]["items"] == 4
    assert [a["id"] for a in data["alerts"]] == [a["id"] for a in read_jsonl(folder / "alerts.jsonl")]
    assert all(isinstance(a["t"], float) for a in data["alerts"])
    few = httpx.get(live.url + "/v1/monitor?points=2&alerts=1", headers=AUTH, timeout=30).json()
    assert [len(k["points"]) for k in few["keys"]] == [2, 2] and len(few["alerts"]) == 1
    bad = httpx.get(live.url + "/v1/monitor?points=0", headers=AUTH, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "points"


def test_the_page_is_served_without_the_key_and_loads_nothing_from_elsewhere(live):
    r = httpx.get(live.url + "/monitor", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = (STATIC_DIR / "monitor.html").read_text(encoding="utf-8")
    assert r.text == html
    for external in ("https://", "//cdn", "<link", "src=", "fetch(\"http"):
        assert external not in html


def test_without_monitor_both_routes_are_404_in_the_error_shape(negative_classifier):
    config = ServeConfig(checkpoint=str(negative_classifier), device="cpu")
    server = LiveServer(config, load_served_checkpoint(config))
    try:
        for path in ("/monitor", "/v1/monitor"):
            r = httpx.get(server.url + path, timeout=30)
            assert r.status_code == 404 and "--monitor DIR" in r.json()["error"]["message"]
    finally:
        server.close()


def test_a_folder_the_monitor_has_not_written_yet_answers_empty(negative_classifier, tmp_path):
    config = ServeConfig(checkpoint=str(negative_classifier), device="cpu", monitor=str(tmp_path / "later"))
    server = LiveServer(config, load_served_checkpoint(config))
    try:
        data = httpx.get(server.url + "/v1/monitor", timeout=30).json()
        assert (data["started"], data["keys"], data["alerts"], data["items"]) == (False, [], [], 0)
    finally:
        server.close()


def test_a_classifier_with_other_labels_than_the_folder_is_refused_in_one_line(folder, tmp_path, capsys):
    other = save_classifier(tmp_path / "other", labels=("bearish", "bullish"))
    config = ServeConfig(checkpoint=str(other), device="cpu", monitor=str(folder))
    with pytest.raises(ConfigError, match="bearish"):  # checked before anything is served
        create_app(config, load_served_checkpoint(config))
    assert main(["serve", "--checkpoint", str(other), "--device", "cpu", "--monitor", str(folder)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "['negative', 'neutral', 'positive']" in errors[0] and "['bearish', 'bullish']" in errors[0]


def test_the_page_draws_each_key_and_lists_the_alerts(live, folder, negative_classifier, browser):
    browser.call("Page.navigate", session=True, url=live.url + "/monitor")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('keys')")
    browser.wait_for("document.getElementById('status').textContent.includes('401')")  # no key yet
    browser.type("#api_key", KEY)
    browser.evaluate("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    browser.wait_for("document.querySelectorAll('.key-chart').length === 2")
    assert browser.evaluate("[...document.querySelectorAll('.key-chart')].map(c => c.dataset.key)") == ["ACME", "GLBX"]
    assert browser.evaluate("document.querySelectorAll('.key-chart path.series').length") == 6  # 3 labels each
    ids = [a["id"] for a in read_jsonl(folder / "alerts.jsonl")]
    assert browser.evaluate("[...document.querySelectorAll('#alerts li.alert')].map(li => li.dataset.id)") == ids[::-1]
    assert sorted(browser.evaluate("[...document.querySelectorAll('.alert-mark')].map(g => g.dataset.id)")) == sorted(ids)
    assert "10 items" in browser.evaluate("document.getElementById('status').textContent")
    # The monitor goes on (a new key arrives): the page shows it at its next poll.
    source = folder.parent / "news.jsonl"
    write_jsonl(source, [{"text": "Umbrella Labs recalls products", "key": "UMBR", "time": 1_796_100_000}], mode="a")
    run_monitor(MonitorConfig(checkpoint=str(negative_classifier), input=str(source), out=str(folder), device="cpu",
                              window_items=4, min_items=3, alerts=["negative:0.6"], plot_every=0))
    browser.wait_for("document.querySelectorAll('.key-chart').length === 3", timeout=30)
