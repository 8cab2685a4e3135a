"""Task heads on a built GPT, by composition: ``TaskModel(base=gpt, head=Linear(n_embd, num_labels))``.

``task="classify"`` reads the final hidden state of each row's last real token (a causal model has seen
the whole sequence only there) and gives (B, num_labels) logits; ``task="tokens"`` gives (B, T,
num_labels), one label per position (NER, tagging).

Batches are right-padded. In a causal model a real token attends only to earlier positions, which in a
right-padded row are all real, so padding cannot change a real token's hidden state and the base runs
without the attention mask, on the fused causal kernel. The mask is used only to find each row's last
real token (``attention_mask.sum(1) - 1``); the logits at padding positions of ``"tokens"`` are
meaningless and the loss must ignore them.

The GPT is kept whole under ``base`` (its keys are ``base.*``), so PEFT transforms apply to a TaskModel
as they do to a GPT, and :func:`head_state_dict` / :func:`load_head` move just the classifier.
:func:`forward_loss` is the loss of a batch for each task (a bare GPT's next-token loss for ``"lm"``),
the one that fine-tuning trains and evaluation reports.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.finetune import IGNORE_INDEX
from .errors import CheckpointError, ConfigError
from .model import GPT

TASKS = ("classify", "tokens")


class TaskModel(nn.Module):
    """A GPT (``base``) with a dropout and a linear classifier (``head``) on its final hidden states."""

    def __init__(self, base: GPT, task: str, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ConfigError(f"num_labels must be an integer of at least 2, got {num_labels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"head dropout must be in [0, 1), got {dropout!r}")
        self.task = task
        self.num_labels = num_labels
        self.base = base
        self.dropout = nn.Dropout(dropout)
        weight = base.wte.weight
        self.head = nn.Linear(base.config.n_embd, num_labels, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)  # the base's own init scale
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits: (B, num_labels) for "classify", (B, T, num_labels) for "tokens".

        ``idx`` (B, T) is right-padded; ``attention_mask`` (B, T) marks real tokens with 1.
        """
        hidden = self.base.hidden_states(idx)  # (B, T, C); no mask needed for right padding (module doc)
        if self.task == "classify":
            hidden = hidden[torch.arange(idx.shape[0], device=idx.device), last_token_index(idx, attention_mask)]
        return self.head(self.dropout(hidden))


def last_token_index(idx: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's last real position, (B,): ``attention_mask.sum(1) - 1``, or T - 1 without a mask."""
    B, T = idx.shape
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
    if attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask must have shape {tuple(idx.shape)}, got {tuple(attention_mask.shape)}")
    return (attention_mask.long().sum(dim=1) - 1).clamp(min=0)  # an all-padding row reads position 0


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of scored targets, logits) of one batch.

    lm: next-token loss over the positions whose label is not -100 (prompt and padding score nothing);
    classify: one label per row, read at the row's last real token; tokens: one tag per first sub-word.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    if task == "lm":
        logits = model(input_ids)  # (B, T, V); right padding needs no mask under causal attention
        targets = labels[:, 1:]  # the label of token t+1 is predicted at t
        scored = logits[:, :-1]
    else:
        logits = model(input_ids, attention_mask=batch["attention_mask"])  # (B, L) or (B, T, L)
        targets, scored = labels, logits
    flat = scored.float().reshape(-1, scored.size(-1))
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum(), logits


def head_state_dict(task_model: TaskModel) -> dict[str, torch.Tensor]:
    """The classifier's tensors, ``head.weight`` (num_labels, n_embd) and ``head.bias`` (num_labels,)."""
    return {f"head.{name}": t.detach() for name, t in task_model.head.state_dict().items()}


@torch.no_grad()
def load_head(task_model: TaskModel, state: dict[str, torch.Tensor]) -> None:
    """Copy ``head.weight`` / ``head.bias`` from ``state`` into the classifier (CheckpointError if they don't fit)."""
    for name, target in head_state_dict(task_model).items():
        if name not in state:
            raise CheckpointError(f"head weights lack {name!r}")
        if state[name].shape != target.shape:
            raise CheckpointError(f"{name} has shape {tuple(state[name].shape)} but this head needs "
                                  f"{tuple(target.shape)} (num_labels {task_model.num_labels})")
    for name, target in head_state_dict(task_model).items():
        target.copy_(state[name])
