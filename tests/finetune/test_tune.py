"""The Optuna search: trials run, bad ones are pruned, the best config and a summary are written."""

from __future__ import annotations

import csv

import optuna
import pytest
import yaml

from gptforge.config import TuneConfig, load_finetune_config
from gptforge.finetune.tune import pruning_reporter, tune

pytestmark = pytest.mark.integration


def test_three_tiny_trials_write_the_best_config_and_a_summary(make_config, tmp_path):
    config = make_config("classify", strategy="lora", max_steps=4, eval_interval=2, out_dir=str(tmp_path / "tune"))
    space = TuneConfig(learning_rate=[1e-3, 3e-2], weight_decay=[0.0, 0.1], warmup_steps=[0, 2], lora_rank=[2, 4],
                       startup_trials=1, pruner_warmup_evals=0).validate()
    result = tune(config, space, trials=3)

    assert result.completed + result.pruned == 3 and result.completed >= 1
    rows = list(csv.DictReader(open(result.trials_path)))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    best_row = rows[result.best_trial]
    assert float(best_row["value"]) == result.best_value == max(float(r["value"]) for r in rows if r["value"])

    saved = yaml.safe_load(result.best_config_path.read_text())
    assert saved["learning_rate"] == result.best_params["learning_rate"]
    assert 1e-3 <= saved["learning_rate"] <= 3e-2 and saved["lora_rank"] in (2, 4)
    again = load_finetune_config(result.best_config_path)  # a ready-to-run fine-tuning config
    assert again.lora_rank == result.best_params["lora_rank"] and again.strategy == "lora"
    assert "*" in result.summary and "learning_rate=" in result.summary


def test_the_reporter_prunes_a_trial_the_pruner_rejects():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    for value in (0.9, 0.9):
        trial = study.ask()
        pruning_reporter(trial, "accuracy")(2, {"accuracy": value})
        study.tell(trial, value)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        pruning_reporter(trial, "accuracy")(2, {"accuracy": 0.1})
