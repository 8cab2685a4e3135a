"""Fine-tuning a pretrained GPT: language modelling on instruction / chat data, text classification and
token tagging, with full, top-k, head-only or parameter-efficient (LoRA, adapter, prefix) training."""

from .loop import EarlyStopping, FinetuneResult, finetune, load_trained_weights
from .report import classify_texts, evaluate_checkpoint, evaluate_task, format_before_after, tag_texts
from .strategies import apply_strategy, count_parameters

__all__ = ["EarlyStopping", "FinetuneResult", "finetune", "load_trained_weights", "classify_texts",
           "evaluate_checkpoint", "evaluate_task", "format_before_after", "tag_texts", "apply_strategy",
           "count_parameters"]
