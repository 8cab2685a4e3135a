"""Typed configuration: dataclass schemas, YAML presets and ``--section.key=value`` overrides.

Every field carries a docstring (the string literal under it), which ``gptforge train --help-config``
prints and which is the ``--help`` of the flag that ``gptforge generate``, ``chat`` and ``serve`` derive from
the field (:func:`flag` declares what a flag adds: aliases, allowed values); the field's default is the
flag's and the dataclass's ``validate()`` checks the value, for the CLI, the Python API and the server alike.
This module imports no torch so that the CLI can parse and validate a config in milliseconds.

A run config is a YAML file with up to three sections::

    model: {preset: tiny, dropout: 0.1}
    data:  {dir: data/shakespeare}
    train: {max_steps: 2000, learning_rate: 1.0e-3}

``model.preset`` fills the model section from :data:`MODEL_PRESETS`; keys given next to it win.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ConfigError

# --------------------------------------------------------------------------------------------------
# How a config field becomes a command-line flag (read by gptforge.cli): by default ``--field-name VALUE``,
# typed by the field's annotation, with the field's docstring as its help and the field's default.
FLAG_METADATA = "gptforge.flag"


@dataclass(frozen=True)
class FlagSpec:
    """What a field's command-line flag adds to the default ``--field-name VALUE``; see :func:`flag`."""

    aliases: tuple[str, ...] = ()
    metavar: Optional[str] = None
    choices: Optional[tuple[str, ...]] = None
    required: bool = False
    escapes: bool = False


def flag(*aliases: str, metavar: Optional[str] = None, choices: Optional[tuple[str, ...]] = None,
         required: bool = False, escapes: bool = False) -> dict[str, FlagSpec]:
    r"""Field metadata, declared once on the field: ``field(default=1, metadata=flag("--num-samples"))``.

    ``aliases`` are more spellings of the flag; ``metavar`` names its value in ``--help``; ``choices`` are
    the only values allowed (argparse and :func:`check_choices` both read them); ``required`` makes the
    command refuse to run without it; ``escapes`` turns ``\n`` and ``\t`` typed on a command line into
    a newline and a tab.
    """
    return {FLAG_METADATA: FlagSpec(tuple(aliases), metavar, tuple(choices) if choices else None, required, escapes)}


def flag_spec(f: dataclasses.Field) -> FlagSpec:
    """The :class:`FlagSpec` of a dataclass field (the plain default when it declares none)."""
    return f.metadata.get(FLAG_METADATA) or FlagSpec()


def check_choices(obj: Any) -> None:
    """Every field of ``obj`` whose flag declares ``choices`` holds one of them (or None where that is the default)."""
    for f in dataclasses.fields(obj):
        choices = flag_spec(f).choices
        value = getattr(obj, f.name)
        if choices is None or value in choices or (value is None and f.default is None):
            continue
        allowed = list(choices) + (["null"] if f.default is None else [])
        listed = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
        raise ConfigError(f"{f.name} must be {listed}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Model presets are plain data, so they live beside the schema they fill (gptforge.model re-exports them).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # A model that trains to readable Shakespeare on 2 CPU cores within the demo's budget.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, bias=True),
    # A laptop-GPU-sized model (about 20M parameters with a 8k vocabulary).
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1, bias=True),
    # The four GPT-2 sizes with their exact shapes.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257, bias=True),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257, bias=True),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257, bias=True),
}


@dataclass
class ModelConfig:
    """Shape and regularisation of a decoder-only Transformer."""

    vocab_size: Optional[int] = None
    """Number of token ids; None takes it from the tokenizer of the prepared data."""
    block_size: int = 256
    """Longest context the model accepts (number of learned positions)."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches while training."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 has them)."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of n_embd."""
    activation: str = "gelu_tanh"
    """MLP non-linearity: gelu_tanh (GPT-2's) or gelu (exact erf)."""
    tie_embeddings: bool = True
    """Share the LM head's weight with the token embedding."""

    def validate(self) -> "ModelConfig":
        _positive(self, "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"model.vocab_size must be at least 1, got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        _in_range(self, "dropout", 0.0, 1.0, right_open=True)
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"model.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"model.activation must be gelu_tanh or gelu, got {self.activation!r}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ConfigError(
                f"unknown model preset {name!r}{_did_you_mean(name, MODEL_PRESETS)}; "
                f"choose one of {', '.join(MODEL_PRESETS)}"
            )
        values = {**MODEL_PRESETS[name], **overrides}
        return _build(cls, values, "model").validate()


@dataclass
class DataConfig:
    """Where the prepared token files are."""

    dir: str = "data/shakespeare"
    """Folder written by `gptforge prepare` (train.bin, val.bin, meta.json, tokenizer files)."""


@dataclass
class OptimizerConfig:
    """AdamW and its warmup: the optimizer piece that pretraining and fine-tuning share."""

    learning_rate: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to learning_rate."""
    weight_decay: float = 0.1
    """AdamW weight decay on trainable parameters with 2+ dimensions (weight matrices, embeddings), not on biases or LayerNorm."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def validate(self) -> "OptimizerConfig":
        section = _section(self)
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"{section}.learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{section}.{name} must be >= 0, got {getattr(self, name)}")
        _in_range(self, "beta1", 0.0, 1.0, right_open=True)
        _in_range(self, "beta2", 0.0, 1.0, right_open=True)
        return self


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoopConfig:
    """The training loop's piece that pretraining and fine-tuning share: run folder, steps, batches,
    evaluation and checkpoint schedule, seed, device."""

    out_dir: str = "runs/demo"
    """Run folder: checkpoints/, metrics.jsonl, TensorBoard events and the loss curve (fine-tuning adds best/ and report.json)."""
    max_steps: int = 1000
    """Optimizer steps to run. With early stopping (fine-tuning) it is an upper bound."""
    batch_size: int = 16
    """Sequences (examples) per micro-batch on each process."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    eval_interval: int = 100
    """Evaluate on validation data every this many steps (and at the end)."""
    checkpoint_interval: int = 500
    """Write a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest resumable checkpoints to keep (fine-tuning keeps best/ apart)."""
    seed: int = 1337
    """Seed for initialisation (of the model, or of a task head), the data order and dropout."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    tensorboard: bool = True
    """Write TensorBoard event files to out_dir/tensorboard."""
    overwrite: bool = False
    """Start afresh even if out_dir already holds checkpoints (they are deleted first)."""
    max_nonfinite_steps: int = 10
    """A step whose loss or gradient norm is NaN or infinite is skipped (no weight update); after this many such steps in a row the run stops with an error, leaving the last finite checkpoint as `latest`."""
    allow_resume_changes: bool = False
    """With --resume, accept hyperparameters (learning rate, schedule, batch, seed, ...) that differ from the run's saved config; each change is logged as a warning. Without it such a resume is refused."""

    def validate(self) -> "LoopConfig":
        section = _section(self)
        _positive(self, "max_steps", "batch_size", "grad_accum_steps", "eval_interval", "checkpoint_interval",
                  "keep_checkpoints", "max_nonfinite_steps")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{section}.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{section}.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


