"""`gptforge explain`: the report folder (HTML, PNGs, JSON), its page in headless Chromium (no console errors,
the tokens shown, a screenshot kept in the test's tmp dir), and one `error:` line for every bad input."""

from __future__ import annotations

import base64
import json
import queue
import re

import pytest
import torch

from gptforge.checkpoint import load_checkpoint
from tests.cli_utils import assert_one_line_error, run
from tests.explain.explain_utils import LABELS, save_lm, train_z_classifier
from tests.serve.test_chat_page import Browser, find_chromium


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return save_lm(tmp_path_factory.mktemp("explain-cli") / "lm")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return train_z_classifier(tmp_path_factory.mktemp("explain-cli-clf") / "z", steps=200)


def test_lm_report_folder(lm, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "explain", "--checkpoint", str(lm), "--prompt", "the cat", "--max-new-tokens", "5",
                            "--out", str(out), "--json", "--top-k", "3", "--device", "cpu")
    assert code == 0, err
    assert f"wrote {out / 'report.html'}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["attention_layer0.png", "attention_layer1.png",
                                                     "attention_rollout.png", "report.html", "report.json"]
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["kind"] == "lm" and data["n_prompt_tokens"] == 7 and len(data["tokens"]) == 12
    assert all(len(t["alternatives"]) == 3 for t in data["tokens"][1:])
    # the JSON's probabilities are the model's own
    ckpt = load_checkpoint(lm)
    ids = [t["id"] for t in data["tokens"]]
    with torch.no_grad():
        probs = ckpt.model(torch.tensor([ids]))[0].softmax(-1)
    assert [t["prob"] for t in data["tokens"][1:]] == pytest.approx([float(probs[i - 1, ids[i]])
                                                                     for i in range(1, len(ids))], rel=1e-5)
    html = (out / "report.html").read_text(encoding="utf-8")
    for external in ("http://", "https://", "<link", 'src="http', "src='http", "@import"):
        assert external not in html, f"the report must load nothing from elsewhere ({external!r} found)"
    assert html.count('class="tok') == 12 and html.count("data:image/png;base64,") == 3
    # --layer / --head: one layer's PNG, one head; a second run replaces the earlier report
    code, _, err = run(capsys, "explain", "--checkpoint", str(lm), "--text", "a cab", "--out", str(out),
                       "--layer", "1", "--head", "0", "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["attention_layer1.png", "attention_rollout.png", "report.html"]


def test_classifier_report_folder(classifier, tmp_path, capsys):
    out = tmp_path / "clf"
    code, _, err = run(capsys, "explain", "--checkpoint", str(classifier), "--text", "abczefgh", "--out", str(out),
                       "--json", "--ig-steps", "32", "--device", "cpu")
    assert code == 0, err
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["kind"] == "classify" and data["label"] == "has_z"
    assert set(data["probabilities"]) == set(LABELS)
    assert [t["text"] for t in data["attributions"]["occlusion"]["tokens"]] == list("abczefgh")
    assert (out / "attributions.png").is_file()
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="attr-ig"' in html and 'id="attr-occlusion"' in html and "has_z" in html


@pytest.mark.parametrize("args, fragment", [
    (["--layer", "2"], "layer must be from 0 to 1"),
    (["--head", "7"], "head must be from 0 to 1"),
    (["--top-k", "0"], "top_k must be an integer from 1 to 100"),
    (["--ig-steps", "1"], "ig_steps must be"),
])
def test_bad_choices_are_one_error_line(lm, tmp_path, capsys, args, fragment):
    code, _, err = run(capsys, "explain", "--checkpoint", str(lm), "--text", "abc", "--out", str(tmp_path / "r"),
                       "--device", "cpu", *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


def test_bad_input_is_one_error_line(lm, classifier, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(lm), "--text", "a"], "at least two tokens"),
        (["--checkpoint", str(lm), "--text", "x\udc80y"], "lone surrogate"),
        (["--checkpoint", str(lm), "--prompt", "a" * 60, "--max-new-tokens", "10"], "context"),
        (["--checkpoint", str(classifier), "--prompt", "abc"], "use --text, not --prompt"),
        (["--checkpoint", str(classifier), "--text", ""], "empty"),
        (["--checkpoint", str(tmp_path / "nope"), "--text", "abc"], "does not exist"),
    ]
    for args, fragment in cases:
        code, _, err = run(capsys, "explain", *args, "--out", str(tmp_path / "r"), "--device", "cpu")
        assert_one_line_error(code, err, fragment)
    keep = tmp_path / "project"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "explain", "--checkpoint", str(lm), "--text", "abc", "--out", str(keep), "--device", "cpu")
    assert_one_line_error(code, err, "is not an explain report")
    assert (keep / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------
class RecordingBrowser(Browser):
    """The chat page test's Chromium, also keeping the console's errors and the page's uncaught exceptions."""

    def __init__(self, executable, profile):
        self.events: "queue.Queue[dict]" = queue.Queue()
        super().__init__(executable, profile)
        self.call("Log.enable", session=True)

    def on_event(self, message: dict) -> None:
        self.events.put(message)

    def errors(self) -> list[str]:
        found = []
        while not self.events.empty():
            event = self.events.get()
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails", {}))[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args", []))[:300])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    b = RecordingBrowser(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def open_report(browser, path) -> None:
    browser.errors()  # drop what an earlier page said
    browser.call("Page.navigate", session=True, url=path.resolve().as_uri())
    browser.wait_for("document.readyState === 'complete' && document.body.dataset.ready === '1'")


def screenshot(browser, path) -> None:
    shot = browser.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 1000


@pytest.mark.integration
def test_the_lm_report_opens_in_chromium(lm, tmp_path, capsys, browser):
    out = tmp_path / "report"
    code, _, err = run(capsys, "explain", "--checkpoint", str(lm), "--text", "the cat <b>sat</b> & ran.\nok",
                       "--out", str(out), "--device", "cpu")
    assert code == 0, err
    open_report(browser, out / "report.html")
    tokens = browser.evaluate("[...document.querySelectorAll('#tokens > .tok')].map(t => t.firstChild.textContent)")
    assert "".join(tokens).replace("\u21b5", "") == "the cat <b>sat</b> & ran.\nok"  # shown as text, not markup
    assert browser.evaluate("document.body.dataset.tokens") == str(len(tokens))
    # a token's alternatives are hidden until it is hovered or focused, then shown
    hidden = browser.evaluate("getComputedStyle(document.querySelector('#tokens > .tok:nth-child(3) .tip')).display")
    browser.evaluate("document.querySelector('#tokens > .tok:nth-child(3)').focus()")
    shown = browser.evaluate("getComputedStyle(document.querySelector('#tokens > .tok:nth-child(3) .tip')).display")
    assert (hidden, shown) == ("none", "block")
    tip = browser.evaluate("document.querySelector('#tokens > .tok:nth-child(3) .tip').textContent")
    assert re.search(r"p = 0\.\d{4} \(rank \d+\)", tip) and "entropy" in tip and "top 5" in tip
    images = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
    assert images == [True, True, True]  # two layers and the rollout, decoded from their data: URIs
    screenshot(browser, tmp_path / "lm-report.png")
    assert browser.errors() == []


@pytest.mark.integration
def test_the_classifier_report_opens_in_chromium(classifier, tmp_path, capsys, browser):
    out = tmp_path / "clf"
    code, _, err = run(capsys, "explain", "--checkpoint", str(classifier), "--text", "abczefgh", "--out", str(out),
                       "--ig-steps", "32", "--device", "cpu")
    assert code == 0, err
    open_report(browser, out / "report.html")
    tokens = browser.evaluate("[...document.querySelectorAll('#attr-occlusion > .tok')].map(t => t.firstChild.textContent)")
    assert tokens == list("abczefgh")
    attributions = browser.evaluate("[...document.querySelectorAll('#attr-occlusion > .tok')]"
                                    ".map(t => parseFloat(t.dataset.attribution))")
    assert max(range(8), key=attributions.__getitem__) == 3  # the z
    assert "has_z" in browser.evaluate("document.getElementById('probabilities').textContent")
    screenshot(browser, tmp_path / "classifier-report.png")
    assert browser.errors() == []


# --------------------------------------------------------------------------------------------------
def test_the_readme_explain_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Each `gptforge explain` line of the README, on demo-sized stand-ins for runs/demo and runs/sentiment."""
    from tests.cli_utils import save_tiny_bpe_checkpoint
    from tests.test_readme import cli_commands

    commands = cli_commands("explain")
    assert len(commands) == 2
    demo = save_tiny_bpe_checkpoint(tmp_path / "demo")
    sentiment = save_tiny_bpe_checkpoint(tmp_path / "sentiment", labels=["negative", "positive"])
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        argv = [{"runs/demo": str(demo), "runs/sentiment": str(sentiment)}.get(a, a) for a in argv] + ["--device", "cpu"]
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        folder = argv[argv.index("--out") + 1]
        assert f"wrote {folder}/report.html" in out and (tmp_path / folder / "attention_rollout.png").is_file()
