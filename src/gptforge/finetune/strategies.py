"""Which weights a fine-tuning run trains: full, top-k, head, or a parameter-efficient method.

Every strategy works by switching ``requires_grad``; the optimizer only ever sees trainable parameters,
so a frozen weight is never touched (no update, no weight decay) and stays bit-identical.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..config import PEFT_STRATEGIES, FinetuneConfig
from ..errors import ConfigError
from ..model import GPT
from ..model.gpt import CausalSelfAttention

log = logging.getLogger(__name__)


def base_model(model: nn.Module) -> GPT:
    """The GPT inside a TaskModel (or the model itself for language modelling)."""
    return model if isinstance(model, GPT) else model.base


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the dropout probability of every dropout layer, attention's included."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, CausalSelfAttention):
            module.dropout = p  # attention dropout is an argument of SDPA, not a module


def peft_options(config: FinetuneConfig) -> dict[str, Any]:
    """The keyword options gptforge.peft.apply_peft takes for the config's strategy."""
    if config.strategy == "lora":
        options: dict[str, Any] = {"rank": config.lora_rank, "alpha": config.lora_alpha,
                                   "dropout": config.lora_dropout}
        if config.lora_targets is not None:
            options["targets"] = list(config.lora_targets)
        return options
    if config.strategy == "adapter":
        return {"bottleneck": config.adapter_bottleneck}
    if config.strategy == "prefix":
        return {"prefix_length": config.prefix_length}
    raise ValueError(f"{config.strategy!r} is not a parameter-efficient strategy")


def apply_strategy(model: nn.Module, config: FinetuneConfig) -> None:
    """Freeze and unfreeze ``model`` (a GPT for lm, else a TaskModel) as ``config.strategy`` says.

    - full: every weight trains;
    - top-k: the last ``top_k_layers`` blocks, the final LayerNorm and the head (for lm the LM head,
      which is the token embedding when they are tied);
    - head: only the task head (classify, tokens);
    - lora, adapter, prefix: gptforge.peft adds the trainable pieces and freezes the base; a task head
      still trains.
    """
    base = base_model(model)
    strategy = config.strategy
    if strategy == "full":
        model.requires_grad_(True)
    elif strategy in PEFT_STRATEGIES:
        from ..peft import apply_peft

        apply_peft(base, strategy, **peft_options(config))
    else:
        model.requires_grad_(False)
        if strategy == "top-k":
            n_layer = len(base.blocks)
            if config.top_k_layers > n_layer:
                raise ConfigError(f"top_k_layers is {config.top_k_layers} but the model has only {n_layer} blocks")
            for block in base.blocks[n_layer - config.top_k_layers:]:
                block.requires_grad_(True)
            base.ln_f.requires_grad_(True)
            if model is base:
                base.lm_head.requires_grad_(True)
        elif strategy == "head" and model is base:
            raise ConfigError("strategy 'head' trains only a task head, and task 'lm' has none")
    if model is not base:
        model.head.requires_grad_(True)
    trainable, total = count_parameters(model)
    log.info("strategy %s: training %s of %s parameters (%.2f%%)", strategy, f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
