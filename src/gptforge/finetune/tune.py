"""Hyperparameter search over fine-tuning runs with Optuna.

Each trial is a :func:`~gptforge.finetune.finetune` run whose learning rate (log-uniform), weight decay,
warmup, dropout and LoRA rank are drawn from the ``tune:`` section of the config (TPE sampler, seeded by
the config's seed). A trial reports its validation metric after every evaluation, and Optuna's
``MedianPruner`` stops one that is worse than the median of earlier trials at the same step, so a bad
learning rate costs a few evaluations rather than a whole run. The search folder gets::

    out_dir/
      trial-000/ ...        each trial's run folder (best/ holds its best weights)
      trials.csv            number, state, value, parameters, last step and seconds of every trial
      best_config.yaml      the config with the best trial's values, ready for `gptforge finetune --config`
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import FinetuneConfig, TuneConfig
from ..errors import ConfigError
from .loop import finetune

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.csv"
BEST_CONFIG_FILE = "best_config.yaml"


@dataclass
class TuneResult:
    """The search's outcome: the best trial's values and where the summary and best config were written."""

    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    metric: str
    completed: int
    pruned: int
    best_config_path: Path
    trials_path: Path
    summary: str


def suggest(trial, config: FinetuneConfig, space: TuneConfig) -> dict[str, Any]:
    """Draw the searched values for one trial (only the keys the space gives)."""
    params: dict[str, Any] = {}
    if space.learning_rate is not None:
        params["learning_rate"] = trial.suggest_float("learning_rate", *space.learning_rate, log=True)
    if space.weight_decay is not None:
        params["weight_decay"] = trial.suggest_float("weight_decay", *space.weight_decay)
    if space.warmup_steps is not None:
        params["warmup_steps"] = trial.suggest_int("warmup_steps", int(space.warmup_steps[0]), int(space.warmup_steps[1]))
    if space.dropout is not None:
        params["dropout"] = trial.suggest_float("dropout", *space.dropout)
    if space.lora_rank is not None and config.strategy == "lora":
        params["lora_rank"] = trial.suggest_categorical("lora_rank", [int(r) for r in space.lora_rank])
    return params


def pruning_reporter(trial, metric: str):
    """An ``on_eval`` hook that reports ``metric`` to the trial and ends the run when the pruner says so."""
    import optuna

    def report(step: int, metrics: dict[str, Any]) -> None:
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            raise optuna.TrialPruned(f"{metric} is {value} at step {step}")
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{metric} {value:.4f} at step {step} is worse than the median")

    return report


def tune(config: FinetuneConfig, space: TuneConfig, *, trials: Optional[int] = None,
         progress: bool = False) -> TuneResult:
    """Run ``trials`` (default ``space.trials``) fine-tuning trials into ``config.out_dir``; see the module doc."""
    import optuna

    config.validate()
    space.validate_against(config)
    if space.lora_rank is not None and config.strategy != "lora":
        log.warning("tune.lora_rank is ignored: strategy is %s, not lora", config.strategy)
    n_trials = trials or space.trials
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric, mode = config.stop_metric, config.stop_mode
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize" if mode == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        # Reports come at steps eval_interval, 2 * eval_interval, ...: the first `pruner_warmup_evals`
        # of them are never pruned.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials,
                                           n_warmup_steps=space.pruner_warmup_evals * config.eval_interval + 1),
    )

    def objective(trial) -> float:
        params = suggest(trial, config, space)
        run = dataclasses.replace(config, **params, out_dir=str(out / f"trial-{trial.number:03d}"), overwrite=True,
                                  evaluate_before=False, merge=False)
        start = time.monotonic()
        try:
            result = finetune(run, progress=progress, on_eval=pruning_reporter(trial, metric))
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - start, 2))
        log.info("trial %d: %s %.4f with %s", trial.number, metric, result.best_value, _params_text(params))
        return result.best_value

    study.optimize(objective, n_trials=n_trials)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    if not completed:
        raise ConfigError(f"all {n_trials} trials were pruned; widen the search space or run more trials")
    best = study.best_trial
    trials_path = _write_trials(study.trials, out / TRIALS_FILE)
    best_config = dataclasses.replace(config, **best.params, out_dir=str(out / "final"))
    best_config_path = out / BEST_CONFIG_FILE
    _write_yaml(best_config.to_dict(), best_config_path,
                f"best of {len(study.trials)} trials (trial {best.number}): {metric} {best.value:.4f}")
    summary = _summary(study.trials, metric, best.number)
    return TuneResult(best_trial=best.number, best_value=best.value, best_params=dict(best.params), metric=metric,
                      completed=len(completed), pruned=len(pruned), best_config_path=best_config_path,
                      trials_path=trials_path, summary=summary)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _last_step(trial) -> Optional[int]:
    return max(trial.intermediate_values) if trial.intermediate_values else None


def _write_trials(trials, path: Path) -> Path:
    names = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "value", *names, "last_step", "seconds"])
        for t in trials:
            writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else t.value,
                             *[t.params.get(n, "") for n in names], _last_step(t) or "", t.user_attrs.get("seconds", "")])
    return path


def _write_yaml(data: dict[str, Any], path: Path, comment: str) -> None:
    import yaml

    path.write_text(f"# {comment}\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _summary(trials, metric: str, best_number: int) -> str:
    rows = [("trial", "state", metric, "step", "parameters")]
    for t in trials:
        value = "-" if t.value is None else f"{t.value:.4f}"
        if t.value is None and t.intermediate_values:
            value = f"({t.intermediate_values[_last_step(t)]:.4f})"
        mark = " *" if t.number == best_number else ""
        rows.append((f"{t.number}{mark}", t.state.name.lower(), value, str(_last_step(t) or "-"), _params_text(t.params)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