@dataclass
class TrainConfig(OptimizerConfig, LoopConfig):
    """The pretraining loop: the shared loop and optimizer pieces, the cosine schedule to min_lr and
    pretraining's own options."""

    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    lr_decay_steps: Optional[int] = None
    """Step at which cosine decay reaches min_lr; None means max_steps as the run started. A resumed run keeps the length it started with (raise max_steps and the extra steps run at min_lr); changing it needs allow_resume_changes."""
    eval_batches: int = 20
    """Micro-batches averaged for each evaluation."""
    log_interval: int = 10
    """Append training metrics to metrics.jsonl every this many steps."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    max_minutes: Optional[float] = None
    """Stop (and checkpoint) after this many minutes of training even if max_steps is not reached."""

    def validate(self) -> "TrainConfig":
        LoopConfig.validate(self)
        OptimizerConfig.validate(self)
        _positive(self, "eval_batches", "log_interval")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.learning_rate):
            raise ConfigError(
                f"train.min_lr must be between 0 and train.learning_rate ({self.learning_rate}), got {self.min_lr}"
            )
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ConfigError(f"train.lr_decay_steps must be at least 1, got {self.lr_decay_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")
        return self


@dataclass
class GenerateConfig:
    """Decoding controls shared by the Python API, the CLI and the server."""

    max_new_tokens: Optional[int] = None
    """Most tokens to generate after the prompt. Unset: as many as the model's context leaves after the
    prompt, at most 256."""
    min_new_tokens: int = 0
    """End-of-text is suppressed until this many tokens have been generated."""
    temperature: Optional[float] = None
    """Softmax temperature; 0 means greedy decoding. Unset: 0.8, or 0 with beam search (num_beams > 1)."""
    top_k: Optional[int] = None
    """Sample only among the k most likely tokens."""
    top_p: Optional[float] = None
    """Sample from the smallest set of tokens whose probability adds up to top_p (nucleus sampling)."""
    min_p: Optional[float] = None
    """Drop tokens less likely than min_p times the most likely token's probability."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already in the prompt or output; 1 disables it."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token generated so far (OpenAI semantics), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (OpenAI semantics), in [-2, 2]."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size from the prompt or output; 0 disables it."""
    num_beams: int = 1
    """Beam width; more than 1 runs (deterministic) beam search instead of greedy decoding or sampling."""
    length_penalty: float = 1.0
    """Beam search: a finished beam's score is its log-probability divided by length ** length_penalty."""
    early_stopping: bool = False
    """Beam search: stop as soon as num_beams hypotheses are finished (else when none can improve)."""
    num_return_sequences: int = field(default=1, metadata=flag("--num-samples"))
    """Sequences returned per prompt (independent samples, or the best beams)."""
    stop: list[str] = field(default_factory=list, metadata=flag(metavar="TEXT", escapes=True))
    """Strings that end generation when produced; the stop string itself is not returned."""
    ignore_eos: bool = False
    """Keep generating after the end-of-text token (it is then returned like any other token)."""
    seed: Optional[int] = None
    """Seed that makes sampling reproducible (row r of a batch uses seed + r)."""
    logprobs: int = 0
    """Return the log-probability of each chosen token and this many top alternatives; 0 returns none."""
    logit_bias: Optional[dict[int, float]] = field(default=None, metadata=flag(metavar="JSON|ID:BIAS,..."))
    """Added to these token ids' logits before sampling (OpenAI's logit_bias): token id -> bias in [-100, 100];
    -100 effectively bans a token, 100 effectively forces it. A JSON object or ID:BIAS,ID:BIAS."""
    bad_words: list[str] = field(default_factory=list, metadata=flag("--ban", metavar="PHRASE", escapes=True))
    """Phrases the output never contains, however tokens would split them: matched on the text, case-sensitive,
    inside longer words too (banning 'cat' bans 'category')."""
    compile: bool = False
    """Compile the one-token decode step with torch.compile (used on CUDA only)."""

    def __post_init__(self) -> None:
        if self.temperature is None:  # beam search scores, it does not sample
            self.temperature = 0.0 if self.num_beams > 1 else 0.8
        self.logit_bias = parse_logit_bias(self.logit_bias)  # JSON's string keys, or ID:BIAS text → {id: bias}

    def validate(self) -> "GenerateConfig":
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_new_tokens is None and self.min_new_tokens < 0:
            raise ConfigError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        if self.seed is not None and not -2**63 <= self.seed <= 2**63 - 1:
            # A signed 64-bit integer, as OpenAI's API takes; row r uses seed + r, which torch's generators
            # accept up to 2**64 - 1.
            raise ConfigError(f"seed must be a 64-bit signed integer (-2**63 .. 2**63-1), got {self.seed}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not (0 <= self.min_p <= 1):
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ConfigError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {value}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0 (0 disables it), got {self.no_repeat_ngram_size}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be at least 1, got {self.num_beams}")
        if not math.isfinite(self.length_penalty):
            raise ConfigError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.num_return_sequences < 1:
            raise ConfigError(f"num_return_sequences must be at least 1, got {self.num_return_sequences}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"stop must be a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ConfigError("stop strings must not be empty")
        if self.logprobs < 0:
            raise ConfigError(f"logprobs must be >= 0 (0 returns none), got {self.logprobs}")
        _check_bad_words(self.bad_words)
        if self.num_beams > 1:
            self._validate_beam_search()
        return self

    def for_prompt(self, prompt_tokens: int, context_length: int) -> "GenerateConfig":
        """This config for a prompt of ``prompt_tokens`` tokens in a context of ``context_length``, with
        max_new_tokens set (see :func:`resolve_max_new_tokens`) and checked; ConfigError if it does not fit."""
        max_new = resolve_max_new_tokens(self.max_new_tokens, prompt_tokens, context_length)
        if self.max_new_tokens is None and self.min_new_tokens > max_new:
            raise ConfigError(f"min_new_tokens ({self.min_new_tokens}) is more than the {max_new} new tokens the "
                              f"model's context of {context_length} tokens leaves after the prompt "
                              f"({prompt_tokens} tokens); shorten the prompt or lower min_new_tokens")
        config = self if max_new == self.max_new_tokens else dataclasses.replace(self, max_new_tokens=max_new)
        return config.validate()

    def check_vocab(self, vocab_size: int) -> "GenerateConfig":
        """ConfigError when a logit_bias token id is outside a vocabulary of ``vocab_size`` ids."""
        outside = sorted(i for i in self.logit_bias or () if i >= vocab_size)
        if outside:
            raise ConfigError(f"logit_bias has token id {outside[0]}, outside the model's vocabulary of {vocab_size} "
                              f"ids (0 to {vocab_size - 1})")
        return self

    def _validate_beam_search(self) -> None:
        if self.temperature > 0:
            raise ConfigError(
                f"beam search is deterministic and does not sample; set temperature to 0 (got {self.temperature})"
            )
        if self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams})"
            )
        if self.stop:
            raise ConfigError("stop strings are not supported with beam search; use num_beams=1")


