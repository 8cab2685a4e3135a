"""Hugging Face GPT-2 ↔ gptforge: weight maps, model folders and hub ids.

:func:`load_hf_folder` reads a local Hugging Face GPT-2 folder (``config.json`` with ``model_type: gpt2``
plus ``model.safetensors``, a sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``);
:func:`download_from_hub` finds a hub id such as ``gpt2`` or ``org/name`` in the Hugging Face cache or
downloads it; :func:`export_hf` writes a loaded model back out as such a folder. Loading "any model"
(a gptforge checkpoint, an HF folder or a hub id) is :func:`gptforge.checkpoint.load_pretrained`.

GPT-2 in ``transformers`` keeps its projections in ``Conv1D`` modules, whose weight is the transpose of an
``nn.Linear`` weight: ``(in_features, out_features)``. Those four weights per block are transposed on the
way in and back on the way out; every other tensor keeps its layout and only changes its name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DataError
from .fsutil import check_output_dir, publish_folder
from .model import GPT
from .tokenizer import EOS_TOKEN, BPETokenizer, load_tokenizer
from .weights import Checkpoint, build_model, check_finite, first_nonfinite, load_state_dict, unwrap_model

log = logging.getLogger(__name__)

HF_CONFIG_FILE = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"

# What a hub download fetches: config, safetensors weights and the tokenizer, never the TF/Flax/ONNX copies
# that many GPT-2 repos also hold. PyTorch pickles are fetched only when a repo has no safetensors.
_HUB_FILES = [HF_CONFIG_FILE, "*.safetensors", HF_SAFETENSORS_INDEX, "tokenizer.json", "vocab.json",
              "merges.txt", HF_TOKENIZER_CONFIG]
_HUB_BIN_FILES = ["pytorch_model*.bin", HF_BIN_INDEX]

# HF activation names → ModelConfig.activation. gelu_new, gelu_pytorch_tanh and gelu_fast are the same
# tanh approximation written three ways; gelu is the exact erf form.
_ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                        "gelu": "gelu"}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# Per-block module names: HF (after the "h.N." prefix) → gptforge (after "blocks.N."), and whether the
# weight is a Conv1D one that must be transposed.
_BLOCK_MODULES = {
    "ln_1": ("ln_1", False),
    "attn.c_attn": ("attn.qkv", True),
    "attn.c_proj": ("attn.proj", True),
    "ln_2": ("ln_2", False),
    "mlp.c_fc": ("mlp.fc", True),
    "mlp.c_proj": ("mlp.proj", True),
}
_BLOCK_MODULES_TO_HF = {ours: (theirs, conv) for theirs, (ours, conv) in _BLOCK_MODULES.items()}
_TOP_MODULES = ("wte", "wpe", "ln_f", "lm_head")
# Causal-mask buffers that older transformers versions saved with the weights.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Name maps
def _from_hf_name(name: str) -> Optional[tuple[str, bool]]:
    """An HF GPT-2 tensor name (without "transformer.") → (gptforge name, transpose?); None if unknown."""
    module, _, param = name.rpartition(".")
    if module in _TOP_MODULES:
        return name, False
    match = re.fullmatch(r"h\.(\d+)\.(.+)", module)
    if match and match.group(2) in _BLOCK_MODULES:
        ours, conv1d = _BLOCK_MODULES[match.group(2)]
        return f"blocks.{match.group(1)}.{ours}.{param}", conv1d and param == "weight"
    return None


def _to_hf_name(name: str) -> Optional[tuple[str, bool]]:
    """A gptforge tensor name → (GPT2LMHeadModel name, transpose?); None if GPT-2 has no such tensor."""
    module, _, param = name.rpartition(".")
    if module == "lm_head":
        return name, False
    if module in _TOP_MODULES:
        return f"transformer.{name}", False
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if match and match.group(2) in _BLOCK_MODULES_TO_HF:
        theirs, conv1d = _BLOCK_MODULES_TO_HF[match.group(2)]
        return f"transformer.h.{match.group(1)}.{theirs}.{param}", conv1d and param == "weight"
    return None


# --------------------------------------------------------------------------------------------------
# Reading a Hugging Face folder
def _read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / HF_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face model folder: it has no {HF_CONFIG_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _model_config_from_hf(hf: dict[str, Any], path: Path) -> ModelConfig:
    """ModelConfig from a GPT2Config dict; the defaults are GPT2Config's own, as transformers applies them."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{path} has model_type {model_type!r}; only GPT-2 models ('gpt2') can be loaded")
    # Variants that would compute something else than our blocks do: refuse rather than load silently wrong.
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is not True \
            or hf.get("add_cross_attention"):
        raise CheckpointError(
            f"{path} uses a GPT-2 attention variant gptforge does not implement "
            "(scale_attn_by_inverse_layer_idx, scale_attn_weights=false or add_cross_attention)"
        )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS_FROM_HF:
        raise CheckpointError(
            f"{path} uses activation_function {activation!r}; supported: {', '.join(_ACTIVATIONS_FROM_HF)}"
        )
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    if n_inner is None:
        mlp_ratio = 4
    elif isinstance(n_inner, int) and isinstance(n_embd, int) and n_embd > 0 and n_inner % n_embd == 0:
        mlp_ratio = n_inner // n_embd
    else:
        raise CheckpointError(f"{path} has n_inner={n_inner}, which is not a multiple of n_embd={n_embd}")
    try:
        return ModelConfig(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=hf.get("n_positions", 1024),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            dropout=0.0,  # loaded for inference; fine-tuning sets its own dropout
            bias=True,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            mlp_ratio=mlp_ratio,
            activation=_ACTIVATIONS_FROM_HF[activation],
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        ).validate()
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path} describes a model gptforge cannot build: {exc}") from None


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF folder, safetensors preferred; [] if there are none."""
    for single, index in ((HF_SAFETENSORS, HF_SAFETENSORS_INDEX), (HF_BIN, HF_BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"cannot read shard index {directory / index}: {exc}") from None
            outside = [s for s in shards if not _inside_folder(s)]
            if outside:
                raise CheckpointError(f"{directory / index} names shard {outside[0]!r}, which is not a file inside "
                                      f"{directory}; refusing to read weights from outside the model folder")
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{directory / index} names shard {missing[0]}, which is not in {directory}")
            return [directory / s for s in shards]
    return []


def _inside_folder(name: Any) -> bool:
    """Whether a shard name from an index is a relative path that stays inside its folder. Judged on the
    name alone: Hugging Face cache folders hold symlinks into a blob store, so resolving would refuse them."""
    if not isinstance(name, str) or not name or "\\" in name or ":" in name:
        return False
    parts = Path(name).parts
    return not Path(name).is_absolute() and bool(parts) and ".." not in parts and not name.startswith("~")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_state_dict(path, device="cpu")
    try:
        # weights_only: a pickle from the internet must not be able to run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a zoo of types (UnpicklingError, RuntimeError, EOFError …)
        raise CheckpointError(f"cannot read weights {path}: {_first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    check_finite(state, path)
    return state


def _state_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig,
                   directory: Path) -> dict[str, torch.Tensor]:
    """Rename and transpose HF tensors into gptforge's layout, checking every name and shape."""
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for hf_name, tensor in hf_state.items():
        name = hf_name.removeprefix("transformer.")
        if name.endswith(_HF_BUFFERS):
            continue
        mapped = _from_hf_name(name)
        if mapped is None:
            ignored.append(hf_name)  # e.g. the score head of GPT2ForSequenceClassification
            continue
        ours, transpose = mapped
        state[ours] = tensor.t().contiguous() if transpose else tensor
    if ignored:
        log.warning("ignoring %d tensors with no GPT-2 LM equivalent in %s: %s", len(ignored), directory,
                    ", ".join(ignored[:5]))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the head is the token embedding

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"weights in {directory} lack {len(missing)} tensors its config.json needs (first: {missing[0]})"
        )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            f"weights in {directory} hold {len(extra)} tensors its config.json has no place for (first: {extra[0]})"
        )
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            raise CheckpointError(
                f"weights in {directory} do not fit its config.json: {name} has shape {got}, expected {shape}"
            )
    return state


