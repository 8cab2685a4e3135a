"""Fine-tuning a pretrained GPT: language modelling on instruction / chat data, text classification and
token tagging, with full, top-k, head-only or parameter-efficient (LoRA, adapter, prefix) training."""

from ..evaluate.predict import classify_texts, tag_texts
from ..evaluate.tasks import evaluate_checkpoint, evaluate_task
from .loop import EarlyStopping, FinetuneResult, finetune, load_trained_weights
from .report import format_before_after
from .strategies import apply_strategy, count_parameters

__all__ = ["EarlyStopping", "FinetuneResult", "finetune", "load_trained_weights", "classify_texts",
           "evaluate_checkpoint", "evaluate_task", "format_before_after", "tag_texts", "apply_strategy",
           "count_parameters"]