LOGIT_BIAS_LIMIT = 100.0
"""logit_bias values lie in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT] (OpenAI's range)."""


def parse_logit_bias(value: Any) -> Optional[dict[int, float]]:
    """A logit_bias as {token id: bias}, or None for none (an empty one too), from a dict (keys ints or strings
    of ints, as JSON has them) or a text: a JSON object or ``ID:BIAS,ID:BIAS``. ConfigError naming logit_bias
    for anything else: a key that is not a token id (>= 0), a bias that is not a finite number in [-100, 100]."""
    if value is None:
        return None
    if isinstance(value, str):  # pairs, so that a token id given twice is caught, not silently merged
        text = value.strip()
        if text.startswith("{"):
            try:
                pairs = json.loads(text, object_pairs_hook=lambda items: items)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"logit_bias is not valid JSON: {exc}") from None
            if not isinstance(pairs, list):
                raise ConfigError(f"logit_bias must be a JSON object, got {text!r}")
        else:
            parts = [part.strip() for part in text.split(",")]
            if not all(part.count(":") == 1 for part in parts):
                raise ConfigError(f"logit_bias must be a JSON object or ID:BIAS,ID:BIAS (e.g. 50256:-100), got {value!r}")
            pairs = [tuple(part.split(":")) for part in parts]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ConfigError(f"logit_bias must map token ids to biases, got {type(value).__name__}")
    bias: dict[int, float] = {}
    for key, number in pairs:
        if isinstance(key, str) and key.strip().isdigit():  # JSON's keys are strings; only decimal digits
            token = int(key.strip())
        elif isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            token = key
        else:
            raise ConfigError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        if isinstance(number, str):
            try:
                number = float(number)
            except ValueError:
                raise ConfigError(f"logit_bias[{token}] must be a number, got {number!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"logit_bias[{token}] must be a number, got {number!r}")
        if not (math.isfinite(number) and -LOGIT_BIAS_LIMIT <= number <= LOGIT_BIAS_LIMIT):
            raise ConfigError(f"logit_bias[{token}] must be a number in [-100, 100], got {number!r}")
        if token in bias:
            raise ConfigError(f"logit_bias gives token id {token} twice")
        bias[token] = float(number)
    return bias or None


def _check_bad_words(phrases: Any) -> None:
    if isinstance(phrases, str) or not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise ConfigError(f"bad_words must be a list of strings, got {phrases!r}")
    for i, phrase in enumerate(phrases):
        if phrase == "":
            raise ConfigError(f"bad_words[{i}] is empty; a banned phrase needs at least one character")
        try:
            phrase.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"bad_words[{i}] is not valid Unicode (it holds a lone surrogate)") from None


DEFAULT_MAX_NEW_TOKENS = 256
"""The most new tokens generated when max_new_tokens is unset (fewer when the context leaves less room)."""


def resolve_max_new_tokens(max_new_tokens: Optional[int], prompt_tokens: int, context_length: int) -> int:
    """The number of new tokens to generate after a prompt of ``prompt_tokens`` tokens in a model's context of
    ``context_length`` tokens: ``max_new_tokens`` itself when set (ConfigError if the prompt and it do not fit),
    else what the context leaves, at most :data:`DEFAULT_MAX_NEW_TOKENS` (ConfigError if it leaves none).

    The one place where an unset max_new_tokens gets its value: generation (the CLI, chat, the Python API)
    and the server call it."""
    if max_new_tokens is not None:
        if prompt_tokens + max_new_tokens > context_length:
            raise ConfigError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) is longer than the model's "
                f"context of {context_length} tokens; shorten the prompt or lower max_new_tokens"
            )
        return max_new_tokens
    room = context_length - prompt_tokens
    if room < 1:
        raise ConfigError(f"the prompt ({prompt_tokens} tokens) leaves no room to generate in the model's context "
                          f"of {context_length} tokens; shorten the prompt")
    return min(DEFAULT_MAX_NEW_TOKENS, room)


KV_CACHE_DTYPES = ("auto", "bfloat16")
"""Names of the KV cache dtypes (``--kv-cache-dtype``): auto = the weights' dtype."""

INFERENCE_DTYPES = DTYPES
"""Names of the weights' dtypes a model is loaded in for inference (``--dtype``): those training takes."""

CHAT_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "logit_bias", "bad_words")
"""The GenerateConfig fields that `gptforge chat` takes as flags."""

CHAT_DEFAULTS: dict[str, Any] = {}
"""Where `gptforge chat`'s defaults differ from GenerateConfig's (nowhere now: an unset max_new_tokens fits
each reply to the context, as it fits a sample)."""


@dataclass
class InferenceConfig:
    """The model to load for inference and how (`gptforge generate`, `chat` and `serve`)."""

    checkpoint: str = field(default="", metadata=flag(required=True))
    """Checkpoint folder, run folder, Hugging Face folder or hub id (e.g. gpt2)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    dtype: str = field(default="auto", metadata=flag(choices=INFERENCE_DTYPES))
    """Weights' dtype: auto (bfloat16 on GPUs that have it, else float32), float32, bfloat16 or float16."""
    quantize: Optional[str] = field(default=None, metadata=flag(choices=("int8",)))
    """int8: weight-only int8 quantization of the linear layers; null keeps them in `dtype`."""
    prepack: bool = True
    """On CPU in float32, reorder linear weights once for oneDNN's faster, batch-invariant kernel
    (gptforge.backends); off keeps plain float32 linear layers."""
    kv_cache_dtype: str = field(default="auto", metadata=flag(choices=KV_CACHE_DTYPES))
    """Key/value cache dtype: auto (the weights' dtype) or bfloat16 (half the memory and the bytes each
    decode step's attention reads; keys and values rounded to 8 bits of mantissa)."""

    def validate(self) -> "InferenceConfig":
        if not self.checkpoint:
            raise ConfigError("no model to load: set checkpoint (a folder, run folder, Hugging Face folder or hub id)")
        check_choices(self)
        return self


