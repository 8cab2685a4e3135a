"""The learning-rate schedule and the AdamW parameter groups."""

import math

import pytest
import torch

from gptforge.config import ModelConfig, TrainConfig
from gptforge.model import GPT
from gptforge.train import build_optimizer, lr_at, param_groups, schedule_for

SCHEDULE = dict(learning_rate=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)


def test_warmup_is_linear_up_to_the_peak():
    lrs = [lr_at(s, **SCHEDULE) for s in range(10)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(1.0)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert steps == pytest.approx([0.1] * 9)


def test_cosine_decay_passes_the_midpoint_and_ends_at_min_lr():
    assert lr_at(10, **SCHEDULE) == pytest.approx(1.0)  # peak right after warmup
    assert lr_at(60, **SCHEDULE) == pytest.approx(0.55)  # halfway: min + (peak - min) / 2
    assert lr_at(35, **SCHEDULE) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **SCHEDULE) == pytest.approx(0.1)
    assert lr_at(10_000, **SCHEDULE) == pytest.approx(0.1)
    decay = [lr_at(s, **SCHEDULE) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, learning_rate=2.0, min_lr=0.0, warmup_steps=0, decay_steps=4) == pytest.approx(2.0)


def test_schedule_for_decays_at_max_steps_unless_told_otherwise():
    config = TrainConfig(max_steps=50, warmup_steps=0, learning_rate=1.0, min_lr=0.0)
    assert schedule_for(config)(50) == pytest.approx(0.0)
    assert schedule_for(config)(25) == pytest.approx(0.5)
    config.lr_decay_steps = 100
    assert schedule_for(config)(50) == pytest.approx(0.5)


def test_matrices_decay_and_biases_and_norms_do_not():
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.proj.weight"} <= decay_names
    assert {"ln_f.weight", "ln_f.bias", "blocks.0.ln_1.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(n.endswith("bias") or ".ln_" in n or n.startswith("ln_f") for n in no_decay_names)
    # Every parameter exactly once (the tied LM head is the token embedding).
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert not decay_names & no_decay_names


def test_build_optimizer_uses_the_config():
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8))
    opt = build_optimizer(model, TrainConfig(learning_rate=5e-4, beta1=0.8, beta2=0.9, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["lr"] == 5e-4