def load_hf_folder(directory: str | Path, *, device: str | torch.device = "cpu",
                   dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """Load a Hugging Face GPT-2 model folder (config.json, weights, tokenizer files) for inference."""
    directory = Path(directory)
    hf_config = _read_hf_config(directory)
    config = _model_config_from_hf(hf_config, directory / HF_CONFIG_FILE)
    files = hf_weight_files(directory)
    if not files:
        raise CheckpointError(
            f"{directory} has no weights ({HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX} or {HF_BIN})"
        )
    hf_state: dict[str, torch.Tensor] = {}
    for file in files:
        hf_state.update(_read_weights(file))
    state = _state_from_hf(hf_state, config, directory)
    del hf_state
    model = build_model(config, state, device=device, dtype=dtype)
    try:
        tokenizer = load_tokenizer(directory)
    except DataError as exc:
        raise CheckpointError(f"cannot load the tokenizer of {directory}: {exc}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}"
        )
    log.info("loaded Hugging Face GPT-2 %s (%d layers, %d wide)", directory, config.n_layer, config.n_embd)
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        config={"model": dataclasses.asdict(config), "source": {"format": "hf", "path": str(directory)}},
        path=directory,
    )


# --------------------------------------------------------------------------------------------------
# Finding a model: local folder or hub id
def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` holds a Hugging Face model config (a config.json with a model_type)."""
    try:
        data = json.loads((path / HF_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # The hub library reads HF_HUB_OFFLINE once at import; a variable set later must count too.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _has_hf_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_BIN, HF_BIN_INDEX))


def download_from_hub(repo_id: str) -> Path:
    """The hub model's folder in the HF cache: cached copy first, then a download unless offline."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    def unreachable(reason: str) -> CheckpointError:
        return CheckpointError(
            f"model {repo_id!r} is not a local folder, is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and the hub could not be reached: {reason}"
        )

    try:
        folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
        if _has_hf_weights(folder):
            return folder
        reason = "the cached copy has no weights"
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        reason = _first_line(exc)
    if _hub_offline():
        raise unreachable("HF_HUB_OFFLINE is set")
    log.info("%s is not in the local Hugging Face cache; downloading it from the hub", repo_id)
    log.debug("cache lookup for %s: %s", repo_id, reason)
    try:
        folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_FILES))
        if not _has_hf_weights(folder):
            # Older repos hold only a PyTorch pickle (read with weights_only=True).
            folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_FILES + _HUB_BIN_FILES))
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"model {repo_id!r} is not a local folder and the Hugging Face hub has no model of that name "
            "(or it is private or gated)"
        ) from None
    except Exception as exc:  # connection, HTTP and disk errors all mean the same to the user
        raise unreachable(_first_line(exc)) from None
    if not _has_hf_weights(folder):
        raise CheckpointError(f"hub model {repo_id!r} has no PyTorch weights (safetensors or pytorch_model.bin)")
    return folder


# --------------------------------------------------------------------------------------------------
# Writing a Hugging Face folder
def _hf_config_from(config: ModelConfig, eos_id: Optional[int], dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        # None is GPT2Config's spelling of "4 * n_embd".
        "n_inner": None if config.mlp_ratio == 4 else config.mlp_ratio * config.n_embd,
        "activation_function": _ACTIVATIONS_TO_HF[config.activation],
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _hf_state_from(model: GPT) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # transformers ties it to transformer.wte.weight itself
        mapped = _to_hf_name(name)
        if mapped is None:
            raise CheckpointError(
                f"cannot export tensor {name!r}: GPT-2 has no equivalent (merge LoRA adapters or undo "
                "quantization or extra heads before exporting)"
            )
        hf_name, transpose = mapped
        tensor = tensor.detach().cpu()
        state[hf_name] = (tensor.t() if transpose else tensor).contiguous()
    return state


def export_hf(ckpt: Checkpoint, out_dir: str | Path) -> Path:
    """Write a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer) loadable by transformers.

    ``ckpt`` is a loaded model (:func:`gptforge.checkpoint.load_pretrained`); to export a checkpoint folder,
    see :func:`gptforge.checkpoint.convert_to_hf`.
    """
    from safetensors.torch import save_file

    model = unwrap_model(ckpt.model)
    if not isinstance(model, GPT):
        raise CheckpointError(
            f"cannot export a {type(model).__name__}: only the GPT language model has a GPT-2 form"
        )
    config = model.config
    if not config.bias:
        raise CheckpointError("cannot export a model without biases (model.bias=false): GPT-2 always has them")
    out = Path(out_dir)
    check_output_dir(out, replaceable=is_hf_folder(out), what="a Hugging Face model folder")
    state = _hf_state_from(model)
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"refusing to export to {out}: tensor {bad} holds NaN or infinite values")
    tokenizer = ckpt.tokenizer
    is_bpe = isinstance(tokenizer, BPETokenizer)
    eos_id = tokenizer.eos_id if is_bpe else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # transformers refuses safetensors files whose metadata does not say format "pt".
        save_file(state, str(tmp / HF_SAFETENSORS), metadata={"format": "pt"})
        hf_config = _hf_config_from(config, eos_id, model.wte.weight.dtype)
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if is_bpe:
            tokenizer.save(tmp)
            # The generic fast class reads tokenizer.json exactly as written (GPT2TokenizerFast would rebuild
            # parts of the pipeline from its own defaults).
            special = {}
            if eos_id is not None:
                special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
                          "clean_up_tokenization_spaces": False, **special}
            (tmp / HF_TOKENIZER_CONFIG).write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        else:
            log.warning(
                "the %s tokenizer has no Hugging Face equivalent: %s holds the weights and config only",
                tokenizer.kind, out,
            )
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("exported Hugging Face GPT-2 folder %s", out)
    return out