@dataclass
class ServeConfig(InferenceConfig):
    """The OpenAI-compatible HTTP server (`gptforge serve`): the model to serve (InferenceConfig's fields)
    and how to serve it."""

    host: str = "127.0.0.1"
    """Interface to listen on (127.0.0.1 keeps the server private to this machine)."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: Optional[str] = None
    """When set, every route but /health and the chat page needs the header `Authorization: Bearer <api_key>`
    (printable ASCII, no spaces; `gptforge serve` reads the GPTFORGE_API_KEY environment variable when the
    flag is not given)."""
    model_name: Optional[str] = None
    """The model id clients name in requests and /v1/models lists; None uses the checkpoint folder's name."""
    max_batch_size: int = 16
    """Most sequences decoded together in one step (the continuous batch)."""
    max_queue: int = 64
    """Most sequences waiting for a place in the batch; beyond it requests get 503 with Retry-After."""
    max_n: int = 8
    """Largest `n` (choices per prompt) a request may ask for."""
    request_timeout: float = field(default=600.0, metadata=flag(metavar="S"))
    """Seconds a request may take from arrival to its last token; past it the request is cancelled."""
    max_request_bytes: int = 1_000_000
    """Largest request body accepted; a bigger one gets 413."""
    cors_origins: list[str] = field(default_factory=list, metadata=flag("--cors-origin", metavar="ORIGIN"))
    """Browser origins allowed to call the API (CORS); empty allows none."""
    shutdown_grace: float = field(default=30.0, metadata=flag(metavar="S"))
    """On SIGTERM, seconds that in-flight requests get to finish while new ones get 503."""
    batch_invariant: Optional[bool] = None
    """Decode every row with the arithmetic of a request running alone, so batching never changes a
    result (greedy output equals `gptforge generate`); False uses plain batched matmuls (faster on GPUs,
    results may then differ in the last bits of a float). None: on for a model on the CPU (where it is
    free), off on a GPU."""
    monitor: Optional[str] = field(default=None, metadata=flag(metavar="DIR"))
    """A `gptforge monitor --out` folder to show live at /monitor (its data at GET /v1/monitor); None: no page."""

    def validate(self) -> "ServeConfig":
        super().validate()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        _positive(self, "max_batch_size", "max_queue", "max_n", "max_request_bytes")
        if self.monitor is not None and not self.monitor.strip():
            raise ConfigError("monitor must be a gptforge monitor --out folder, got an empty path")
        for name in ("request_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        if self.api_key is not None:
            if not self.api_key:
                raise ConfigError("api_key must not be empty (leave it unset to serve without a key)")
            # The key travels in the header `Authorization: Bearer <key>`: HTTP header values are bytes, and
            # clients send non-ASCII characters in other encodings or not at all, so such a key never matches.
            bad = next(((i, c) for i, c in enumerate(self.api_key) if not "!" <= c <= "~"), None)
            if bad is not None:
                raise ConfigError(f"api_key must be printable ASCII without spaces (it is sent in an HTTP header); "
                                  f"character {bad[0] + 1} is {bad[1]!r} (U+{ord(bad[1]):04X})")
        return self


DEFAULT_REFUSAL = "I don't know: the knowledge base has nothing on that."


@dataclass
class GroundingConfig:
    """Answers grounded in a knowledge base (`gptforge chat`, `serve` and `finetune --task lm` with
    `--knowledge`): which passages are retrieved for a turn and what happens when none is good enough."""

    knowledge: Optional[str] = field(default=None, metadata=flag(metavar="DIR"))
    """Knowledge base folder (`gptforge index --out DIR`); its passages are retrieved for each user turn and put
    into the prompt's context slot. None: no retrieval."""
    passages: int = field(default=3, metadata=flag("-k", metavar="K"))
    """Most passages retrieved for a turn (fewer go into the prompt when they do not all fit the context)."""
    min_score: float = field(default=0.0, metadata=flag(metavar="S"))
    """Passages scoring below this (BM25, higher is better) are left out of the prompt; so are passages
    scoring 0, which share no word with the query."""
    knowledge_only: bool = False
    """When no passage reaches min_score, reply with `refusal` instead of letting the model guess."""
    refusal: str = field(default=DEFAULT_REFUSAL, metadata=flag(metavar="TEXT", escapes=True))
    """The reply to a question the knowledge base has nothing on (with knowledge_only)."""
    query_turns: int = field(default=2, metadata=flag(metavar="N"))
    """How many of the last user messages make the retrieval query (the last one, and the one before it for
    follow-up questions such as "and how long does that take?")."""

    def validate(self) -> "GroundingConfig":
        _positive(self, "passages", "query_turns")
        if not math.isfinite(self.min_score):
            raise ConfigError(f"grounding.min_score must be a finite number, got {self.min_score}")
        if self.knowledge_only and not self.refusal.strip():
            raise ConfigError("grounding.refusal must not be empty with knowledge_only")
        if self.knowledge is None:
            # A flag that would silently do nothing is an error.
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name != "knowledge" and getattr(self, f.name) != f.default]
            if changed:
                names = ", ".join("--" + name.replace("_", "-") for name in changed)
                verb = "applies" if len(changed) == 1 else "apply"
                raise ConfigError(f"{names} only {verb} with --knowledge (a knowledge base folder)")
        elif not self.knowledge.strip():
            raise ConfigError("grounding.knowledge must be a knowledge base folder, got an empty path")
        return self


DEFAULT_MODERATION_REFUSAL = "Sorry, I can't help with that message."


