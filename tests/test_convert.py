"""Hugging Face GPT-2 ↔ gptforge: same logits and greedy tokens as transformers, both ways, offline."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import (
    Checkpoint,
    convert_from_hf,
    convert_to_hf,
    load_checkpoint,
    load_pretrained,
    resolve_model_source,
)
from gptforge.config import GenerateConfig, ModelConfig
from gptforge.convert import export_hf, load_hf_folder
from gptforge.errors import CheckpointError
from gptforge.generate import generate_tokens
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from tests.hf_utils import TEXT, make_hf_gpt2_folder
from tests.model_utils import save_tiny_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PROMPT = "First Citizen: hear me speak"


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test may reach the network; the HF cache is an empty folder of the test's own."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads these once at import, so the module attributes must follow the environment.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Three transformers models saved three ways: tied + safetensors, tied + pickle, untied + safetensors."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "safetensors": (root / "st", make_hf_gpt2_folder(root / "st", seed=0)),
        "bin": (root / "bin", make_hf_gpt2_folder(root / "bin", seed=1, safetensors=False)),
        "untied": (root / "untied", make_hf_gpt2_folder(root / "untied", seed=2, tie_word_embeddings=False)),
    }


def random_ids(vocab_size: int, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    return hf_model(ids).logits


@torch.no_grad()
def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def hf_greedy(hf_model, prompt_ids: list[int], n: int = 20) -> list[int]:
    hf_model.generation_config.eos_token_id = None  # a random model may well pick EOS; never stop early
    hf_model.generation_config.pad_token_id = 0
    out = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff < TOL, f"max |logit difference| {diff:.2e}"


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["safetensors", "bin", "untied"])
def test_hf_folder_gives_transformers_logits_and_greedy_tokens(hf_folders, kind):
    path, hf_model = hf_folders[kind]
    ckpt = load_hf_folder(path)
    config = ModelConfig(**ckpt.config["model"])
    assert config.tie_embeddings is (kind != "untied")
    assert config.dropout == 0.0  # loaded for inference
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (2, 2, 64, 64)
    assert ckpt.config["source"] == {"format": "hf", "path": str(path)}
    assert not ckpt.model.training

    ids = random_ids(config.vocab_size)
    assert_close(our_logits(ckpt.model, ids), hf_logits(hf_model, ids))

    prompt = ckpt.tokenizer.encode(PROMPT)
    ours = generate_tokens(ckpt.model, prompt, GenerateConfig(max_new_tokens=20, temperature=0))[0]
    assert ours == hf_greedy(hf_model, prompt)
    assert len(ours) == 20


def test_untied_head_is_its_own_tensor(hf_folders):
    ckpt = load_hf_folder(hf_folders["untied"][0])
    assert ckpt.model.lm_head.weight.data_ptr() != ckpt.model.wte.weight.data_ptr()
    assert not torch.equal(ckpt.model.lm_head.weight, ckpt.model.wte.weight)


@pytest.mark.parametrize("kind", ["safetensors", "untied"])
def test_export_loads_in_transformers_with_same_logits_and_tokenizer(hf_folders, tmp_path, kind):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    path, hf_model = hf_folders[kind]
    ckpt = load_hf_folder(path)
    out = export_hf(ckpt, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["tie_word_embeddings"] is (kind != "untied")
    assert hf_config["eos_token_id"] == ckpt.tokenizer.eos_id

    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = random_ids(ckpt.model.config.vocab_size, seed=1)
    assert_close(hf_logits(reloaded, ids), our_logits(ckpt.model, ids))
    assert_close(hf_logits(reloaded, ids), hf_logits(hf_model, ids))

    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in (PROMPT, TEXT, "  spaces, émojis 🙂 and <|endoftext|> too"):
        assert hf_tok.encode(text) == ckpt.tokenizer.encode(text)
    assert hf_tok.eos_token_id == ckpt.tokenizer.eos_id


def test_convert_from_hf_then_back_keeps_the_logits(hf_folders, tmp_path):
    from transformers import GPT2LMHeadModel

    path, hf_model = hf_folders["safetensors"]
    ckpt_dir = convert_from_hf(path, tmp_path / "ckpt")
    ckpt = load_checkpoint(ckpt_dir)
    ids = random_ids(ckpt.model.config.vocab_size, seed=2)
    expected = hf_logits(hf_model, ids)
    assert_close(our_logits(ckpt.model, ids), expected)
    assert ckpt.tokenizer.fingerprint == load_hf_folder(path).tokenizer.fingerprint

    # The same folder through the one entry point generate/serve use.
    assert resolve_model_source(str(ckpt_dir)) == ("gptforge", ckpt_dir)
    assert_close(our_logits(load_pretrained(ckpt_dir).model, ids), expected)

    hf_dir = convert_to_hf(ckpt_dir, tmp_path / "hf-again")
    assert_close(hf_logits(GPT2LMHeadModel.from_pretrained(hf_dir).eval(), ids), expected)


def test_char_tokenizer_exports_weights_and_config_only(tmp_path, caplog):
    """No HF tokenizer exists for it; the exact-erf GELU and a 2x MLP still map onto GPT2Config."""
    from transformers import GPT2LMHeadModel

    tokenizer = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                         mlp_ratio=2, activation="gelu")
    model = GPT(config).eval()
    ckpt = Checkpoint(model=model, tokenizer=tokenizer, config={"model": {}}, path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="gptforge.convert"):
        out = export_hf(ckpt, tmp_path / "char-hf")
    assert "no Hugging Face equivalent" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["activation_function"], hf_config["n_inner"]) == ("gelu", 64)
    ids = random_ids(config.vocab_size, length=32)
    assert_close(hf_logits(GPT2LMHeadModel.from_pretrained(out).eval(), ids), our_logits(model, ids))


def test_export_is_atomic_and_never_clobbers_other_folders(hf_folders, tmp_path, monkeypatch):
    ckpt = load_hf_folder(hf_folders["safetensors"][0])

    def fail(directory):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.tokenizer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(load_hf_folder(hf_folders["safetensors"][0]), project)
    assert (project / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------
# Hub ids
def fake_cache_entry(cache: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> Path:
    """Lay out a model the way huggingface_hub caches it: snapshots/<commit>/ and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(hf_folders, offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, hf_model = hf_folders["safetensors"]
    snapshot = fake_cache_entry(offline_hub, "org/tiny-gpt2", path)
    assert resolve_model_source("org/tiny-gpt2") == ("hf", snapshot)
    ckpt = load_pretrained("org/tiny-gpt2")
    ids = random_ids(ckpt.model.config.vocab_size, seed=3)
    assert_close(our_logits(ckpt.model, ids), hf_logits(hf_model, ids))


def test_offline_uncached_model_id_is_one_clear_line(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained("gpt2")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model 'gpt2' is not a local folder, is not in the Hugging Face cache (")
    assert str(offline_hub) in message and "HF_HUB_OFFLINE" in message


def test_download_prefers_safetensors_and_falls_back_to_pickles(hf_folders, tmp_path, monkeypatch):
    """Online (faked): safetensors patterns first; *.bin only when the repo turned out to have none."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    bin_folder = hf_folders["bin"][0]
    no_weights = tmp_path / "snapshot-without-weights"
    no_weights.mkdir()
    shutil.copy(bin_folder / "config.json", no_weights)
    calls = []

    def fake_snapshot_download(*, repo_id, allow_patterns, local_files_only=False):
        calls.append((local_files_only, list(allow_patterns)))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        has_bin = any(p.endswith(".bin") for p in allow_patterns)
        return str(bin_folder if has_bin else no_weights)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_source("org/old-gpt2") == ("hf", bin_folder)
    assert [local for local, _ in calls] == [True, False, False]
    assert not any(p.endswith(".bin") for _, patterns in calls[:2] for p in patterns)
    assert "*.safetensors" in calls[1][1] and "pytorch_model*.bin" in calls[2][1]


# --------------------------------------------------------------------------------------------------
# Errors: one line, naming the problem
def one_line_error(fn, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_folder_of_neither_format_is_refused(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "model.safetensors").write_bytes(b"")
    message = one_line_error(load_pretrained, tmp_path / "stuff")
    assert "neither a gptforge checkpoint" in message and "Hugging Face model folder" in message


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    message = one_line_error(load_pretrained, str(tmp_path / "no" / "such" / "dir"))
    assert "does not exist" in message


def copy_folder(hf_folders, tmp_path, kind="safetensors") -> Path:
    return Path(shutil.copytree(hf_folders[kind][0], tmp_path / "copy"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_config_json(hf_folders, tmp_path):
    folder = copy_folder(hf_folders, tmp_path)
    (folder / "config.json").unlink()
    assert "has no config.json" in one_line_error(load_hf_folder, folder)


@pytest.mark.parametrize("changes, expected", [
    ({"model_type": "llama"}, "model_type 'llama'; only GPT-2"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"n_inner": 100}, "n_inner=100, which is not a multiple of n_embd=64"),
    ({"scale_attn_by_inverse_layer_idx": True}, "attention variant"),
])
def test_unsupported_config(hf_folders, tmp_path, changes, expected):
    folder = copy_folder(hf_folders, tmp_path)
    edit_config(folder, **changes)
    assert expected in one_line_error(load_pretrained, folder)


def test_corrupt_safetensors(hf_folders, tmp_path):
    folder = copy_folder(hf_folders, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "cannot read weights" in one_line_error(load_hf_folder, folder)


def test_corrupt_pickle(hf_folders, tmp_path):
    folder = copy_folder(hf_folders, tmp_path, kind="bin")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    assert "cannot read weights" in one_line_error(load_hf_folder, folder)


def test_missing_weights(hf_folders, tmp_path):
    folder = copy_folder(hf_folders, tmp_path)
    (folder / "model.safetensors").unlink()
    assert "has no weights" in one_line_error(load_hf_folder, folder)


def test_weights_that_do_not_fit_the_config(hf_folders, tmp_path):
    folder = copy_folder(hf_folders, tmp_path)
    edit_config(folder, n_positions=32)
    message = one_line_error(load_hf_folder, folder)
    assert "wpe.weight has shape (64, 64), expected (32, 64)" in message


def test_sharded_safetensors_load(hf_folders, tmp_path):
    """A model.safetensors.index.json with two shards loads like the single file."""
    from safetensors.torch import load_file, save_file

    path, hf_model = hf_folders["safetensors"]
    folder = copy_folder(hf_folders, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = random_ids(hf_model.config.vocab_size, seed=4)
    assert_close(our_logits(load_hf_folder(folder).model, ids), hf_logits(hf_model, ids))


def test_original_gpt2_layout_without_prefix_and_with_mask_buffers(hf_folders, tmp_path):
    """The files on the hub for `gpt2` name tensors "h.0.attn.c_attn.weight" and carry causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    path, hf_model = hf_folders["safetensors"]
    folder = copy_folder(hf_folders, tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ids = random_ids(hf_model.config.vocab_size, seed=5)
    assert_close(our_logits(load_hf_folder(folder).model, ids), hf_logits(hf_model, ids))


@pytest.mark.parametrize("n_layer, expected", [(3, "lack 12 tensors"), (1, "hold 12 tensors")])
def test_layer_count_that_does_not_fit_the_weights(hf_folders, tmp_path, n_layer, expected):
    folder = copy_folder(hf_folders, tmp_path)
    edit_config(folder, n_layer=n_layer)
    assert expected in one_line_error(load_hf_folder, folder)


def test_an_export_of_non_finite_weights_in_memory_is_refused(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "c", "abcdef \n", block_size=32, n_layer=1, n_embd=16)
    loaded = load_checkpoint(folder)
    with torch.no_grad():
        loaded.model.blocks[0].mlp.proj.weight[0, 0] = float("inf")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=re.escape(f"refusing to export to {tmp_path / 'hf'}: tensor "
                                                        f"transformer.h.0.mlp.c_proj.weight holds NaN")):
        export_hf(loaded, tmp_path / "hf")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
