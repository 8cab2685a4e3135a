"""What `gptforge explain` computes: the report's data for a language model or a classifier, as plain JSON-able
dicts (the HTML, the PNGs and ``--json`` are all drawn from them, :mod:`.report`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import EXPLAIN_METHODS, ExplainConfig, GenerateConfig
from ..errors import ConfigError, DataError
from ..evaluate.predict import load_for_task
from ..generate.engine import encode_prompt, generate_ids
from ..heads import TaskModel
from ..model import GPT
from ..model.recording import prefix_length
from ..tokenizer import Tokenizer, check_text
from .attention import attention_maps, attention_rollout
from .attribution import attribute, encode_for_classifier
from .tokens import sure_and_unsure, token_probabilities, token_text

log = logging.getLogger(__name__)


def _gpt(model: nn.Module) -> GPT:
    return model if isinstance(model, GPT) else model.base


def _check_choices(model: nn.Module, config: ExplainConfig) -> None:
    c = _gpt(model).config
    if config.layer is not None and config.layer >= c.n_layer:
        raise ConfigError(f"layer must be from 0 to {c.n_layer - 1} (the model has {c.n_layer} layers), "
                          f"got {config.layer}")
    if config.head is not None and config.head >= c.n_head:
        raise ConfigError(f"head must be from 0 to {c.n_head - 1} (the model has {c.n_head} heads), got {config.head}")


def _attention_section(model: nn.Module, ids: list[int], tokenizer: Tokenizer, config: ExplainConfig
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
    out, maps = attention_maps(model, ids)  # (L, H, T, T)
    L, H = maps.shape[:2]
    layers = [config.layer] if config.layer is not None else list(range(L))
    heads = [config.head] if config.head is not None else list(range(H))
    section = {
        "tokens": [token_text(tokenizer, t) for t in ids],
        "layers": layers, "heads": heads,
        "maps": {str(layer): {str(h): maps[layer, h].tolist() for h in heads} for layer in layers},
        "head_mean": {str(layer): maps[layer].mean(0).tolist() for layer in layers},
        "rollout": attention_rollout(maps).tolist(),
        "prefix_keys": prefix_length(model),
    }
    return out, section


def explain_language_model(model: GPT, tokenizer: Tokenizer, *, prompt: Optional[str] = None,
                           text: Optional[str] = None, config: ExplainConfig = ExplainConfig()) -> dict[str, Any]:
    """The report's data for a language model: with ``prompt``, it is continued greedily by
    ``config.max_new_tokens`` tokens (the decode engine) and prompt + continuation are explained; with
    ``text``, the text as given. Per token its probability, rank, entropy and top alternatives; the most and
    least sure tokens; every chosen layer's and head's attention and the rollout."""
    config.validate()
    _check_choices(model, config)
    given = prompt if prompt is not None else text
    check_text(given, "the prompt" if prompt is not None else "the text")
    if prompt is not None:
        ids = encode_prompt(tokenizer, prompt)
        n_prompt = len(ids)
        if config.max_new_tokens:
            gen = GenerateConfig(max_new_tokens=config.max_new_tokens, temperature=0.0)
            completion = generate_ids(model, [ids], gen, tokenizer.eos_id, tokenizer=tokenizer)[0][0]
            ids = ids + list(completion.token_ids)
    else:
        ids = tokenizer.encode(text)
        n_prompt = len(ids)
        if len(ids) < 2:
            raise DataError("the text needs at least two tokens: the first has no prediction to explain")
    block = model.config.block_size
    if len(ids) > block:
        raise DataError(f"the text is {len(ids)} tokens but the model's context is {block} tokens; shorten it")
    logits, attention = _attention_section(model, ids, tokenizer, config)
    tokens = token_probabilities(logits[0], ids, tokenizer, top_k=config.top_k, n_prompt=n_prompt)
    return {"kind": "lm", "prompt": prompt, "text": tokenizer.decode(ids), "n_prompt_tokens": n_prompt,
            "top_k": config.top_k, "tokens": tokens, **sure_and_unsure(tokens), "attention": attention}


def explain_classifier(model: TaskModel, tokenizer: Tokenizer, text: str, labels: list[str], *,
                       config: ExplainConfig = ExplainConfig()) -> dict[str, Any]:
    """The report's data for a classifier and a text: the predicted probabilities, each token's attribution
    by integrated gradients and by occlusion (captum), and the attention over the text."""
    config.validate()
    _check_choices(model, config)
    check_text(text, "the text")
    ids = encode_for_classifier(model, tokenizer, text)
    attributions = {method: attribute(model, tokenizer, text, labels, method=method, steps=config.ig_steps)
                    for method in EXPLAIN_METHODS}
    first = attributions["ig"]
    _, attention = _attention_section(model, ids, tokenizer, config)
    return {"kind": "classify", "text": text, "label": first["label"], "probabilities": first["probabilities"],
            "baseline_prob": first["baseline_prob"], "attributions": attributions, "attention": attention}


def explain_checkpoint(checkpoint: str | Path, *, prompt: Optional[str] = None, text: Optional[str] = None,
                       config: ExplainConfig = ExplainConfig(), device: str = "auto") -> dict[str, Any]:
    """Load ``checkpoint`` (a language model or a classifier) and explain ``prompt`` or ``text`` with it."""
    if (prompt is None) == (text is None):
        raise ConfigError("give either a prompt (to continue and explain) or a text (to explain as given)")
    config.validate()
    ckpt = load_for_task(checkpoint, None, device)
    task = ckpt.config["task"]["type"]
    if task == "classify":
        if prompt is not None:
            raise ConfigError("a classifier explains a text as given: use --text, not --prompt")
        data = explain_classifier(ckpt.model, ckpt.tokenizer, text, ckpt.config["task"]["labels"], config=config)
    elif task == "lm":
        data = explain_language_model(ckpt.model, ckpt.tokenizer, prompt=prompt, text=text, config=config)
    else:
        raise ConfigError(f"explain supports language models and classifiers; checkpoint {ckpt.path} is a "
                          f"{task!r} model")
    data["checkpoint"] = str(ckpt.path)
    return data


__all__ = ["explain_checkpoint", "explain_classifier", "explain_language_model"]