@dataclass
class ModerationConfig:
    """Screening input and output with a classifier (`gptforge serve` and `chat` with `--moderation`): which
    labels block a text, from what probability, and how generated text is checked as it streams."""

    moderation: Optional[str] = field(default=None, metadata=flag(metavar="CLF_CHECKPOINT"))
    """Classifier checkpoint (gptforge finetune --task classify) that screens each request's input and the
    generated output; None: no screening."""
    block: list[str] = field(default_factory=list, metadata=flag(metavar="LABEL[,LABEL]"))
    """The classifier's labels that block a text (comma-separated, or the flag repeated)."""
    threshold: float = field(default=0.5, metadata=flag(metavar="P"))
    """A text is blocked when the probability of one of the `block` labels is at least this (in [0, 1])."""
    moderation_refusal: str = field(default=DEFAULT_MODERATION_REFUSAL, metadata=flag(metavar="TEXT", escapes=True))
    """The reply to a blocked input (the model does not run)."""
    moderation_window: int = field(default=256, metadata=flag(metavar="CHARS"))
    """Characters of generated text each check reads: the last `moderation_window` characters before the point
    it clears; the whole reply is checked once more at its end."""
    moderation_stride: int = field(default=48, metadata=flag(metavar="CHARS"))
    """Characters of new generated text held back before the next check runs (at most half the window; smaller
    streams more smoothly and runs the classifier more often)."""

    def validate(self) -> "ModerationConfig":
        self.block = [label.strip() for item in self.block for label in str(item).split(",") if label.strip()]
        if self.moderation is None:
            # A flag that would silently do nothing is an error.
            changed = [f.name for f in dataclasses.fields(self) if f.name != "moderation"
                       and getattr(self, f.name) != (f.default if f.default is not dataclasses.MISSING else [])]
            if changed:
                names = ", ".join("--" + name.replace("_", "-") for name in changed)
                verb = "applies" if len(changed) == 1 else "apply"
                raise ConfigError(f"{names} only {verb} with --moderation (a classifier checkpoint)")
            return self
        if not self.moderation.strip():
            raise ConfigError("moderation must be a classifier checkpoint folder, got an empty path")
        if not self.block:
            raise ConfigError("--moderation needs --block LABEL[,LABEL]: the classifier's labels that block a text")
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"moderation.threshold must be a probability in [0, 1], got {self.threshold}")
        if not self.moderation_refusal.strip():
            raise ConfigError("moderation.moderation_refusal must not be empty")
        _positive(self, "moderation_window", "moderation_stride")
        if self.moderation_stride > self.moderation_window // 2:
            raise ConfigError(f"moderation.moderation_stride ({self.moderation_stride}) must be at most half of "
                              f"moderation_window ({self.moderation_window}), so that every phrase up to half a "
                              "window long is read whole by some check")
        return self


@dataclass
class RunConfig:
    """A pretraining run: the model, the data and the loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: Optional[str] = None
    """The model preset the model section started from (kept for the record)."""

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Loading, overriding and type-checking.

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
_PACKAGED = Path(__file__).parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or the name of a preset shipped with the package (``demo``, ``gpt2-124m``)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = _PACKAGED / (path.name if path.suffix else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    known = sorted(p.stem for p in _PACKAGED.glob("*.yaml"))
    raise ConfigError(f"config file {str(name)!r} not found (packaged presets: {', '.join(known)})")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``section.key=value`` overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(resolve_config_path(path))
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides or []:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section {section!r} in {item!r}{_did_you_mean(section, SECTIONS)}; "
                f"sections are {', '.join(SECTIONS)}"
            )
        raw.setdefault(section, {})[name] = _parse_scalar(value)
    return build_run_config(raw)


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from a plain dict (as read from YAML or config.json)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping of sections, got {type(raw).__name__}")
    unknown = set(raw) - set(SECTIONS) - {"preset"}
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"unknown config section {name!r}{_did_you_mean(name, SECTIONS)}; sections are {', '.join(SECTIONS)}"
        )
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {type(values).__name__}")
        values = dict(values)
        if name == "model":
            preset = values.pop("preset", None) or raw.get("preset")
            if preset is not None:
                if preset not in MODEL_PRESETS:
                    raise ConfigError(
                        f"unknown model preset {preset!r}{_did_you_mean(str(preset), MODEL_PRESETS)}; "
                        f"choose one of {', '.join(MODEL_PRESETS)}"
                    )
                values = {**MODEL_PRESETS[preset], **values}
            sections["preset"] = preset
        sections[name] = _build(cls, values, name)
    return RunConfig(**sections).validate()


def parse_override(item: str) -> tuple[str, str]:
    """``--train.max_steps=100`` or ``train.max_steps=100`` → ("train.max_steps", "100")."""
    text = item[2:] if item.startswith("--") else item
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like --section.key=value (e.g. --train.max_steps=100)")
    return key.strip(), value.strip()


def config_from_dict(cls: type, values: dict[str, Any], section: str):
    """Build one section's dataclass from a dict, checking names and types."""
    return _build(cls, values, section)


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of a config dataclass (and of the dataclasses it extends)."""
    import inspect

    docs: dict[str, str] = {}
    # Base classes first: a field declared in a shared piece (LoopConfig, OptimizerConfig) keeps its
    # docstring when a section redeclares it only to change its default.
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from YAML, JSON or a command line) as the type ``hint`` names, or a ConfigError naming ``where``."""
    return _coerce(value, hint, where)


