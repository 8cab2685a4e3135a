"""Evaluation: language-model loss, perplexity and bits per byte."""

from .lm import evaluate_lm, loss_to_metrics

__all__ = ["evaluate_lm", "loss_to_metrics"]
