"""`gptforge finetune | evaluate | classify | tag`: end to end on tiny data, and one-line errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from tests.cli_utils import assert_one_line_error, run

pytestmark = pytest.mark.integration


def jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def reviews(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(["the", "plot", "was", "very", "movie"]) for _ in range(3)]
        words.insert(rng.randrange(4), "good" if label == "pos" else "bad")
        out.append({"text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_ft")
    torch.manual_seed(0)
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz ."))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(root / "base", model, tok, {"model": vars(model.config)})
    tags = [{"tokens": ["zed", "met", "kim"], "tags": ["B-PER", "O", "B-PER"]},
            {"tokens": ["in", "lima"], "tags": ["O", "B-LOC"]}] * 8
    return {
        "root": root, "base": str(root / "base"),
        "train": jsonl(root / "train.jsonl", reviews(96, 1)), "val": jsonl(root / "val.jsonl", reviews(24, 2)),
        "tags": jsonl(root / "tags.jsonl", tags),
    }


@pytest.fixture(scope="module")
def classifier(files):
    """A classifier fine-tuned through the CLI (module-scoped: several tests use it)."""
    out = files["root"] / "cls"
    code = main(["finetune", "--task", "classify", "--checkpoint", files["base"], "--train", files["train"],
                 "--val", files["val"], "--out", str(out), "-q", "--max_steps=30", "--eval_interval=15",
                 "--learning_rate", "3e-3", "--dropout=0", "--device=cpu"])
    assert code == 0
    return out


def test_finetune_prints_the_before_after_report(classifier, files, capsys):
    report = json.loads((classifier / "report.json").read_text())
    assert report["after"]["metrics"]["accuracy"] >= 0.9
    # --resume of a finished run trains nothing and reports the result again.
    code, out, err = run(capsys, "finetune", "--task", "classify", "--checkpoint", files["base"], "--train",
                         files["train"], "--val", files["val"], "--out", str(classifier), "-q", "--max_steps=30",
                         "--eval_interval=15", "--learning_rate=3e-3", "--dropout=0", "--device=cpu", "--resume")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["metric", "before", "after", "change"]
    assert "accuracy" in out and "macro avg" in out and "for 30 steps" in out
    assert f"best: {classifier / 'best'}" in out


def test_evaluate_classify_and_json(classifier, files, capsys, tmp_path):
    code, out, err = run(capsys, "evaluate", "--checkpoint", str(classifier / "best"), "--data", files["val"],
                         "--json", str(tmp_path / "eval.json"), "--device", "cpu")
    assert code == 0, err
    assert out.startswith("val_loss ") and "accuracy" in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["task"] == "classify" and saved["metrics"]["accuracy"] >= 0.9

    code, out, err = run(capsys, "classify", "--checkpoint", str(classifier / "best"), "--text", "good plot",
                         "--text", "the bad movie", "--json")
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in results] == ["pos", "neg"]
    assert set(results[0]["probabilities"]) == {"neg", "pos"}

    texts = tmp_path / "texts.txt"
    texts.write_text("very good\n\nso bad\n")
    code, out, _ = run(capsys, "classify", "--checkpoint", str(classifier / "best"), "--file", str(texts))
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == ["pos", "neg"]


def test_tag_and_a_checkpoint_used_for_the_wrong_task(classifier, files, capsys, tmp_path):
    out_dir = tmp_path / "tagger"
    code, _, err = run(capsys, "finetune", "--task", "tokens", "--checkpoint", files["base"], "--train",
                       files["tags"], "--out", str(out_dir), "-q", "--max_steps=2", "--eval_interval=2",
                       "--device=cpu")
    assert code == 0, err
    code, out, err = run(capsys, "tag", "--checkpoint", str(out_dir / "best"), "--text", "zed met kim")
    assert code == 0, err
    assert out.splitlines()[0].startswith("zed/")

    code, _, err = run(capsys, "classify", "--checkpoint", str(out_dir / "best"), "--text", "hi")
    assert_one_line_error(code, err, "was fine-tuned for token tagging (task 'tokens'), not text classification")
    code, _, err = run(capsys, "tag", "--checkpoint", str(classifier / "best"), "--text", "hi")
    assert_one_line_error(code, err, "was fine-tuned for text classification (task 'classify')")
    code, _, err = run(capsys, "evaluate", "--checkpoint", str(out_dir / "best"), "--data", files["val"],
                       "--task", "classify")
    assert_one_line_error(code, err, "not text classification")
    code, _, err = run(capsys, "classify", "--checkpoint", files["base"], "--text", "hi")
    assert_one_line_error(code, err, "is a language model with no text classification head")


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("task, train, val, fragment", [
    ("classify", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n',
     '{"text": "meh", "label": "maybe"}\n', "label 'maybe' in"),
    ("classify", "", None, "holds no examples"),
    ("classify", "text,stars\ngood,5\n", None, "label"),
    ("tokens", '{"tokens": ["zed", "met"], "tags": ["B-PER"]}\n', None, "tags"),
])
def test_bad_data_is_one_line(files, capsys, tmp_path, task, train, val, fragment):
    suffix = ".csv" if train.startswith("text,") else ".jsonl"
    argv = ["finetune", "--task", task, "--checkpoint", files["base"], "--train", write(tmp_path / f"t{suffix}", train),
            "--out", str(tmp_path / "run"), "-q"]
    if val is not None:
        argv += ["--val", write(tmp_path / "v.jsonl", val)]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run" / "best").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--lerning_rate=1e-3"], "unknown config key finetune.lerning_rate (did you mean finetune.learning_rate?)"),
    (["--task", "lm", "--strategy", "head"], "task 'lm' has none"),
    (["--patience=0"], "finetune.patience must be at least 1"),
    (["--metric=accuracy", "--task", "tokens"], "does not apply to task 'tokens'"),
    (["--resume"], "nothing to resume"),
])
def test_bad_settings_are_one_line(files, capsys, tmp_path, extra, fragment):
    argv = ["finetune", "--checkpoint", files["base"], "--train", files["train"], "--out", str(tmp_path / "r"), "-q"]
    code, _, err = run(capsys, *argv, *extra)
    assert_one_line_error(code, err, fragment)


def test_finetune_help_config_lists_every_key(capsys):
    code, out, _ = run(capsys, "finetune", "--help-config")
    assert code == 0 and "--learning_rate=0.0005" in out and "--patience=None" in out


def test_a_resume_with_new_hyperparameters_is_one_line_and_changes_nothing(classifier, files, capsys):
    from tests.train.test_faults import snapshot

    before = snapshot(classifier)
    code, _, err = run(capsys, "finetune", "--task", "classify", "--checkpoint", files["base"], "--train",
                       files["train"], "--val", files["val"], "--out", str(classifier), "-q", "--max_steps=40",
                       "--eval_interval=15", "--learning_rate", "1e-2", "--dropout=0", "--device=cpu", "--resume")
    assert_one_line_error(code, err, "--resume would change learning_rate (0.003 -> 0.01) from what the run in")
    assert snapshot(classifier) == before


def test_sigterm_during_finetune_saves_and_says_where(files, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from gptforge.checkpoint import latest_checkpoint
    from gptforge.train.metrics import read_metrics

    out = tmp_path / "run"
    env = {**os.environ, "GPTFORGE_NATIVE": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "gptforge.cli", "finetune", "--task", "classify", "--checkpoint",
                             files["base"], "--train", files["train"], "--val", files["val"], "--out", str(out), "-q",
                             "--max_steps=100000", "--eval_interval=100000", "--checkpoint_interval=100000",
                             "--device=cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while (not any("train_loss" in r for r in read_metrics(out / "metrics.jsonl"))
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    latest = latest_checkpoint(out)
    n = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert stdout.strip() == f"stopped by SIGTERM at step {n}; saved {latest}; resume with --resume"
    assert "Traceback" not in stderr


def test_ctrl_c_during_finetune_saves_at_the_next_step_and_says_where(files, tmp_path, capsys, monkeypatch):
    """In-process, SIGINT as step 2 begins (Ctrl-C printed `interrupted` and saved nothing before)."""
    import os
    import signal

    from gptforge.checkpoint import latest_checkpoint
    from gptforge.train.trainer import Trainer

    original = Trainer._train_step

    def train_step(self, lr, signals):
        if self.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, lr, signals)

    monkeypatch.setattr(Trainer, "_train_step", train_step)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "finetune", "--task", "classify", "--checkpoint", files["base"], "--train",
                            files["train"], "--val", files["val"], "--out", str(out), "-q", "--max_steps=6",
                            "--eval_interval=100", "--checkpoint_interval=100", "--device=cpu")
    assert code == 128 + signal.SIGINT, err
    saved = out / "checkpoints" / "step-0000002"
    assert stdout == f"stopped by SIGINT at step 2; saved {saved}; resume with --resume\n"
    assert latest_checkpoint(out) == saved and "interrupted" not in err and "Traceback" not in err
    assert not (out / "report.json").exists()  # no final evaluation or report for a stopped run


def test_a_fine_tuning_run_folder_means_best_for_classify_evaluate_and_serve(classifier, files, capsys, tmp_path):
    """The run folder's latest checkpoint is made to disagree with best/ (its head negated, resealed); classify,
    evaluate and serve given the run folder all use best/ and say so (the issue: serve said negative 0.68 where
    best/ said positive 0.55)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gptforge.checkpoint import MODEL_FILE, latest_checkpoint
    from gptforge.config import ServeConfig
    from gptforge.serve.app import load_served_checkpoint
    from tests.model_utils import reseal

    run_dir = tmp_path / "cls"
    shutil.copytree(classifier, run_dir)
    latest = latest_checkpoint(run_dir)
    state = load_file(str(latest / MODEL_FILE))
    head = [k for k in state if k.startswith("head.")]
    assert head, sorted(state)
    for k in head:
        state[k] = -state[k]
    save_file(state, str(latest / MODEL_FILE), metadata={"format": "pt"})
    reseal(latest)

    said = f"loaded {run_dir / 'best'} (best validation checkpoint of fine-tuning run {run_dir})"
    for command in (["classify", "--text", "good plot", "--text", "the bad movie", "--json"],
                    ["evaluate", "--data", files["val"], "--device", "cpu"]):
        code, from_run, err = run(capsys, command[0], "--checkpoint", str(run_dir), *command[1:])
        assert code == 0, err
        assert said in err.splitlines()
        code, from_best, _ = run(capsys, command[0], "--checkpoint", str(run_dir / "best"), *command[1:])
        code_latest, from_latest, _ = run(capsys, command[0], "--checkpoint", str(latest), *command[1:])
        assert code == code_latest == 0
        assert from_run == from_best != from_latest
    assert load_served_checkpoint(ServeConfig(checkpoint=str(run_dir), device="cpu")).path == run_dir / "best"