def describe_config() -> str:
    """Human-readable listing of every section, key, type, default and docstring."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]" + (" (model.preset: " + ", ".join(MODEL_PRESETS) + ")" if name == "model" else ""))
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {name}.{f.name}: {_type_name(hints[f.name])} = {default!r}")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _parse_scalar(text: str) -> Any:
    """Interpret an override's value the way YAML would (``1e-3`` → float, ``true`` → bool, ``null`` → None)."""
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _build(cls: type, values: dict[str, Any], section: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {section}.{key}{_did_you_mean(key, names, section + '.')}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {json.dumps(value)}")
        return str(value)
    return value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _did_you_mean(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _section(obj: Any) -> str:
    """The section an option is reported under: ``train`` for TrainConfig, ``finetune`` for FinetuneConfig."""
    return type(obj).__name__.replace("Config", "").lower()


def _positive(obj: Any, *names: str) -> None:
    section = _section(obj)
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{section}.{name} must be at least 1, got {value}")


def _in_range(obj: Any, name: str, lo: float, hi: float, right_open: bool = False) -> None:
    section = _section(obj)
    value = getattr(obj, name)
    ok = lo <= value < hi if right_open else lo <= value <= hi
    if not ok:
        bracket = ")" if right_open else "]"
        raise ConfigError(f"{section}.{name} must be in [{lo}, {hi}{bracket}, got {value}")


# --------------------------------------------------------------------------------------------------
# Fine-tuning: one flat section (``--key=value`` overrides), plus an optional ``tune:`` search space.

FINETUNE_TASKS = ("lm", "classify", "tokens")
FINETUNE_STRATEGIES = ("full", "top-k", "head", "lora", "adapter", "prefix")
PEFT_STRATEGIES = ("lora", "adapter", "prefix")
# The validation metric each task stops early on and keeps its best checkpoint by, unless told otherwise.
DEFAULT_FINETUNE_METRIC = {"lm": "val_loss", "classify": "accuracy", "tokens": "entity_f1"}
FINETUNE_METRICS = {
    "lm": ("val_loss", "perplexity", "bits_per_byte"),
    "classify": ("val_loss", "accuracy", "macro_f1", "weighted_f1"),
    "tokens": ("val_loss", "entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
}
_LOWER_IS_BETTER = ("val_loss", "perplexity", "bits_per_byte")


@dataclass
class FinetuneConfig(OptimizerConfig, LoopConfig):
    """Fine-tuning a pretrained GPT for a task: language modelling, classification or token tagging.

    The loop and optimizer options are the shared pieces' (one flat section: ``--learning_rate=1e-3``);
    only their defaults differ from pretraining's, restated here."""

    task: str = "classify"
    """lm (instruction / chat data), classify (one label per text) or tokens (one tag per word)."""
    checkpoint: str = ""
    """The model to start from: a gptforge checkpoint or run folder, a Hugging Face GPT-2 folder or hub id."""
    train_file: str = ""
    """Training examples (JSON lines or CSV; see the README's Fine-tuning section for each task's fields)."""
    val_file: Optional[str] = None
    """Validation examples in the same format; None holds out val_fraction of train_file."""
    val_fraction: float = 0.1
    """Share of train_file held out for validation when val_file is not given."""
    strategy: str = "full"
    """Which weights train: full, top-k, head, lora, adapter or prefix."""
    top_k_layers: int = 2
    """top-k: how many of the last Transformer blocks train (with the final LayerNorm and the head)."""
    lora_rank: int = 8
    """lora: rank of the low-rank update."""
    lora_alpha: float = 16.0
    """lora: the update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """lora: dropout on the input of the low-rank path."""
    lora_targets: Optional[list[str]] = None
    """lora: names of the Linear layers to adapt (None: gptforge.peft's default, the attention projections)."""
    adapter_bottleneck: int = 16
    """adapter: hidden width of each bottleneck adapter."""
    prefix_length: int = 8
    """prefix: number of trained virtual tokens."""
    merge: bool = False
    """lora: also write out_dir/merged, a full checkpoint with the update merged into the weights."""
    train_on_prompt: bool = False
    """lm: also train on the prompt tokens (by default only the response is learned)."""
    chat_template: Optional[str] = None
    """lm: template that turns an example into text (None: gptforge's default chat template)."""
    max_length: int = 256
    """Longest example in tokens (capped at the model's block_size); longer ones are truncated."""
    epochs: Optional[float] = None
    """When set, train for this many passes over the training data instead of max_steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at learning_rate times this."""
    dropout: float = 0.1
    """Dropout set on every dropout layer of the model (and the task head) while fine-tuning."""
    metric: str = "auto"
    """Validation metric for early stopping and the best checkpoint (auto: val_loss, accuracy or entity_f1)."""
    mode: str = "auto"
    """min or max: whether a lower or a higher metric is better (auto: min for losses, max for scores)."""
    patience: Optional[int] = None
    """Stop after this many evaluations without improvement; None never stops early."""
    min_delta: float = 0.0
    """Smallest change of the metric that counts as an improvement."""
    evaluate_before: bool = True
    """Evaluate the starting model on the validation data too, for the before/after report."""
    # Fine-tuning's defaults for the shared options (documented in LoopConfig and OptimizerConfig).
    out_dir: str = "runs/finetune"
    max_steps: int = 200
    learning_rate: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    beta2: float = 0.999
    eval_interval: int = 50
    checkpoint_interval: int = 100
    keep_checkpoints: int = 1
    tensorboard: bool = False

    def validate(self) -> "FinetuneConfig":
        if self.task not in FINETUNE_TASKS:
            raise ConfigError(f"task must be one of {', '.join(FINETUNE_TASKS)}, got {self.task!r}")
        if self.strategy not in FINETUNE_STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(FINETUNE_STRATEGIES)}, got {self.strategy!r}")
        if self.strategy == "head" and self.task == "lm":
            raise ConfigError("strategy 'head' trains only a task head, and task 'lm' has none; "
                              "use full, top-k, lora, adapter or prefix")
        if self.merge and self.strategy != "lora":
            raise ConfigError(f"merge applies to strategy 'lora' only, not {self.strategy!r}")
        if not self.checkpoint:
            raise ConfigError("no model to fine-tune: set checkpoint (a checkpoint folder or Hugging Face model)")
        if not self.train_file:
            raise ConfigError("no training data: set train_file")
        LoopConfig.validate(self)
        OptimizerConfig.validate(self)
        _positive(self, "top_k_layers", "lora_rank", "adapter_bottleneck", "prefix_length", "max_length")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"finetune.epochs must be > 0, got {self.epochs}")
        if self.val_file is None:
            _in_range(self, "val_fraction", 0.0, 1.0, right_open=True)
            if self.val_fraction == 0:
                raise ConfigError("finetune.val_fraction must be > 0 when no val_file is given")
        _in_range(self, "min_lr_ratio", 0.0, 1.0)
        for name in ("min_delta", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"finetune.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"finetune.lora_alpha must be > 0, got {self.lora_alpha}")
        _in_range(self, "dropout", 0.0, 1.0, right_open=True)
        if self.lora_targets is not None and (isinstance(self.lora_targets, str) or not self.lora_targets):
            raise ConfigError(f"finetune.lora_targets must be a non-empty list of layer names, got {self.lora_targets!r}")
        allowed = FINETUNE_METRICS[self.task]
        if self.metric != "auto" and self.metric not in allowed:
            raise ConfigError(f"finetune.metric {self.metric!r} does not apply to task {self.task!r}; "
                              f"choose auto or one of {', '.join(allowed)}")
        if self.mode not in ("auto", "min", "max"):
            raise ConfigError(f"finetune.mode must be auto, min or max, got {self.mode!r}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"finetune.patience must be at least 1 (or null to never stop early), got {self.patience}")
        return self

    @property
    def stop_metric(self) -> str:
        """The validation metric that early stopping and the best checkpoint follow."""
        return DEFAULT_FINETUNE_METRIC[self.task] if self.metric == "auto" else self.metric

    @property
    def stop_mode(self) -> str:
        """min or max for :attr:`stop_metric`."""
        if self.mode != "auto":
            return self.mode
        return "min" if self.stop_metric in _LOWER_IS_BETTER else "max"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TuneConfig:
    """A hyperparameter search over fine-tuning runs (the ``tune:`` section of a fine-tuning config)."""

    learning_rate: Optional[list[float]] = field(default_factory=lambda: [1e-4, 1e-2])
    """[low, high]: learning rate drawn log-uniformly; null keeps the config's value."""
    weight_decay: Optional[list[float]] = field(default_factory=lambda: [0.0, 0.1])
    """[low, high]: weight decay drawn uniformly; null keeps the config's value."""
    warmup_steps: Optional[list[int]] = None
    """[low, high]: warmup steps drawn as an integer; null keeps the config's value."""
    lora_rank: Optional[list[int]] = None
    """Choices of LoRA rank (strategy lora only); null keeps the config's value."""
    dropout: Optional[list[float]] = None
    """[low, high]: dropout drawn uniformly; null keeps the config's value."""
    trials: int = 20
    """Number of trials (gptforge tune --trials overrides it)."""
    pruner_warmup_evals: int = 1
    """Evaluations a trial always gets before the median pruner may stop it."""
    startup_trials: int = 2
    """Trials that run to the end before any is pruned."""

    def validate(self) -> "TuneConfig":
        """The shape of the search space; whether fine-tuning accepts its values is :meth:`validate_against`'s."""
        for name in _TUNE_RANGES:
            bounds = getattr(self, name)
            if bounds is None:
                continue
            if not isinstance(bounds, list) or len(bounds) != 2 or not bounds[0] <= bounds[1]:
                raise ConfigError(f"tune.{name} must be [low, high] with low <= high, got {bounds!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, list) or not self.lora_rank):
            raise ConfigError(f"tune.lora_rank must be a non-empty list of ranks, got {self.lora_rank!r}")
        _positive(self, "trials")
        if self.pruner_warmup_evals < 0 or self.startup_trials < 0:
            raise ConfigError("tune.pruner_warmup_evals and tune.startup_trials must be >= 0")
        return self

    def validate_against(self, config: FinetuneConfig) -> "TuneConfig":
        """Every value the search may draw is one that ``config`` accepts. Each value is checked by
        :meth:`FinetuneConfig.validate`, where the option is defined (ranges are intervals, so their ends
        suffice); log-uniform learning rates need a low end above 0, which that check also asks."""
        self.validate()
        base = config.to_dict()
        for name in (*_TUNE_RANGES, "lora_rank"):
            for value in getattr(self, name) or []:
                try:
                    _build(FinetuneConfig, {**base, name: value}, "finetune").validate()
                except ConfigError as exc:
                    raise ConfigError(f"tune.{name} holds {value!r}, which fine-tuning refuses: {exc}") from None
        return self


# The options a search draws from a [low, high] range.
_TUNE_RANGES = ("learning_rate", "weight_decay", "warmup_steps", "dropout")


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None,
                         values: dict[str, Any] | None = None) -> FinetuneConfig:
    """A fine-tuning config: YAML keys (a ``tune:`` section is ignored here), then ``values`` (from CLI
    flags), then ``key=value`` overrides; type-checked and validated."""
    raw = _read_yaml(resolve_config_path(path)) if path is not None else {}
    raw.pop("tune", None)
    raw.update({k: v for k, v in (values or {}).items() if v is not None})
    for item in overrides or []:
        key, value = parse_override(item)
        raw[key.removeprefix("finetune.").replace("-", "_")] = _parse_scalar(value)
    return _build(FinetuneConfig, raw, "finetune").validate()


def load_tune_config(path: str | Path) -> TuneConfig:
    """The ``tune:`` section of a fine-tuning YAML file (defaults when it has none)."""
    raw = _read_yaml(resolve_config_path(path)).get("tune") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the tune section of {path} must be a mapping, got {type(raw).__name__}")
    return _build(TuneConfig, raw, "tune").validate()


# --------------------------------------------------------------------------------------------------
# The knowledge base (`gptforge index`): how documents become passages and BM25 terms.

KNOWLEDGE_STOPWORDS = ("en", "none")
KNOWLEDGE_STEMMERS = ("plural", "none")


@dataclass
class IndexConfig:
    """How `gptforge index` cuts documents into passages and indexes them; recorded in the knowledge base,
    whose own settings `--add` keeps."""

    max_passage_tokens: int = 96
    """Most tokens in a passage's text (counted by --checkpoint's tokenizer, else estimated from the words):
    small enough that a few passages and the conversation fit a small model's context."""
    overlap_tokens: int = 16
    """Tokens of a passage's last words repeated at the start of the next passage of the same section (at
    most half of max_passage_tokens; 0 for none)."""
    stopwords: str = field(default="en", metadata=flag(choices=KNOWLEDGE_STOPWORDS))
    """en: leave common English words (bm25s's list) out of the index and the queries; none: keep every word."""
    stemmer: str = field(default="plural", metadata=flag(choices=KNOWLEDGE_STEMMERS))
    """plural: singular and plural forms match (refunds → refund, policies → policy); none: exact words only."""

    def validate(self) -> "IndexConfig":
        check_choices(self)
        if self.max_passage_tokens < 8:
            raise ConfigError(f"index.max_passage_tokens must be at least 8, got {self.max_passage_tokens}")
        if not 0 <= self.overlap_tokens <= self.max_passage_tokens // 2:
            raise ConfigError(f"index.overlap_tokens must be between 0 and half of max_passage_tokens "
                              f"({self.max_passage_tokens // 2}), got {self.overlap_tokens}")
        return self


SCORE_NORMALIZATIONS = ("none", "token", "byte")
"""What a candidate's score is: its total log-probability, the mean per token, or per UTF-8 byte."""


@dataclass
class ScoreConfig:
    """How `gptforge score` (gptforge.generate.score) scores candidate texts after a context."""

    normalize: str = field(default="none", metadata=flag(choices=SCORE_NORMALIZATIONS))
    """The value ranked: none (total log-probability), token (mean per token) or byte (per UTF-8 byte)."""
    top_logprobs: int = field(default=0, metadata=flag("--top", metavar="N"))
    """Most likely alternatives to report at each candidate token (0: none)."""
    batch_size: Optional[int] = None
    """Most candidates in one forward; null: as many as fit 1 GiB of KV cache and logits."""

    def validate(self) -> "ScoreConfig":
        check_choices(self)
        if self.top_logprobs < 0:
            raise ConfigError(f"score.top_logprobs must be at least 0, got {self.top_logprobs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"score.batch_size must be at least 1, got {self.batch_size}")
        return self


# --------------------------------------------------------------------------------------------------
# The sentiment monitor (`gptforge monitor`, gptforge.monitor)
MONITOR_DEFAULT_WINDOW_ITEMS = 50


@dataclass
class MonitorConfig:
    """`gptforge monitor`: classify a stream of JSON lines, keep rolling windows per key, raise alerts when a
    label's share crosses a threshold, draw the trend; resumable from its output folder."""

    checkpoint: str = field(default="", metadata=flag(required=True, metavar="CLF"))
    """Classifier checkpoint or fine-tuning run folder (gptforge finetune --task classify)."""
    input: str = field(default="", metadata=flag(required=True, metavar="FILE|DIR|-"))
    """JSON lines to read: a file, every *.jsonl file of a folder (in name order), or - for stdin."""
    out: str = field(default="", metadata=flag(required=True, metavar="DIR"))
    """Output folder: results.jsonl, alerts.jsonl, trend.png and state.json (a rerun resumes from it)."""
    follow: bool = False
    """Keep reading as the files grow and new *.jsonl files appear (like tail -f) until SIGINT / SIGTERM."""
    window_items: Optional[int] = field(default=None, metadata=flag(metavar="N"))
    """Rolling window per key: the last N items (default 50 when --window-minutes is not given either)."""
    window_minutes: Optional[float] = field(default=None, metadata=flag(metavar="T"))
    """Rolling window per key: the items of the last T minutes, by item time (else arrival time); with
    --window-items too, the last N items within T minutes."""
    alerts: list[str] = field(default_factory=list, metadata=flag("--alert", metavar="LABEL:SHARE"))
    """Alert when LABEL's share of a key's window reaches SHARE (in (0, 1]), e.g. negative:0.6; once per
    crossing, re-armed when the share falls back below SHARE minus --hysteresis."""
    min_items: int = field(default=5, metadata=flag(metavar="N"))
    """Items a key's window must hold before it can raise an alert."""
    hysteresis: float = field(default=0.0, metadata=flag(metavar="H"))
    """An alert re-arms only once the share falls below SHARE - H (0: as soon as it is below SHARE)."""
    alert_url: Optional[str] = field(default=None, metadata=flag(metavar="URL"))
    """POST each alert as JSON to this http(s) URL; a failed POST is logged and retried, never fatal."""
    alert_retries: int = field(default=3, metadata=flag(metavar="N"))
    """Tries of each alert POST before it is given up (with a warning)."""
    batch_size: int = field(default=16, metadata=flag(metavar="B"))
    """Texts classified together."""
    plot_every: int = field(default=100, metadata=flag(metavar="K"))
    """Redraw trend.png after every K items (and at the end); 0 draws it at the end only."""
    poll_interval: float = field(default=0.5, metadata=flag(metavar="S"))
    """With --follow, seconds to wait before looking for new lines again."""
    skip_bad: bool = False
    """Skip (and count) malformed lines with a warning naming file:line, instead of stopping at the first one."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""

    def validate(self) -> "MonitorConfig":
        for name in ("checkpoint", "input", "out"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"monitor.{name} must be given (--{name})")
        if self.window_items is not None and self.window_items < 1:
            raise ConfigError(f"monitor.window_items must be at least 1, got {self.window_items}")
        if self.window_minutes is not None and not (math.isfinite(self.window_minutes) and self.window_minutes > 0):
            raise ConfigError(f"monitor.window_minutes must be a positive number of minutes, got {self.window_minutes}")
        if self.window_items is None and self.window_minutes is None:
            self.window_items = MONITOR_DEFAULT_WINDOW_ITEMS
        self.alert_rules()  # a malformed --alert fails here, before the model loads
        _positive(self, "min_items", "batch_size", "alert_retries")
        if self.plot_every < 0:
            raise ConfigError(f"monitor.plot_every must be 0 or more, got {self.plot_every}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ConfigError(f"monitor.hysteresis must be in [0, 1), got {self.hysteresis}")
        if not (math.isfinite(self.poll_interval) and self.poll_interval > 0):
            raise ConfigError(f"monitor.poll_interval must be a positive number of seconds, got {self.poll_interval}")
        if self.alert_url is not None and not self.alert_url.startswith(("http://", "https://")):
            raise ConfigError(f"--alert-url must be an http:// or https:// URL, got {self.alert_url!r}")
        return self

    def alert_rules(self) -> list[tuple[str, float]]:
        """(label, share) of each --alert LABEL:SHARE, in the order given; ConfigError for a malformed one."""
        rules: list[tuple[str, float]] = []
        for rule in self.alerts:
            label, sep, share = str(rule).rpartition(":")
            try:
                value = float(share)
            except ValueError:
                value = float("nan")
            if not sep or not label.strip() or not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise ConfigError(f"--alert must look like LABEL:SHARE with SHARE in (0, 1] (e.g. negative:0.6), "
                                  f"got {rule!r}")
            if any(label == have for have, _ in rules):
                raise ConfigError(f"--alert gives label {label!r} twice; give one threshold per label")
            rules.append((label, value))
        return rules


EXPLAIN_METHODS = ("ig", "occlusion")
"""Token attribution methods of `gptforge explain` and /v1/classify's ``explain_method`` (captum's)."""


@dataclass
class ExplainConfig:
    """What `gptforge explain` computes and shows (gptforge.explain)."""

    top_k: int = 5
    """Alternatives shown per token: the k most likely tokens at that position, with their probabilities."""
    layer: Optional[int] = None
    """Attention heatmaps of this layer only (0-based); unset: every layer."""
    head: Optional[int] = None
    """Attention heatmaps of this head only (0-based); unset: every head and their mean."""
    max_new_tokens: int = 16
    """With --prompt: tokens generated greedily after it (through the decode engine) and explained with it."""
    ig_steps: int = 64
    """Integrated gradients: steps of the path integral from the baseline (more: a smaller completeness gap)."""

    def validate(self) -> "ExplainConfig":
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 100:
            raise ConfigError(f"top_k must be an integer from 1 to 100, got {self.top_k!r}")
        for name in ("layer", "head"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a layer/head number of 0 or more, got {value!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be 0 or more, got {self.max_new_tokens!r}")
        if not isinstance(self.ig_steps, int) or not 2 <= self.ig_steps <= 1024:
            raise ConfigError(f"ig_steps must be an integer from 2 to 1024, got {self.ig_steps!r}")
        return self
