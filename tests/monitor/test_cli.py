"""`gptforge monitor`: every bad input is one `error:` line; alerts on stderr; SIGTERM stops cleanly; stdin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_utils import assert_one_line_error, run
from tests.monitor.monitor_utils import news, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def argv(clf, source, out, *extra):
    return ["monitor", "--checkpoint", str(clf), "--input", str(source), "--out", str(out), "--device", "cpu",
            *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--alert", "angry:0.5"], "--alert names label 'angry', which the classifier does not have (its labels: "
                               "negative, neutral, positive)"),
    (["--alert", "negative:1.5"], "--alert must look like LABEL:SHARE with SHARE in (0, 1]"),
    (["--alert", "negative"], "--alert must look like LABEL:SHARE"),
    (["--alert", "negative:0"], "--alert must look like LABEL:SHARE"),
    (["--alert", "negative:0.5", "--alert", "negative:0.7"], "gives label 'negative' twice"),
    (["--hysteresis", "1"], "monitor.hysteresis must be in [0, 1)"),
    (["--window-items", "0"], "monitor.window_items must be at least 1"),
    (["--window-minutes", "-5"], "monitor.window_minutes must be a positive number of minutes"),
    (["--min-items", "0"], "monitor.min_items must be at least 1"),
    (["--alert-url", "ftp://example"], "--alert-url must be an http:// or https:// URL"),
    (["--window-items", "many"], "must be an integer"),
])
def test_bad_settings_are_one_error_line(classifier, tmp_path, capsys, extra, fragment):
    source = write_jsonl(tmp_path / "news.jsonl", news(2))
    code, out, err = run(capsys, *argv(classifier, source, tmp_path / "out", *extra))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out/results.jsonl").exists()


def test_bad_inputs_are_one_error_line(classifier, lm_checkpoint, tmp_path, capsys):
    source = write_jsonl(tmp_path / "news.jsonl", news(2))
    cases = [
        (argv(tmp_path / "no-such-model", source, tmp_path / "o1"), "does not exist"),
        (argv(lm_checkpoint, source, tmp_path / "o2"), "is a language model with no text classification head"),
        (argv(classifier, tmp_path / "missing.jsonl", tmp_path / "o3"), "input " + str(tmp_path / "missing.jsonl")
         + " does not exist"),
        (argv(classifier, source, source), "is a file; the monitor writes a folder"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "Acme", "time": "noon"}\n')
    cases.append((argv(classifier, bad, tmp_path / "o4"), f"{bad}:2: time 'noon' is neither ISO 8601"))
    for args, fragment in cases:
        code, out, err = run(capsys, *args)
        assert_one_line_error(code, err, fragment)


def test_the_command_prints_alerts_on_stderr_and_a_summary(negative_classifier, tmp_path, capsys):
    source = write_jsonl(tmp_path / "news.jsonl", news(9))
    code, out, err = run(capsys, *argv(negative_classifier, source, tmp_path / "out", "--alert", "negative:0.6",
                                       "--min-items", "2"))
    assert code == 0, err
    alerts = [line for line in err.splitlines() if line.startswith("alert: ")]
    assert len(alerts) == 3 and alerts[0].startswith("alert: ACME: negative share 1.00 >= 0.6 over the last 2 items")
    assert out.startswith("monitored 9 items, 3 alerts; results ")
    code, out, err = run(capsys, *argv(negative_classifier, source, tmp_path / "out", "--alert", "negative:0.6",
                                       "--min-items", "2"))
    assert code == 0 and out.startswith("monitored 0 items (9 in all), 0 alerts")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GPTFORGE_NATIVE": os.environ.get("GPTFORGE_NATIVE", "0")}


def test_follow_stops_cleanly_on_sigterm_and_resumes(classifier, tmp_path):
    source = write_jsonl(tmp_path / "news.jsonl", news(6))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gptforge.cli", *argv(classifier, source, out, "--follow", "--poll-interval", "0.05")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(read_jsonl(out / "results.jsonl")) < 6:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the monitor did not classify the file"
            time.sleep(0.05)
        write_jsonl(source, news(9)[6:], mode="a")
        while len(read_jsonl(out / "results.jsonl")) < 9:
            assert time.monotonic() < deadline, "the monitor did not follow the file"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stdout.startswith("stopped by SIGTERM; monitored 9 items") and "run the same command to resume" in stdout
    assert "Traceback" not in stderr
    assert [r["n"] for r in read_jsonl(out / "results.jsonl")] == list(range(9))
    assert json.loads((out / "state.json").read_text())["inputs"]["news.jsonl"][1] == 9


def test_stdin_through_the_command(classifier, tmp_path):
    data = "".join(json.dumps(r) + "\n" for r in news(4))
    done = subprocess.run([sys.executable, "-m", "gptforge.cli", *argv(classifier, "-", tmp_path / "out")],
                          input=data, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("monitored 4 items")
    assert [r["source"] for r in read_jsonl(tmp_path / "out/results.jsonl")] == ["-"] * 4
