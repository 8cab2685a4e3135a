"""The lm-eval example's files agree with each other: the task YAML reads mc.jsonl from the repository root
(where run.sh runs lm_eval) with the fields gptforge's choice data has, and mc.jsonl is valid choice data."""

from __future__ import annotations

from pathlib import Path

import yaml

from gptforge.evaluate.choice import read_choice_data

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lm-eval"


def test_task_reads_the_local_choice_data():
    task = yaml.safe_load((EXAMPLE / "gptforge_mc.yaml").read_text(encoding="utf-8"))
    assert task["task"] == "gptforge_mc" and task["output_type"] == "multiple_choice"
    assert task["dataset_path"] == "json"  # a local file, no hub
    data = ROOT / task["dataset_kwargs"]["data_files"][task["test_split"]]
    assert data == EXAMPLE / "mc.jsonl"
    assert (task["doc_to_text"], task["doc_to_choice"], task["doc_to_target"]) == ("{{context}}", "{{choices}}",
                                                                                     "answer")
    assert task["target_delimiter"] == ""  # the choices start with their own space, as gptforge scores them
    examples = read_choice_data(data)
    assert len(examples) == 60
    assert all(len(ex.choices) == 4 and all(c.startswith(" ") for c in ex.choices) for ex in examples)
    assert all(not ex.context.endswith(" ") for ex in examples)
    # the answers are spread over the positions (a model preferring one position cannot score well)
    assert len({ex.answer for ex in examples}) == 4
