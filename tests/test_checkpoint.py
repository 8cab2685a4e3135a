"""find_resume_checkpoint: the latest complete checkpoint of a run, holding the files a resume needs."""

import re

import pytest

from gptforge import checkpoint as ckpt
from gptforge.errors import CheckpointError


def fake_checkpoint(run, name, *files):
    folder = run / ckpt.CHECKPOINTS_DIR / name
    folder.mkdir(parents=True)
    for f in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.COMPLETE_MARKER, *files):
        (folder / f).write_text("")
    return folder


def test_finds_the_latest_complete_checkpoint_with_the_required_files(tmp_path):
    fake_checkpoint(tmp_path, "step-0000002", ckpt.TRAINER_STATE_FILE)
    newest = fake_checkpoint(tmp_path, "step-0000004", ckpt.TRAINER_STATE_FILE, ckpt.OPTIMIZER_FILE)
    assert ckpt.find_resume_checkpoint(tmp_path, (ckpt.OPTIMIZER_FILE, ckpt.TRAINER_STATE_FILE)) == newest


def test_no_complete_checkpoint_or_a_missing_file_is_an_error(tmp_path):
    nothing = f"nothing to resume in {tmp_path}: it holds no complete checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(nothing)):
        ckpt.find_resume_checkpoint(tmp_path)
    found = fake_checkpoint(tmp_path, "step-0000001", ckpt.TRAINER_STATE_FILE)
    missing = f"checkpoint {found} has no {ckpt.OPTIMIZER_FILE}, so training cannot resume from it"
    with pytest.raises(CheckpointError, match=re.escape(missing)):
        ckpt.find_resume_checkpoint(tmp_path, (ckpt.TRAINER_STATE_FILE, ckpt.OPTIMIZER_FILE))
    assert ckpt.find_resume_checkpoint(tmp_path, (ckpt.TRAINER_STATE_FILE,)) == found
