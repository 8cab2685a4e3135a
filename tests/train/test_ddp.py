"""Two-process DistributedDataParallel on CPU (gloo) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptforge.train import pretrain
from gptforge.train.metrics import read_metrics

pytestmark = pytest.mark.integration

WORKER = """
import json, sys
from gptforge.config import build_run_config
from gptforge.train import pretrain

result = pretrain(build_run_config(json.loads(sys.argv[1])), progress=False)
assert result.steps == 6, result
"""


def test_two_processes_match_one_process_with_accumulation(make_config, tmp_path):
    steps = 6
    two = make_config(max_steps=steps, grad_accum_steps=1, eval_interval=3, checkpoint_interval=3,
                      tensorboard=True, out_dir=str(tmp_path / "ddp"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), json.dumps(two.to_dict())],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = pretrain(make_config(max_steps=steps, grad_accum_steps=2, eval_interval=3, checkpoint_interval=3,
                               out_dir=str(tmp_path / "single")), progress=False)

    ddp_records = read_metrics(tmp_path / "ddp/metrics.jsonl")
    single_records = read_metrics(tmp_path / "single/metrics.jsonl")
    ddp_train = [(r["step"], r["train_loss"]) for r in ddp_records if "train_loss" in r]
    single_train = [(r["step"], r["train_loss"]) for r in single_records if "train_loss" in r]
    assert [s for s, _ in ddp_train] == list(range(1, steps + 1))  # one line per step: rank 1 wrote none
    assert [s for s, _ in ddp_train] == [s for s, _ in single_train]
    for (_, a), (_, b) in zip(ddp_train, single_train):
        assert a == pytest.approx(b, rel=1e-4)
    ddp_val = [r["val_loss"] for r in ddp_records if "val_loss" in r]
    single_val = [r["val_loss"] for r in single_records if "val_loss" in r]
    assert len(ddp_val) == 2 and ddp_val == pytest.approx(single_val, rel=1e-4)
    assert ddp_val[-1] == pytest.approx(one.val_loss, rel=1e-4)

    # Only rank 0 wrote: one TensorBoard writer, and the checkpoint records both processes' RNG states.
    assert len(list((tmp_path / "ddp/tensorboard").glob("events.out.tfevents.*"))) == 1
    state = json.loads((tmp_path / "ddp/checkpoints/step-0000006/trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["global_batch_size"] == 8
    assert state["tokens_seen"] == one.tokens_seen
