"""The tiny GPT and the few training steps that the PEFT tests share.

Import as ``from tests.peft.peft_utils import tiny_gpt, lm_steps`` (pytest runs with --import-mode=importlib).
"""

import torch
import torch.nn.functional as F

from gptforge.config import ModelConfig
from gptforge.model import GPT


def tiny_gpt(**kw) -> GPT:
    """A seeded 2-layer, width-32 GPT in eval mode; keyword arguments override its ModelConfig."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).eval()


def lm_steps(model: GPT, steps=3, lr=1e-2):
    """A few AdamW steps on random data; the optimizer sees every parameter, frozen ones included."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (4, 12))
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_only_peft_trained(model, base: dict, peft_before: dict):
    """Every base tensor is bit-identical to ``base`` and every PEFT tensor differs from ``peft_before``."""
    state = model.state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), f"base tensor {k} changed"
    for k, v in peft_before.items():
        assert not torch.equal(state[k], v), f"{k} did not train"
