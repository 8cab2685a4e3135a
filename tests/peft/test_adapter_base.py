"""An adapter folder finds its base model relative to itself or by its recorded path, checks the base's weights
fingerprint, survives moving the folders together, and older adapter folders (absolute path only) still load."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from gptforge import checkpoint as ckpt
from gptforge.config import FinetuneConfig
from gptforge.errors import CheckpointError
from gptforge.finetune import finetune
from tests.model_utils import save_tiny_checkpoint

pytestmark = pytest.mark.integration

CHARS = "abcdefghijklmnopqrstuvwxyz .:\n"
IDS = torch.tensor([[3, 4, 5, 6, 7]])


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def train_adapter(root: Path, strategy: str = "lora") -> Path:
    """root/base (a tiny pretraining run folder) and root/ft (a fine-tuning run on it); returns root/ft/best."""
    save_tiny_checkpoint(root / "base" / "checkpoints" / "step-0000010", CHARS, block_size=32, n_layer=1, n_embd=16)
    ckpt.update_latest(root / "base", "step-0000010")
    words = ["good", "bad", "fine", "dull"]
    for name, n in (("train", 24), ("val", 8)):
        lines = [json.dumps({"prompt": f"say {w}:", "completion": f" {w}"}) for w in (words * n)[:n]]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    config = FinetuneConfig(task="lm", checkpoint=str(root / "base"), train_file=str(root / "train.jsonl"),
                            val_file=str(root / "val.jsonl"), out_dir=str(root / "ft"), strategy=strategy,
                            max_steps=2, eval_interval=2, batch_size=8, learning_rate=1e-2, warmup_steps=1,
                            device="cpu").validate()
    return finetune(config, progress=False).best_checkpoint


def logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return ckpt.load_task_checkpoint(folder).model(IDS)


@pytest.mark.parametrize("strategy", ["lora", "prefix"])
def test_moving_the_base_and_the_adapter_together_keeps_it_loading(tmp_path, strategy):
    best = train_adapter(tmp_path / "old", strategy)
    adapter = json.loads((best / "config.json").read_text())["adapter"]
    assert adapter["base_relative"] == "../../base/checkpoints/step-0000010"
    assert adapter["base_fingerprint"] == \
        "sha256:" + ckpt.file_checksum(tmp_path / "old" / "base" / "checkpoints" / "step-0000010" / ckpt.MODEL_FILE)
    expected = logits(best)
    shutil.move(tmp_path / "old", tmp_path / "elsewhere" / "new")  # the recorded absolute path is gone
    moved = tmp_path / "elsewhere" / "new" / "ft"
    torch.testing.assert_close(logits(moved / "best"), expected)
    torch.testing.assert_close(logits(moved), expected)  # the run folder: its best/


def test_an_adapter_moved_alone_finds_its_base_by_the_recorded_path(tmp_path):
    best = train_adapter(tmp_path / "a")
    expected = logits(best)
    shutil.move(tmp_path / "a" / "ft", tmp_path / "b" / "c" / "ft")
    torch.testing.assert_close(logits(tmp_path / "b" / "c" / "ft" / "best"), expected)


def test_a_base_with_other_weights_is_refused(tmp_path):
    best = train_adapter(tmp_path / "a")
    base = tmp_path / "a" / "base" / "checkpoints" / "step-0000010"
    save_tiny_checkpoint(base, CHARS, block_size=32, n_layer=1, n_embd=16, seed=7)  # same shape, other weights
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(
            f"adapter folder {best} was trained on other weights than its base model {base.resolve()} holds now")):
        ckpt.load_task_checkpoint(best)
    assert snapshot(tmp_path) == before


def test_a_deleted_base_is_named(tmp_path):
    best = train_adapter(tmp_path / "a")
    base = (tmp_path / "a" / "base" / "checkpoints" / "step-0000010").resolve()
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=re.escape(f"adapter folder {best} needs its base model, which is gone: "
                                                        f"{base} does not exist (checkpoint rotation may have")):
        ckpt.load_task_checkpoint(best)


def test_older_adapter_folders_with_an_absolute_path_only_still_load(tmp_path):
    best = train_adapter(tmp_path / "a")
    expected = logits(best)
    config = json.loads((best / "config.json").read_text())
    config["adapter"] = {"strategy": "lora", "base_checkpoint": config["adapter"]["base_checkpoint"]}
    (best / "config.json").write_text(json.dumps(config, indent=2))
    (best / ckpt.COMPLETE_MARKER).write_text("ok\n")  # as older gptforge wrote it
    torch.testing.assert_close(logits(best), expected)


@pytest.mark.parametrize("strategy", ["lora", "adapter", "prefix"])
def test_non_finite_adapter_weights_are_never_saved_nor_loaded(tmp_path, strategy):
    from safetensors.torch import load_file, save_file

    from gptforge.peft import apply_peft, load_peft, save_peft
    from tests.peft.peft_utils import tiny_gpt

    model = tiny_gpt()
    apply_peft(model, strategy)
    good = save_peft(model, tmp_path / "good")
    name, tensor = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"refusing to save adapter {tmp_path / 'good'}: tensor")):
        save_peft(model, tmp_path / "good")
    with pytest.raises(CheckpointError, match=re.escape(f"refusing to save adapter {tmp_path / 'new'}: tensor")):
        save_peft(model, tmp_path / "new")
    assert snapshot(tmp_path) == before
    # an adapter file holding NaN (written by an older gptforge) is refused on load, naming file and tensor
    state = load_file(str(good / "adapter_model.safetensors"))
    first = sorted(state)[0]
    state[first].view(-1)[0] = float("inf")
    save_file(state, str(good / "adapter_model.safetensors"), metadata={"format": "pt", "kind": strategy})
    with pytest.raises(CheckpointError, match=re.escape(f"weights {good / 'adapter_model.safetensors'} hold NaN or "
                                                        f"infinite values (tensor {first})")):
        load_peft(tiny_gpt(), good)

