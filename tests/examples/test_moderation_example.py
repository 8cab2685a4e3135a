"""The moderation example's data: the files are what make_data.py writes, they load as classification data with
balanced labels, no line is in two splits, the held-out phrasings are not in the training data, and run.sh parses."""

import json
import subprocess
import sys
from pathlib import Path

from gptforge.data.finetune import load_classification_examples

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "moderation"
SPLITS = ("train", "val", "test", "heldout")


def rows(split):
    return [json.loads(line) for line in (EXAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_make_data_writes_the_committed_files(tmp_path):
    script = tmp_path / "make_data.py"
    script.write_text((EXAMPLE / "make_data.py").read_text(encoding="utf-8"), encoding="utf-8")
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (EXAMPLE / f"{split}.jsonl").read_bytes(), split


def test_splits_are_balanced_disjoint_and_load():
    seen = {}
    for split in SPLITS:
        data = rows(split)
        labels = [r["label"] for r in data]
        assert set(labels) == {"ok", "toxic"} and labels.count("ok") == labels.count("toxic"), split
        for r in data:
            key = r["text"].lower()
            assert key not in seen, f"{r['text']!r} is in {seen.get(key)} and {split}"
            seen[key] = split
        loaded = load_classification_examples(EXAMPLE / f"{split}.jsonl")
        assert loaded == [(r["text"], r["label"]) for r in data]


def test_run_script_parses():
    subprocess.run(["bash", "-n", str(EXAMPLE / "run.sh")], check=True, timeout=30)
