"""A training process killed while it writes a checkpoint leaves nothing that loads wrongly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from gptforge.checkpoint import MODEL_FILE, latest_checkpoint, load_checkpoint, load_state_dict
from gptforge.train import pretrain
from gptforge.train.metrics import read_metrics

pytestmark = pytest.mark.integration

# Trains with a checkpoint every step; while step 2's folder is being written (after the weights and
# optimizer state, before the COMPLETE marker) the process SIGKILLs itself.
KILLED_RUN = """
import json, os, signal, sys
import gptforge.checkpoint as checkpoint
from gptforge.config import build_run_config
from gptforge.train import pretrain

original = checkpoint.save_checkpoint

def save_then_die_at_step_2(path, *args, **kwargs):
    if path.name == "step-0000002":
        kwargs["extra"] = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)
    return original(path, *args, **kwargs)

checkpoint.save_checkpoint = save_then_die_at_step_2
pretrain(build_run_config(json.loads(sys.argv[1])), progress=False)
"""


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(make_config, tmp_path):
    killed = make_config(max_steps=3, checkpoint_interval=1, out_dir=str(tmp_path / "killed"))
    # The same thread count as this process: CPU kernels may sum in another order with another.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(killed.to_dict())],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    assert not (ckpts / "step-0000002").exists()
    stale = list(ckpts.glob(".tmp-step-0000002-*"))
    assert len(stale) == 1 and (stale[0] / MODEL_FILE).is_file()  # half-written, never renamed
    assert (ckpts / "latest").read_text().strip() == "step-0000001"
    assert latest_checkpoint(out) == ckpts / "step-0000001"
    assert load_checkpoint(out).path == ckpts / "step-0000001"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r] == [1, 2]

    resumed = pretrain(make_config(max_steps=3, checkpoint_interval=1, out_dir=str(out)),
                       resume=True, progress=False)
    assert resumed.steps == 3
    assert not list(ckpts.glob(".tmp-*"))  # the next save swept the stale folder away
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r] == [1, 2, 3]

    # The interruption changed nothing: same weights as a run that was never killed.
    clean = pretrain(make_config(max_steps=3, checkpoint_interval=1, out_dir=str(tmp_path / "clean")),
                     progress=False)
    a, b = load_state_dict(resumed.checkpoint / MODEL_FILE), load_state_dict(clean.checkpoint / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
